"""Sharded trainer checkpoints (latent-parallel runs): one safetensors file per latent shard, a manifest last.

    <checkpoint_dir>/step-000000010/shard-00000-of-00004.safetensors   latent rank 0's state (data rank 0 writes)
                                    ...
                                    shard-00003-of-00004.safetensors
                                    meta.json                          the manifest: written last, by rank 0

Each shard file is written durably on its own (:func:`dlmscope.util.atomic.save_safetensors`: temp file, fsync,
rename) with its identity in the safetensors metadata (format, step, latent rank and size, the shard's latent
bounds per SAE). After every shard is in place (a barrier), rank 0 writes ``meta.json`` durably: a step directory
is a checkpoint only once its manifest exists and names every shard, so a run killed at any point leaves either
the previous checkpoint or the new one as the latest complete one. Older step directories are pruned after the
manifest is written. Tensor names inside a shard are the trainer's (``sae.{i}.{param}``, ``adam.{i}.{j}.{key}``,
``dec.{i}.exp_avg(_sq)``, ``dead.{i}``), restricted to the shard's latents (``b_dec`` and its Adam state are
replicated: every shard holds them).

:func:`load_merged` joins the shards of a checkpoint in one process (checking that they belong together);
:func:`load_saes` / :func:`export` turn it into ordinary :class:`~dlmscope.sae.topk.TopKSAE` s on the raw activation
scale and write them in any single-file format of :mod:`dlmscope.sae.formats`; an export checks every target folder
before it writes any.

Reading validates: a missing file is ``FileNotFoundError``, one that cannot be parsed (a truncated shard, a manifest
that is not a JSON object) :class:`~dlmscope.train.checkpoint.CorruptCheckpoint`, anything else malformed (wrong
fields, NaN / Inf tensors) ``ValueError``, each naming the file. :func:`verify` checks a checkpoint's files
without reading its tensors (a resume uses it to skip a damaged latest checkpoint).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from dlmscope.sae import formats
from dlmscope.util import atomic
from . import checkpoint as ckpt
from .latent_parallel import shard_bounds
from .step import adam_index
from dlmscope.sae.topk import PARAMS, TopKSAE

__all__ = ["FORMAT", "shard_name", "begin", "save_shard", "commit", "list_complete", "latest", "read_meta",
           "read_shard", "verify", "load_merged", "load_saes", "export"]

FORMAT = "dlmscope-latent-shard"
#: tensors that every shard holds whole (the replicated b_dec, its Adam state and the rng); the rest are sliced
_REPLICATED = re.compile(rf"^(sae\.\d+\.b_dec|adam\.\d+\.{adam_index('b_dec')}\..*|rng\..*)$")


def shard_name(latent_rank: int, latent_size: int) -> str:
    return f"shard-{latent_rank:05d}-of-{latent_size:05d}.safetensors"


def begin(directory: str | Path, step: int) -> Path:
    """Rank 0, before the shards are written: the step directory, with any manifest of an earlier write of this
    step removed first (so a half-rewritten step never looks complete)."""
    target = Path(directory) / ckpt.checkpoint_name(step)
    target.mkdir(parents=True, exist_ok=True)
    manifest = target / ckpt.META_FILE
    if manifest.exists():
        manifest.unlink()
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return target


def save_shard(directory: str | Path, step: int, latent_rank: int, latent_size: int,
               bounds: list[tuple[int, int]], tensors: dict[str, Tensor]) -> Path:
    """Durably write one latent shard's state into the step directory (made by :func:`begin`)."""
    path = Path(directory) / ckpt.checkpoint_name(step) / shard_name(latent_rank, latent_size)
    meta = {"format": FORMAT, "version": "1", "step": str(step), "latent_rank": str(latent_rank),
            "latent_size": str(latent_size), "bounds": json.dumps([list(b) for b in bounds])}
    try:
        atomic.save_safetensors(path, {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()},
                                meta)
    except (OSError, SafetensorError) as e:
        raise ckpt.write_error(e, f"cannot write checkpoint shard {path}", "the checkpoint of this step is not "
                               "committed; the last complete one is kept") from e
    return path


def commit(directory: str | Path, step: int, meta: dict, latent_size: int, *, keep: int = 1) -> Path:
    """Rank 0, after every shard is written: the manifest (durably), then prune all but the ``keep`` newest."""
    target = Path(directory) / ckpt.checkpoint_name(step)
    shards = [shard_name(r, latent_size) for r in range(latent_size)]
    missing = [s for s in shards if not (target / s).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot commit checkpoint {target}: shard files {missing} were not written")
    atomic.write_json(target / ckpt.META_FILE, {**meta, "step": step, "latent_size": latent_size, "shards": shards})
    done = list_complete(directory)
    older = [p for p in Path(directory).iterdir() if p.is_dir() and re.match(r"^step-\d+$", p.name) and p != target
             and (p not in done[-keep:] if keep > 0 else True)]
    for old in older:
        atomic.remove_directory(old)
    return target


def list_complete(directory: str | Path) -> list[Path]:
    """Step directories with a manifest whose shard files all exist, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    out = []
    for p in sorted(directory.iterdir()):
        if not (p.is_dir() and re.match(r"^step-\d+$", p.name) and (p / ckpt.META_FILE).is_file()):
            continue
        try:
            shards = read_meta(p)["shards"]
        except (ValueError, FileNotFoundError):  # a damaged manifest: not complete
            continue
        if all((p / s).is_file() for s in shards):
            out.append(p)
    return out


def latest(directory: str | Path) -> Path | None:
    found = list_complete(directory)
    return found[-1] if found else None


def read_meta(path: str | Path) -> dict:
    """The manifest of a sharded checkpoint directory: ``FileNotFoundError`` without one, ``ValueError`` (naming
    it) when it is not a sharded checkpoint's manifest."""
    path = Path(path)
    if not (path / ckpt.META_FILE).is_file():
        raise FileNotFoundError(f"{path} has no {ckpt.META_FILE}: not a complete sharded checkpoint (a write that "
                                "was interrupted before its manifest, or not a checkpoint)")
    meta = ckpt.read_meta(path)
    file = path / ckpt.META_FILE
    if "shards" not in meta or "latent_size" not in meta:
        raise ValueError(f"{file} is not a sharded checkpoint manifest (no 'shards'): a "
                         "single-process checkpoint loads with dlmscope.train.checkpoint.load_checkpoint")
    size, step, shards, saes = meta["latent_size"], meta.get("step"), meta["shards"], meta.get("saes")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= lo for v, lo in ((size, 1), (step, 0))):
        raise ValueError(f"{file}: 'latent_size' must be a positive int and 'step' a non-negative int, got "
                         f"{size!r:.40} and {step!r:.40}")
    if shards != [shard_name(r, size) for r in range(size)]:
        raise ValueError(f"{file}: 'shards' must name the {size} shard files {shard_name(0, size)}..., "
                         f"got {shards!r:.200}")
    if not isinstance(saes, list) or not all(isinstance(c, dict) and isinstance(c.get("n"), int)
                                             and not isinstance(c.get("n"), bool) and c["n"] >= size for c in saes):
        raise ValueError(f"{file}: 'saes' must list each SAE's config with an int n >= latent_size, "
                         f"got {saes!r:.200}")
    return meta


def _shard_file(path: Path, latent_rank: int, meta: dict) -> Path:
    R = meta["latent_size"]
    if not 0 <= latent_rank < R:
        raise ValueError(f"{path} has {R} latent shards; there is no shard {latent_rank}")
    file = path / shard_name(latent_rank, R)
    if not file.is_file():
        raise FileNotFoundError(f"{path}: shard {latent_rank} of {R} ({file.name}) is missing")
    return file


def _check_shard_info(file: Path, info: dict, latent_rank: int, meta: dict) -> None:
    """ValueError naming ``file`` unless its safetensors metadata says it is shard ``latent_rank`` of ``meta``."""
    R, step = meta["latent_size"], meta["step"]
    if info.get("format") != FORMAT:
        raise ValueError(f"{file} is not a latent shard (metadata format {info.get('format')!r})")
    try:
        got = (int(info["latent_rank"]), int(info["latent_size"]), int(info["step"]))
        bounds = json.loads(info["bounds"])
    except (KeyError, ValueError, TypeError, RecursionError) as e:
        raise ValueError(f"{file}: malformed shard metadata ({type(e).__name__}: {e})") from None
    if got != (latent_rank, R, step):
        raise ValueError(f"{file} holds shard {got[0]} of {got[1]} at step {got[2]}, but the manifest expects "
                         f"shard {latent_rank} of {R} at step {step}: mismatched shards")
    want = [list(shard_bounds(c["n"], R)[latent_rank]) for c in meta["saes"]]
    if bounds != want:
        raise ValueError(f"{file} holds latents {info['bounds']} per SAE, but the manifest's SAEs "
                         f"(n={[c['n'] for c in meta['saes']]}) split over {R} ranks give {want}")


def read_shard(path: str | Path, latent_rank: int, meta: dict | None = None) -> dict[str, Tensor]:
    """Latent rank ``latent_rank``'s tensors of checkpoint ``path``, checked against the manifest (and finite)."""
    path = Path(path)
    meta = meta if meta is not None else read_meta(path)
    file = _shard_file(path, latent_rank, meta)
    try:
        with safe_open(str(file), framework="pt") as f:
            info = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, ValueError, RecursionError) as e:
        raise ckpt.CorruptCheckpoint(f"{file} cannot be read, a truncated or damaged shard: {e}") from None
    _check_shard_info(file, info, latent_rank, meta)
    ckpt.check_finite(tensors, file)
    return tensors


def verify(path: str | Path) -> None:
    """Check that the sharded checkpoint ``path`` is complete and its files parse (the manifest, and each shard's
    header and metadata; its tensors are not read). Raises as :func:`read_shard` does."""
    path = Path(path)
    meta = read_meta(path)
    for r in range(meta["latent_size"]):
        file = _shard_file(path, r, meta)
        try:
            with safe_open(str(file), framework="pt") as f:
                info = f.metadata() or {}
        except (SafetensorError, ValueError, RecursionError) as e:
            raise ckpt.CorruptCheckpoint(f"{file} cannot be read, a truncated or damaged shard: {e}") from None
        _check_shard_info(file, info, r, meta)


def load_merged(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """``(tensors, manifest)``: every shard of ``path`` joined along the latent axis (replicated tensors taken from
    shard 0, after checking that every shard holds the same values), named as a single-process checkpoint."""
    path = Path(path)
    meta = read_meta(path)
    shards = [read_shard(path, r, meta) for r in range(int(meta["latent_size"]))]
    names = set(shards[0])
    for r, s in enumerate(shards[1:], 1):
        if set(s) != names:
            raise ValueError(f"{path}: shard {r} holds tensors {sorted(set(s) ^ names)} that shard 0 does not "
                             "(or the other way round): mismatched shards")
    merged = {}
    for name in sorted(names):
        parts = [s[name] for s in shards]
        if _REPLICATED.match(name) or parts[0].dim() == 0:
            if not all(torch.equal(parts[0], p) for p in parts[1:]) and not name.startswith("rng."):
                raise ValueError(f"{path}: the replicated tensor {name} differs between shards")
            merged[name] = parts[0]
        else:
            try:
                merged[name] = torch.cat(parts)
            except RuntimeError as e:  # shapes that do not join along the latent axis
                raise ValueError(f"{path}: the shards' {name} do not join ({e})") from None
    return merged, meta


def load_saes(path: str | Path) -> list[TopKSAE]:
    """The SAEs of a sharded checkpoint as full :class:`TopKSAE` s, the norm factor folded into the biases (so
    they run on raw activations, as the trainer returns them)."""
    tensors, meta = load_merged(path)
    ckpt.check_meta(meta, path)
    s = meta["norm_factor"] or 1.0
    saes = []
    for i, cfg in enumerate(meta["saes"]):
        try:
            params = {p: tensors[f"sae.{i}.{p}"] for p in PARAMS}
            params["b_enc"], params["b_dec"] = params["b_enc"] * s, params["b_dec"] * s
            cfg = {**cfg, "meta": {**cfg.get("meta", {}), "norm_factor": float(s), "norm_factor_folded": True,
                                   "trained_steps": meta["step"], "trained_tokens": meta["tokens_seen"]}}
            saes.append(TopKSAE.from_state(cfg, params))
        except (KeyError, TypeError, RuntimeError, ValueError) as e:  # a missing tensor, a malformed config
            raise ValueError(f"{Path(path) / ckpt.META_FILE}: SAE {i} cannot be rebuilt from the checkpoint "
                             f"({type(e).__name__}: {e})") from None
    return saes


def export(path: str | Path, out_dir: str | Path, format: str = "dlmscope") -> list[Path]:
    """Write each SAE of the sharded checkpoint ``path`` to ``out_dir/sae_{i}`` in ``format`` (any of
    :data:`dlmscope.sae.formats.FORMATS`); returns the directories. Every target is checked before any is
    written: one holding anything but a previous SAE checkpoint refuses the whole export (``FileExistsError``)."""
    saes = load_saes(path)
    targets = [Path(out_dir) / f"sae_{i}" for i in range(len(saes))]
    for target in targets:
        formats.check_target(target)
    return [sae.save(target, format) for sae, target in zip(saes, targets)]
