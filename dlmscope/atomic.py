"""Atomic single-file writes (temp file in the same directory, fsync, rename): a crash never leaves half a file.

Directory-level checkpoints build on these in ``dlmscope.formats._atomic`` and ``dlmscope.checkpoint``.
"""
from __future__ import annotations

import json
import os

from torch import Tensor


def _tmp_path(path: str) -> str:
    return os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    path = os.fspath(path)
    tmp = _tmp_path(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_safetensors(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to the safetensors file ``path`` atomically."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    tmp = _tmp_path(path)
    save_file(tensors, tmp, metadata=metadata or {"format": "pt"})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
