"""Checkpoint formats: save / load an SAE's state — an :class:`SAEConfig` and the tensors ``W_enc [n, d]``,
``b_enc [n]``, ``W_dec [n, d]``, ``b_dec [d]`` and its architecture's extras (:mod:`.config`) — in dlmscope's own
format and in the formats of the peer libraries, detected from the files present. The SAE classes of
:mod:`dlmscope.sae` are built from that state (``from_state``; :func:`dlmscope.sae.load` picks the class of
``cfg.arch``) and hand it over to be saved (``state``); this package imports nothing of them.

- ``dlmscope``: ``cfg.json`` (``"format": "dlmscope"``) + ``sae.safetensors``; every architecture
  (:mod:`.dlmscope_format`).
- ``dictionary_learning``: ``ae.pt`` (+ ``config.json``); ``AutoEncoderTopK`` (the paper's released SAEs),
  ``BatchTopKSAE``, ``MatryoshkaBatchTopKSAE``, ``JumpReluAutoEncoder``.
- ``sparsify``: ``cfg.json`` (with ``d_in``) + ``sae.safetensors``; Top-K only (EleutherAI eai-sparsify, one
  hookpoint directory).
- ``saelens``: ``cfg.json`` + ``sae_weights.safetensors``; ``topk`` and ``jumprelu`` (BatchTopK / Matryoshka as
  SAELens saves them for inference) read and written; read too: ``batchtopk`` / ``matryoshka_batchtopk`` training
  checkpoints, the pre-6 Top-K and JumpReLU layouts.

Each peer module's docstring says what maps to which class, what is folded into the weights on load and what is
refused; saving a BatchTopK / JumpReLU / Matryoshka SAE in the sparsify format is refused (it has no such rule).

``save(cfg, tensors, path, format)`` writes atomically (:func:`dlmscope.util.atomic.atomic_directory`; the savers write
their files plainly into its temp directory): a failure leaves any previous checkpoint at ``path`` intact, and a
successful save deletes the hidden leftovers that crashed saves to ``path`` left beside it. A save replaces the
directory as a whole, so it refuses (``FileExistsError``, before writing anything) a directory that holds anything
besides the files of a checkpoint (:data:`CHECKPOINT_FILES`). Every format round-trips what it can hold
bit-exactly (tensors and ``SAEConfig``; the one exception, dictionary_learning's JumpReLU b_enc, is stored without
b_dec's share and agrees to rounding): peer configs carry our ``SAEConfig.meta`` under the extra key
``"dlmscope_meta"`` (and a JumpReLU's k under ``"dlmscope_k"``), which the peer libraries ignore. A checkpoint
written by a peer library loads with ``meta = {"source": {"format": ..., "cfg": <its config>}}`` and re-exports to
that format with the peer's own fields intact. Both :func:`save` and ``TopKSAE.from_state`` check the tensors'
shapes with :func:`check_state`.

``load`` validates what it reads — missing files or tensors, shapes that disagree with each other or with the
config, ``k > n``, non-finite weights, unsupported variants of a peer format — and raises ``ValueError`` naming the
file and the key.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from dlmscope.util import atomic
from . import _checks, dictionary_learning, dlmscope_format, saelens, sparsify
from ._checks import read_json, read_safetensors, write_json, write_safetensors
from .config import ARCHS, PARAMS, SAEConfig, check_state, param_shapes, tensor_names

__all__ = ["FORMATS", "CHECKPOINT_FILES", "ARCHS", "PARAMS", "SAEConfig", "check_state", "param_shapes",
           "tensor_names", "save", "load", "detect_format", "check_target",
           # the strict readers and plain writers the formats use, for other checkpoint kinds (the crosscoder's)
           "read_json", "read_safetensors", "write_json", "write_safetensors"]

#: format name -> module with ``save(cfg, tensors, directory)``, ``load(directory) -> (cfg, tensors)``,
#: ``detect(...)``, ``DESCRIPTION``
FORMATS = {
    "dlmscope": dlmscope_format,
    "dictionary_learning": dictionary_learning,
    "sparsify": sparsify,
    "saelens": saelens,
}

#: The names of every file a format's ``save`` writes: all that a directory may hold for :func:`save` to replace it.
CHECKPOINT_FILES = frozenset(name for mod in FORMATS.values() for name in (mod.CFG, mod.WEIGHTS))

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
    if not path.exists() and not atomic.restore_directory(path):
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


def load(path: str | os.PathLike) -> tuple[SAEConfig, dict[str, Tensor]]:
    """(config, tensors on CPU) of the SAE checkpoint at ``path`` (format detected); tensors as in :data:`PARAMS`
    plus the architecture's extras (:func:`tensor_names`)."""
    name = detect_format(path)
    return FORMATS[name].load(_checkpoint_dir(path))


def _check_state(cfg: SAEConfig, tensors: Mapping[str, Tensor]) -> None:
    """Reject a state no format can represent, before anything is written."""
    if not isinstance(cfg, SAEConfig) or not isinstance(tensors, Mapping):
        raise TypeError(f"save expects a TopKSAE's state (an SAEConfig and a dict of tensors), got "
                        f"{type(cfg).__name__} and {type(tensors).__name__}")
    keys, want = sorted(tensors), tensor_names(cfg)
    if keys != sorted(want) or not all(isinstance(t, Tensor) for t in tensors.values()):
        raise TypeError(f"save expects an SAE's state: a {cfg.arch} SAE has tensors {list(want)}, got {keys}")
    try:
        json.dumps(cfg.meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"cannot save: the config (including SAEConfig.meta) is not plain JSON: {e}") from e
    check_state(cfg, tensors)
    for name in want:
        t = tensors[name]
        if t.is_meta:
            raise ValueError(f"cannot save: {name} is on the meta device (no data)")
        if not bool(torch.isfinite(t.detach()).all()):
            raise ValueError(f"cannot save: {name} holds non-finite values (NaN or Inf)")


def check_target(path: str | os.PathLike) -> None:
    """Refuse (``FileExistsError``) a ``path`` that :func:`save` may not replace: one holding anything besides a
    previous checkpoint's files. Nothing is written here (a crashed earlier save to ``path`` is rolled back first, as
    the write would do, so that what is checked is what would be replaced). Call it for every target before the
    first write of a multi-SAE save."""
    path = Path(path)
    atomic.restore_directory(path)
    if not path.is_dir():
        return  # missing: created; a file: atomic_directory refuses it
    entries = sorted(path.iterdir(), key=lambda p: p.name)
    if not entries:
        return
    foreign = [p.name + ("/" if p.is_dir() else "") for p in entries
               if p.name not in CHECKPOINT_FILES or p.is_dir()]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(
            f"{path} is not an SAE checkpoint; refusing to replace it: a save replaces the whole directory, and it "
            f"holds {shown}, which no checkpoint format writes (a checkpoint directory holds only "
            f"{', '.join(sorted(CHECKPOINT_FILES))}). Save to a new or empty directory, or move those entries out "
            f"of {path} first")
    try:
        detect_format(path)
    except ValueError as e:
        raise FileExistsError(f"{path} is a non-empty directory that is not an SAE checkpoint; refusing to "
                              f"replace it ({e}). Save to a new or empty directory") from None


def save(cfg: SAEConfig, tensors: Mapping[str, Tensor], path: str | os.PathLike, format: str = "dlmscope") -> Path:
    """Write the SAE state ``(cfg, tensors)`` to the directory ``path`` in ``format``, atomically; returns it.

    ``path`` may be missing (it and its parents are created), an empty directory, or a directory holding only a
    previous checkpoint (any format): that directory is replaced as a whole, so the previous checkpoint's files are
    gone (none is left behind next to the new ones). A directory holding anything else — any file or subdirectory,
    hidden ones included, whose name is not in :data:`CHECKPOINT_FILES` (e.g. ``eval_results.json`` beside a
    checkpoint, so converting a checkpoint in place is refused too), or checkpoint file names that do not form a
    recognisable checkpoint — is never replaced: ``FileExistsError`` naming it and the first foreign entries is
    raised before anything is written. Save to a new or empty directory instead, or move those entries out.
    Hidden leftovers of crashed saves to ``path`` (``.<name>.tmp-*``, ``.<name>.old``, beside it in its parent) are
    deleted at the end; those of other targets in the same parent are left alone. (The check and the replacement
    assume one writer: nothing else adds files to ``path`` while it is saved.) A ``path`` that is a symbolic link
    to a checkpoint directory is written through: the directory it points at is replaced, the link is kept.
    """
    name = _format_name(format)
    _check_state(cfg, tensors)
    if cfg.arch not in FORMATS[name].SUPPORTED_ARCHS:
        holders = ", ".join(f for f, mod in FORMATS.items() if cfg.arch in mod.SUPPORTED_ARCHS)
        raise ValueError(f"cannot save a {cfg.arch} SAE in the {name} format: it holds "
                         f"{', '.join(FORMATS[name].SUPPORTED_ARCHS)} only; use the {holders} format")
    path = Path(path)
    target = atomic.resolve_link(path)  # a symlinked checkpoint is replaced where the link points; the link stays
    check_target(target)
    with atomic.atomic_directory(target) as tmp:
        FORMATS[name].save(cfg, tensors, tmp)
    atomic.sweep_leftovers(target.parent, lambda owner: owner == target.name)
    return path
