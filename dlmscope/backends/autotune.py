"""Per-shape choice between implementations of one op, measured once on the machine and cached.

The fused Triton encoder is not faster than cuBLAS + ``topk`` at every shape (it spills at k ≥ 256:
``benchmarks/results/sm90-encoder-compile.md``). So on a GPU the ``triton`` backend's encoder times its
candidates — the fused kernel, the ``chunked`` GEMM + top-k path and plain ``torch`` — the first time it meets a
shape, keeps the fastest in a small JSON table (``$DLMSCOPE_AUTOTUNE_CACHE``, default
``~/.cache/dlmscope/autotune.json``, written atomically) and uses it from then on: first contact with a GPU is
never slower than plain torch. ``DLMSCOPE_AUTOTUNE=0`` turns the measurement off (the first candidate, the fused
kernel, is used). Nothing is timed while ``torch.compile`` traces or a CUDA graph is being captured.
"""
from __future__ import annotations

import functools
import json
import os
import statistics
import time
from collections.abc import Callable, Mapping

import torch

from dlmscope.util import atomic

__all__ = ["enabled", "cache_path", "shape_key", "choose", "cuda_timer"]

_TABLE: dict[str, str] | None = None


def enabled() -> bool:
    if os.environ.get("DLMSCOPE_AUTOTUNE", "1") in ("0", ""):
        return False
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)()
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return not compiling and not capturing


def cache_path() -> str:
    return os.environ.get("DLMSCOPE_AUTOTUNE_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "dlmscope", "autotune.json"))


def _table() -> dict[str, str]:
    global _TABLE
    if _TABLE is None:
        try:
            with open(cache_path()) as f:
                _TABLE = dict(json.load(f))
        except (OSError, ValueError):
            _TABLE = {}
    return _TABLE


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def shape_key(op: str, x: torch.Tensor, n: int, k: int) -> str:
    """``op|device|dtype|B bucket|d|n|k``; B rounded up to a power of two (the choice rarely flips between)."""
    device = _device_name(x.device)
    B = max(1, x.shape[0])
    return f"{op}|{device}|{str(x.dtype).replace('torch.', '')}|B{1 << (B - 1).bit_length()}|d{x.shape[-1]}|n{n}|k{k}"


def cuda_timer(fn: Callable[[], object], rounds: int = 3) -> float:
    """Median seconds of ``fn`` after one warm-up call (which compiles), synchronised around each call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def choose(key: str, candidates: Mapping[str, Callable[[], object]], *, timer: Callable = cuda_timer) -> str:
    """The cached choice for ``key``, or the fastest of ``candidates`` (name -> a call that runs it on the real
    inputs), timed now and stored. A candidate that raises (e.g. out of memory) is skipped; if every one
    raises, the first is returned and nothing is stored."""
    table = _table()
    if key in table and table[key] in candidates:
        return table[key]
    times = {}
    for name, fn in candidates.items():
        try:
            times[name] = timer(fn)
        except Exception:                                   # noqa: BLE001 - a candidate that fails is not chosen
            continue
    if not times:
        return next(iter(candidates))
    best = min(times, key=times.get)
    table[key] = best
    try:
        os.makedirs(os.path.dirname(cache_path()) or ".", exist_ok=True)
        atomic.write_json(cache_path(), table)
    except OSError:
        pass                                               # a read-only home: the choice still holds this run
    return best
