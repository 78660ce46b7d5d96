"""Checkpoint formats: save / load a :class:`~dlmscope.sae.TopKSAE` in dlmscope's own format and in the formats
of the peer libraries, detected from the files present.

| format | files | notes |
|---|---|---|
| ``dlmscope`` | ``cfg.json`` (``"format": "dlmscope"``) + ``sae.safetensors`` | ours; :mod:`.dlmscope_format` |
| ``dictionary_learning`` | ``ae.pt`` (+ ``config.json``) | dictionary_learning ``AutoEncoderTopK``; the paper's released SAEs |
| ``sparsify`` | ``cfg.json`` (with ``d_in``) + ``sae.safetensors`` | EleutherAI eai-sparsify, one hookpoint directory |
| ``saelens`` | ``cfg.json`` + ``sae_weights.safetensors`` | SAELens, v6 layout written, pre-6 Top-K read too |

``save(sae, path, format)`` writes atomically (see :mod:`._atomic`): a failure leaves any previous checkpoint at
``path`` intact. Every format round-trips bit-exactly (tensors and ``SAEConfig``): peer configs carry our
``SAEConfig.meta`` under the extra key ``"dlmscope_meta"``, which the peer libraries ignore. A checkpoint written
by a peer library loads with ``meta = {"source": {"format": ..., "cfg": <its config>}}`` and re-exports to that
format with the peer's own fields intact.

``load`` validates what it reads — missing files or tensors, shapes that disagree with each other or with the
config, ``k > n``, non-finite weights, unsupported variants of a peer format — and raises ``ValueError`` naming the
file and the key.
"""
from __future__ import annotations

import os
from pathlib import Path

from . import _checks, dictionary_learning, dlmscope_format, saelens, sparsify
from ._atomic import atomic_directory

__all__ = ["FORMATS", "save", "load", "detect_format", "atomic_directory"]

#: format name -> module with ``save(sae, directory)``, ``load(directory)``, ``detect(...)``, ``DESCRIPTION``
FORMATS = {
    "dlmscope": dlmscope_format,
    "dictionary_learning": dictionary_learning,
    "sparsify": sparsify,
    "saelens": saelens,
}

_ALIASES = {
    "sae_lens": "saelens",
    "sae-lens": "saelens",
    "dictionary-learning": "dictionary_learning",
    "dlm-scope": "dictionary_learning",
    "eai-sparsify": "sparsify",
}


def _format_name(format: str) -> str:
    if not isinstance(format, str):
        raise TypeError(f"format must be a string, got {type(format).__name__}")
    name = _ALIASES.get(format.lower(), format.lower())
    if name not in FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}; known: {sorted(FORMATS)}")
    return name


def _checkpoint_dir(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no SAE checkpoint at {path}: the path does not exist")
    if path.is_file():  # a checkpoint's file (cfg.json, ae.pt, ...) stands for its directory
        return path.parent
    return path


def detect_format(path: str | os.PathLike) -> str:
    """The format name of the checkpoint directory ``path`` (or of the directory of the file ``path``)."""
    directory = _checkpoint_dir(path)
    entries = sorted(directory.iterdir())
    files = {p.name for p in entries if p.is_file()}
    cfg, cfg_error = None, None
    if "cfg.json" in files:
        try:
            cfg = _checks.read_json(directory / "cfg.json")
        except ValueError as e:
            cfg_error = e
    if dlmscope_format.detect(directory, files, cfg):
        return "dlmscope"
    matches = [name for name in ("saelens", "dictionary_learning", "sparsify")
               if FORMATS[name].detect(directory, files, cfg)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ValueError(f"{directory}: ambiguous SAE checkpoint, the files {sorted(files)} match formats {matches}")
    if cfg_error is not None:
        raise cfg_error
    subdirs = [p.name for p in entries if p.is_dir() and not p.name.startswith(".")]
    hint = ""
    holders = [s for s in subdirs if any((directory / s / f).is_file()
                                         for f in ("cfg.json", "ae.pt", "sae.safetensors", "sae_weights.safetensors"))]
    if holders:
        hint = f"; its subdirectories {holders[:8]}{'...' if len(holders) > 8 else ''} look like checkpoints: pass one"
    expected = "; ".join(f"{name}: {mod.DESCRIPTION}" for name, mod in FORMATS.items())
    raise ValueError(f"{directory}: not a recognised SAE checkpoint; found files {sorted(files)}"
                     f"{' and directories ' + str(subdirs) if subdirs else ''}{hint}. Expected one of — {expected}")


def load(path: str | os.PathLike):
    """Load the SAE checkpoint at ``path`` (format detected) as a :class:`~dlmscope.sae.TopKSAE` on CPU."""
    name = detect_format(path)
    return FORMATS[name].load(_checkpoint_dir(path))


def _check_sae(sae) -> None:
    import torch

    for attr in ("cfg", "W_enc", "b_enc", "W_dec", "b_dec"):
        if not hasattr(sae, attr):
            raise TypeError(f"save expects a TopKSAE, got {type(sae).__name__} (no attribute {attr!r})")
    d, n = sae.cfg.d, sae.cfg.n
    shapes = {"W_enc": (n, d), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}
    for name, shape in shapes.items():
        t = getattr(sae, name)
        if tuple(t.shape) != shape:
            raise ValueError(f"cannot save: {name} has shape {list(t.shape)}, the SAE's cfg (d={d}, n={n}) needs "
                             f"{list(shape)}")
        if t.is_meta:
            raise ValueError(f"cannot save: {name} is on the meta device (no data)")
        if not bool(torch.isfinite(t.detach()).all()):
            raise ValueError(f"cannot save: {name} holds non-finite values (NaN or Inf)")


def save(sae, path: str | os.PathLike, format: str = "dlmscope") -> Path:
    """Write ``sae`` to the directory ``path`` in ``format``, atomically; returns the directory.

    An existing checkpoint directory at ``path`` is replaced as a whole. A non-empty directory that holds no
    recognisable checkpoint is never replaced (``FileExistsError``), so a mistyped path cannot wipe unrelated files.
    """
    name = _format_name(format)
    _check_sae(sae)
    path = Path(path)
    if path.is_dir() and any(path.iterdir()):
        try:
            detect_format(path)
        except ValueError as e:
            raise FileExistsError(f"{path} is a non-empty directory that is not an SAE checkpoint; refusing to "
                                  f"replace it ({e})") from None
    with atomic_directory(path) as tmp:
        FORMATS[name].save(sae, tmp)
    return path
