"""Trainer checkpoints: a directory ``step-000000123/`` holding ``state.safetensors`` + ``meta.json``.

Each checkpoint is written through :func:`dlmscope.util.atomic.atomic_directory`: into a hidden temp sibling, fsynced,
then put at its name (swapped in atomically when re-writing an existing step). So at every instant a ``step-*``
directory is a complete checkpoint, the old or the new one. Checkpoints beyond the ``keep`` newest are pruned only
after the new one is in place, each vanishing in one rename; hidden leftovers of crashed writes of any step are
swept just before (:func:`dlmscope.util.atomic.sweep_leftovers`). One writer per directory (under DDP, rank 0).
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from dlmscope.util import atomic

STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}"


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

    ``meta`` (JSON-able) is stored with ``"step": step`` added.
    """
    directory = Path(directory)
    target = directory / checkpoint_name(step)
    cpu = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    with atomic.atomic_directory(target) as tmp:
        # plain writes: atomic_directory fsyncs the tree before putting it in place
        save_file(cpu, str(tmp / STATE_FILE))
        atomic.crash_point("checkpoint:state-written")
        atomic.write_json(tmp / META_FILE, {**meta, "step": step}, durable=False)
    found = list_checkpoints(directory)  # rolls back any interrupted fallback rewrite first
    # leftovers of crashed writes of any step (one writer), swept while every step's directory is still there: a
    # stale .old of a step pruned below would otherwise outlive it, and be restored as that step by a later reader
    atomic.sweep_leftovers(directory, _NAME.match)
    for old in found[:-keep] if keep > 0 else []:
        if old != target:
            atomic.remove_directory(old)
            atomic.crash_point("checkpoint:pruned")
    return target


def load_checkpoint(path: str | Path, device: torch.device | str | None = None) -> tuple[dict[str, Tensor], dict]:
    """(tensors, meta) of the checkpoint directory ``path``."""
    path = Path(path)
    if not (path / STATE_FILE).is_file() or not (path / META_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a dlmscope trainer checkpoint (needs {STATE_FILE} and {META_FILE})")
    tensors = load_file(str(path / STATE_FILE), device=str(device) if device is not None else "cpu")
    meta = json.loads((path / META_FILE).read_text())
    return tensors, meta


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


def set_rng_state(tensors: dict[str, Tensor], meta: dict) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only for devices present)."""
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"].to("cpu", torch.uint8))
    cuda = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in tensors.items() if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        for i, state in cuda[:torch.cuda.device_count()]:
            torch.cuda.set_rng_state(state.to("cpu", torch.uint8), i)
    if "python" in meta:
        py = _from_jsonable(meta["python"])
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in meta:
        np.random.set_state(_from_jsonable(meta["numpy"]))
