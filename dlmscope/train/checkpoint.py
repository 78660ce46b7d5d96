"""Trainer checkpoints: a directory ``step-000000123/`` holding ``state.safetensors`` + ``meta.json``.

Each checkpoint is written through :func:`dlmscope.util.atomic.atomic_directory`: into a hidden temp sibling, fsynced,
then put at its name (swapped in atomically when re-writing an existing step). So at every instant a ``step-*``
directory is a complete checkpoint, the old or the new one. Checkpoints beyond the ``keep`` newest are pruned only
after the new one is in place, each vanishing in one rename; hidden leftovers of crashed writes of any step are
swept just before (:func:`dlmscope.util.atomic.sweep_leftovers`). One writer per directory (under DDP, rank 0).
A state holding NaN or Inf is never written (it would replace the last good checkpoint); a failed write raises an
``OSError`` with its errno that names the folder and the checkpoint left in place.

Reading checks what it reads: a missing file is ``FileNotFoundError``; a file that cannot be parsed (a truncated
safetensors file, ``meta.json`` that is not a JSON object) is :class:`CorruptCheckpoint` (a ``ValueError``), which a
resume skips for the newest intact checkpoint; NaN or Inf tensors are a ``ValueError`` naming the file and tensor.

A run's identity (:func:`run_fields`, :func:`run_identity`): the fields that decide what a run trains (recipe,
SAEs, world size, data), stored in each checkpoint's meta under ``"run"``, so that a resume refuses another run's
checkpoint naming what differs (:func:`check_identity`) and a fresh run refuses a folder holding checkpoints
already (:func:`checkpoint_dir_problem`). :func:`check_meta` / :func:`check_tensors` validate what a resume reads.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from dlmscope.util import atomic
from dlmscope.util.identity import differences
from .arch_step import extra_state, set_extra_state

__all__ = ["STATE_FILE", "META_FILE", "CorruptCheckpoint", "checkpoint_name", "checkpoint_step", "list_checkpoints",
           "latest_checkpoint", "save_checkpoint", "write_error", "load_checkpoint", "read_meta", "check_finite",
           "RUN_IDENTITY_IGNORES", "TRAINER_META", "SAE_IDENTITY",
           "run_fields", "run_identity", "saved_run_fields", "run_differences", "check_identity",
           "checkpoint_dir_problem", "check_meta", "check_tensors", "newest_intact", "state_tensors", "check_state",
           "set_state", "rng_state", "set_rng_state"]

STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
_NAME = re.compile(r"^step-(\d+)$")


class CorruptCheckpoint(ValueError):
    """A checkpoint file that cannot be parsed: truncated, damaged, or not the JSON object / safetensors it must be."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}"


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a checkpoint directory named ``step-N``, or None for any other name."""
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints under ``directory``, oldest first (hidden temp / old siblings are not checkpoints).

    A re-write of an existing step interrupted between the two renames of the fallback path is rolled back first,
    so its step is listed with the previous contents.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    for p in list(directory.iterdir()):
        name = atomic.leftover_target(p)
        if name is not None and _NAME.match(name) and p.name.endswith(atomic.OLD_MARKER):
            atomic.restore_directory(directory / name)
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The most recent complete checkpoint under ``directory``, or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def save_checkpoint(directory: str | Path, step: int, tensors: dict[str, Tensor], meta: dict, *,
                    keep: int = 1) -> Path:
    """Atomically write checkpoint ``step`` under ``directory``; returns its path. Keeps the ``keep`` newest.

    ``meta`` (JSON-able) is stored with ``"step": step`` added. Non-finite floating tensors raise ``ValueError``
    before anything is written; a failed write raises an ``OSError`` (same errno) naming the checkpoint kept.
    """
    directory = Path(directory)
    target = directory / checkpoint_name(step)
    cpu = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    bad = _non_finite(cpu)
    if bad is not None:
        raise ValueError(f"refusing to write checkpoint step {step} to {directory}: tensor {bad!r} holds NaN or Inf "
                         "(the training diverged); the previous checkpoint is kept")
    try:
        with atomic.atomic_directory(target) as tmp:
            # plain writes: atomic_directory fsyncs the tree before putting it in place
            save_file(cpu, str(tmp / STATE_FILE))
            atomic.crash_point("checkpoint:state-written")
            atomic.write_json(tmp / META_FILE, {**meta, "step": step}, durable=False)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as SafetensorError "(os error 28)"
        try:
            kept = latest_checkpoint(directory)
        except OSError:  # an unreadable folder: say nothing about what it holds
            kept = None
        raise write_error(e, f"cannot write checkpoint step {step} to {directory}",
                          f"the last checkpoint {kept} is intact" if kept else "no earlier checkpoint") from e
    found = list_checkpoints(directory)  # rolls back any interrupted fallback rewrite first
    # leftovers of crashed writes of any step (one writer), swept while every step's directory is still there: a
    # stale .old of a step pruned below would otherwise outlive it, and be restored as that step by a later reader
    atomic.sweep_leftovers(directory, _NAME.match)
    for old in found[:-keep] if keep > 0 else []:
        if old != target:
            atomic.remove_directory(old)
            atomic.crash_point("checkpoint:pruned")
    return target


def write_error(error: OSError | SafetensorError, what: str, after: str) -> OSError:
    """An ``OSError`` "``what`` (the reason); ``after``" with ``error``'s errno (safetensors' SafetensorError carries
    it only in its text, "os error N")."""
    if isinstance(error, OSError):
        code, reason = error.errno, error.strerror or str(error)
    else:
        code, reason = next(map(int, re.findall(r"os error (\d+)", str(error))), None), str(error)
    return OSError(code, f"{what} ({reason}); {after}", getattr(error, "filename", None))


def load_checkpoint(path: str | Path, device: torch.device | str | None = None) -> tuple[dict[str, Tensor], dict]:
    """(tensors, meta) of the checkpoint directory ``path``: ``FileNotFoundError`` for a missing file,
    :class:`CorruptCheckpoint` for one that cannot be parsed, ``ValueError`` for NaN / Inf tensors."""
    path = Path(path)
    missing = [str(path / name) for name in (STATE_FILE, META_FILE) if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a dlmscope trainer checkpoint (needs {STATE_FILE} and {META_FILE}): "
                                f"{' and '.join(missing)} missing")
    meta = read_meta(path)
    state = path / STATE_FILE
    try:
        tensors = load_file(str(state))  # on CPU first: a device error is not the file's fault
    except (SafetensorError, ValueError, RecursionError) as e:
        raise CorruptCheckpoint(f"{state} cannot be read, a truncated or damaged checkpoint: {e}") from None
    check_finite(tensors, state)
    if device is not None:
        tensors = {name: t.to(device) for name, t in tensors.items()}
    return tensors, meta


def read_meta(path: str | Path) -> dict:
    """The ``meta.json`` of checkpoint directory ``path`` (a JSON object); :class:`CorruptCheckpoint` otherwise."""
    file = Path(path) / META_FILE
    try:
        meta = atomic.read_json(file, "not valid JSON", error=CorruptCheckpoint)
    except FileNotFoundError:
        raise FileNotFoundError(f"{file} is missing: {Path(path)} is not a complete checkpoint") from None
    if not isinstance(meta, dict):
        raise CorruptCheckpoint(f"{file} holds a JSON {type(meta).__name__}, not the object of a checkpoint's meta")
    return meta


def _non_finite(tensors: dict[str, Tensor]) -> str | None:
    return next((name for name, t in tensors.items()
                 if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)


def check_finite(tensors: dict[str, Tensor], file: str | Path) -> None:
    """``ValueError`` naming ``file`` and the tensor if any floating tensor holds NaN or Inf."""
    bad = _non_finite(tensors)
    if bad is not None:
        raise ValueError(f"{file}: tensor {bad!r} holds NaN or Inf; refusing to resume from it (the run diverged "
                         "before this checkpoint, or the file is damaged): resume from an earlier checkpoint")


# ---- a run's identity ---------------------------------------------------------------------------------------

#: TrainConfig fields that are not part of a run's identity: where and how often its state is written, and which
#: kernels compute the same maths; a resume may change them
RUN_IDENTITY_IGNORES = ("checkpoint_dir", "checkpoint_every", "backend", "group_encoders", "nan_check")
#: SAEConfig.meta keys the trainer writes itself when a run ends (not the SAE's provenance)
TRAINER_META = ("norm_factor", "norm_factor_folded", "trained_tokens", "trained_steps")
#: the keys of an SAE's description that join a run's identity (besides its meta)
SAE_IDENTITY = ("d", "n", "k", "dtype", "arch", "prefixes", "threshold_beta")


def run_fields(config: dict, saes: list[dict], world_size: int | None, data=None) -> dict:
    """A run's identity fields, as plain JSON: the trainer ``config`` (less :data:`RUN_IDENTITY_IGNORES`), each
    SAE's ``d, n, k``, ``dtype``, ``arch``, ``prefixes``, ``threshold_beta`` (each where given: a Top-K SAE's
    config names no arch) and ``meta`` (less :data:`TRAINER_META`), the world size and ``data`` (what the caller
    says the stream is). Entries absent from the inputs stay absent."""
    out = {"config": {k: v for k, v in config.items() if k not in RUN_IDENTITY_IGNORES},
           "saes": [{**{k: c[k] for k in SAE_IDENTITY if k in c},
                     "meta": {k: v for k, v in c.get("meta", {}).items() if k not in TRAINER_META}} for c in saes]}
    if world_size is not None:
        out["world_size"] = world_size
    if data is not None:
        out["data"] = data
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def run_identity(fields: dict) -> str:
    """A short hash of a run's identity ``fields`` (JSON-able; equal fields give equal hashes)."""
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def saved_run_fields(meta: dict, path: str | Path) -> tuple[dict, bool]:
    """``(fields, legacy)``: the identity a checkpoint's ``meta`` records; ``legacy`` when it was written before
    runs had one (rebuilt from its config and SAEs: only the fields it holds can be compared)."""
    run = meta.get("run")
    if run is not None:
        if not isinstance(run, dict) or not isinstance(run.get("fields"), dict):
            raise ValueError(f"{Path(path) / META_FILE}: malformed run identity 'run' ({run!r:.100})")
        return run["fields"], False
    return run_fields(meta["config"], meta["saes"], meta.get("world_size")), True


def run_differences(ours: dict, saved: dict, *, only_shared: bool = False) -> list[str]:
    """``"key: <ours> here, <saved> in the checkpoint"`` for every leaf of two runs' identity fields that differs
    (nested keys joined by dots). ``only_shared``: compare only the keys both hold (a legacy checkpoint)."""
    return [f"{k}: {a!r} here, {b!r} in the checkpoint"
            for k, a, b in differences(ours, saved, only_shared=only_shared)]


def check_identity(fields: dict, meta: dict, path: str | Path) -> None:
    """Refuse (ValueError naming what differs) checkpoint ``path`` unless it was written by the run ``fields``."""
    saved, legacy = saved_run_fields(meta, path)
    diffs = run_differences(fields, saved, only_shared=legacy)
    if diffs:
        shown = "; ".join(diffs[:10]) + (f"; and {len(diffs) - 10} more" if len(diffs) > 10 else "")
        raise ValueError(f"checkpoint {path} belongs to another run, refusing to resume it: {shown}. Resume with "
                         "that run's settings, or start a fresh run in another checkpoint_dir")


def _same_run(fields: dict, path: Path) -> bool | None:
    """Whether checkpoint ``path`` is the run ``fields``'; None when its meta cannot be read (a damaged checkpoint:
    a resume skips it and a later save prunes it)."""
    try:
        check_identity(fields, read_meta(path), path)
    except (CorruptCheckpoint, FileNotFoundError, KeyError, TypeError, AttributeError):
        return None
    except ValueError:
        return False
    return True


def checkpoint_dir_problem(directory: str | Path, fields: dict, resumed: Path | None) -> str | None:
    """Why the run ``fields`` may not write checkpoints into ``directory`` (None when it may): a fresh run
    (``resumed`` None) any checkpoint there, a resume from ``resumed`` those of another run."""
    directory = Path(directory)
    found = list_checkpoints(directory)
    if resumed is None:
        if not found:
            return None
        whose = "a run with these same settings" if all(_same_run(fields, p) for p in found) else "another run"
        return (f"{directory} already holds checkpoints of {whose} ({', '.join(p.name for p in found)}). A fresh "
                "run there would leave them beside its own, and a later resume would continue them. Pass "
                "resume=True (dlmscope train --resume) to continue that run, use another checkpoint folder, or move "
                "them out first")
    others = [p.name for p in found if p.resolve() != Path(resumed).resolve() and _same_run(fields, p) is False]
    if others:
        return (f"{directory} holds checkpoints of another run ({', '.join(others)}): resuming {resumed} there "
                "would mix the two runs. Resume into another checkpoint folder, or move them out first")
    return None


# ---- validation of what a resume reads ------------------------------------------------------------------------


def check_meta(meta: dict, path: str | Path) -> None:
    """ValueError naming ``path`` unless ``meta`` holds a trainer checkpoint's fields with their types."""
    where = f"checkpoint {path}"
    missing = [k for k in ("step", "total_steps", "tokens_seen", "batches_consumed", "norm_factor", "config", "saes")
               if k not in meta]
    if missing:
        raise ValueError(f"{where}: {META_FILE} lacks {missing}")
    for key in ("step", "total_steps", "tokens_seen", "batches_consumed"):
        value = meta[key]
        if not (value is None and key == "total_steps") and (isinstance(value, bool) or not isinstance(value, int)
                                                                or value < 0):
            raise ValueError(f"{where}: meta {key!r} must be a non-negative int, got {value!r:.60}")
    norm = meta["norm_factor"]
    if norm is not None and (isinstance(norm, bool) or not isinstance(norm, (int, float)) or not math.isfinite(norm)
                             or norm <= 0):
        raise ValueError(f"{where}: meta 'norm_factor' must be a finite positive number or null, got {norm!r:.60}")
    for key, kind in (("config", dict), ("saes", list), ("rng", dict)):
        if key in meta and not isinstance(meta[key], kind):
            raise ValueError(f"{where}: meta {key!r} must be a JSON {kind.__name__}, got {meta[key]!r:.60}")
    if not all(isinstance(c, dict) and all(isinstance(c.get(x), int) for x in "dnk") for c in meta["saes"]):
        raise ValueError(f"{where}: meta 'saes' must list each SAE's config with int d, n, k, "
                         f"got {meta['saes']!r:.100}")


def check_tensors(tensors: dict[str, Tensor], expected: dict[str, Tensor], path: str | Path) -> None:
    """ValueError naming ``path`` unless ``tensors`` holds each of ``expected`` with its shape and dtype."""
    for name, ref in expected.items():
        got = tensors.get(name)
        if got is None:
            raise ValueError(f"checkpoint {path}: tensor {name!r} is missing")
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise ValueError(f"checkpoint {path}: tensor {name!r} is {got.dtype} {list(got.shape)}, expected "
                             f"{ref.dtype} {list(ref.shape)}")


def newest_intact(directory: str | Path) -> tuple[Path, dict[str, Tensor], dict] | None:
    """``(path, tensors, meta)`` of the newest checkpoint under ``directory`` whose files read, or None when there
    is none. Newer ones that do not read (:class:`CorruptCheckpoint`, a missing file) are skipped with a warning
    naming them; when no checkpoint reads, ``ValueError`` names them all. NaN tensors are not skipped: they raise."""
    skipped = []
    for path in reversed(list_checkpoints(directory)):
        try:
            return (path, *load_checkpoint(path))
        except (CorruptCheckpoint, FileNotFoundError) as e:
            warnings.warn(f"skipping damaged checkpoint {path}: {e}", stacklevel=3)
            skipped.append(str(e))
    if skipped:
        raise ValueError(f"no intact checkpoint to resume in {directory}: {'; '.join(skipped)}. Move the damaged "
                         "ones out of the folder to start afresh there")
    return None


# ---- the trainer's state, by name -----------------------------------------------------------------------------


def state_tensors(saes: list, optimizers: list, groups: list) -> dict[str, Tensor]:
    """Everything that determines a trainer's next step, by name: ``sae.{i}.{param}`` (every trained parameter,
    ``optimizer.params``, and the architecture's state, :func:`~dlmscope.train.arch_step.extra_state`),
    ``adam.{i}.{j}.{key}``, ``dec.{i}.exp_avg(_sq)``, ``dead.{i}`` (tokens since each latent fired); ``i`` indexes
    the SAEs, ``j`` the optimiser's ``adam_names`` (:data:`~dlmscope.train.step.ADAM_PARAMS` for Top-K)."""
    tensors: dict[str, Tensor] = {}
    for i, (s, optimizer) in enumerate(zip(saes, optimizers)):
        for p in optimizer.params:
            tensors[f"sae.{i}.{p}"] = getattr(s, p).detach()
        for name, value in extra_state(s).items():
            tensors[f"sae.{i}.{name}"] = value
        for j, pstate in optimizer.adam.state_dict()["state"].items():
            for key, value in pstate.items():
                tensors[f"adam.{i}.{j}.{key}"] = value if isinstance(value, Tensor) else torch.tensor(value)
        tensors[f"dec.{i}.exp_avg"] = optimizer.dec_exp_avg
        tensors[f"dec.{i}.exp_avg_sq"] = optimizer.dec_exp_avg_sq
    for group in groups:
        for j, i in enumerate(group.members):
            tensors[f"dead.{i}"] = group.since[group.latents(j)]
    return tensors


def check_state(tensors: dict[str, Tensor], saes: list, optimizers: list, groups: list, path: str | Path) -> None:
    """ValueError naming ``path`` unless ``tensors`` holds the names of :func:`state_tensors` with their shapes and
    dtypes (an SAE's Adam state is absent before its first step, then complete) and the torch RNG state."""
    expected = {name: t for name, t in state_tensors(saes, optimizers, groups).items() if not name.startswith("adam.")}
    for i, (s, optimizer) in enumerate(zip(saes, optimizers)):
        for j, param in enumerate(optimizer.adam_names):
            prefix = f"adam.{i}.{j}."
            if any(k.startswith(prefix) for k in tensors):
                p = getattr(s, param)
                expected.update({prefix + "exp_avg": p, prefix + "exp_avg_sq": p,
                                 prefix + "step": torch.zeros((), dtype=torch.float32)})
    check_tensors(tensors, {**expected, "rng.torch": torch.get_rng_state()}, path)


@torch.no_grad()
def set_state(tensors: dict[str, Tensor], saes: list, optimizers: list, groups: list) -> None:
    """Copy a state checked by :func:`check_state` into the SAEs, their optimisers and the dead counters."""
    for i, (s, optimizer) in enumerate(zip(saes, optimizers)):
        for p in optimizer.params:
            getattr(s, p).copy_(tensors[f"sae.{i}.{p}"])
        set_extra_state(s, {name: tensors[f"sae.{i}.{name}"] for name in extra_state(s)})
        sd = optimizer.adam.state_dict()
        state = {}
        for j in range(len(optimizer.adam_names)):
            prefix = f"adam.{i}.{j}."
            entry = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
            if entry:
                state[j] = entry
        sd["state"] = state
        optimizer.adam.load_state_dict(sd)
        optimizer.dec_exp_avg.copy_(tensors[f"dec.{i}.exp_avg"])
        optimizer.dec_exp_avg_sq.copy_(tensors[f"dec.{i}.exp_avg_sq"])
    for group in groups:
        group.since = torch.cat([tensors[f"dead.{i}"] for i in group.members]).to(group.device)


# ---- RNG state ----------------------------------------------------------------------------------------------


def _to_jsonable(obj):
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, (tuple, list)):
        return [_to_jsonable(o) for o in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


def _from_jsonable(obj):
    if isinstance(obj, dict) and "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if isinstance(obj, list):
        return tuple(_from_jsonable(o) for o in obj)
    return obj


def rng_state() -> tuple[dict[str, Tensor], dict]:
    """The process's RNG states: torch CPU / CUDA (tensors) and python / numpy (JSON-able)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    return tensors, {"python": _to_jsonable(random.getstate()), "numpy": _to_jsonable(np.random.get_state())}


def set_rng_state(tensors: dict[str, Tensor], meta: dict, source: str | Path = "the checkpoint") -> None:
    """Restore what :func:`rng_state` captured (CUDA states only for devices present). Every state is parsed
    before any is set; a malformed one raises ``ValueError`` naming ``source``."""
    try:
        torch_state = tensors["rng.torch"].to("cpu", torch.uint8) if "rng.torch" in tensors else None
        cuda = sorted((int(k.rsplit(".", 1)[1]), v.to("cpu", torch.uint8))
                      for k, v in tensors.items() if k.startswith("rng.cuda."))
        py = None
        if "python" in meta:
            py = _from_jsonable(meta["python"])
            py = (py[0], tuple(py[1]), py[2])
            random.Random().setstate(py)  # validates without touching the process's generator
        np_state = _from_jsonable(meta["numpy"]) if "numpy" in meta else None
        if np_state is not None:
            np.random.RandomState().set_state(np_state)
        if torch_state is not None:
            torch.Generator().set_state(torch_state)
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as e:
        raise ValueError(f"{source}: malformed RNG state ({type(e).__name__}: {e})") from None
    if torch_state is not None:
        torch.set_rng_state(torch_state)
    if cuda and torch.cuda.is_available():
        for i, state in cuda[:torch.cuda.device_count()]:
            torch.cuda.set_rng_state(state, i)
    if py is not None:
        random.setstate(py)
    if np_state is not None:
        np.random.set_state(np_state)
