"""The one binding of ``libdlmscope_cuda.so`` (csrc/cuda, built by ``make cuda``): ctypes signatures of its C API
(``csrc/cuda/dlmscope_cuda.h``) and calls that take torch tensors and enqueue on the current CUDA stream.

The library is plain CUDA with static cudart, so it needs neither torch headers nor a build on the GPU machine:
a library compiled anywhere with nvcc (sm_80 / sm_90 and PTX) loads where the driver can run it. Tensors arrive
contiguous and validated (``dlmscope.ops``); sizes must fit the C API's int64 arguments.
"""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch
from torch import Tensor

LIB_ENV = "DLMSCOPE_CUDA_LIB"
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "libdlmscope_cuda.so"
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_p, _i64, _int, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "dlm_error_string": ([_int], ctypes.c_char_p),
    "dlm_device_count": ([], _int),
    "dlm_set_device": ([_int], _int),
    "dlm_topk_select": ([_p, _int, _i64, _i64, _i64, _p, _p, _i64, _i64, _p, _p, _i64, _i64, _p], _int),
    "dlm_gather_accumulate": ([_p, _p, _p, _p, _int, _i64, _i64, _i64, _p], _int),
    "dlm_sddmm": ([_p, _p, _p, _p, _int, _i64, _i64, _i64, _p], _int),
    "dlm_sort_workspace_bytes": ([_i64, _i64], _i64),
    "dlm_sort_by_latent": ([_p, _i64, _i64, _p, _p, _p, _p, _p, _i64, _p], _int),
    "dlm_transpose_reduce_partials": ([_i64, _i64, _i64], _i64),
    "dlm_transpose_reduce": ([_p, _p, _p, _p, _p, _p, _p, _p, _p, _p, _int, _i64, _i64, _i64, _i64, _i64, _p], _int),
    "dlm_decoder_norm_step": ([_p, _p, _p, _p, _int, _i64, _i64, _f32, _f32, _f32, _f32, _f32, _f32, _p], _int),
}


def library_path() -> Path:
    return Path(os.environ.get(LIB_ENV) or DEFAULT_PATH)


@functools.lru_cache(maxsize=None)
def load() -> ctypes.CDLL:
    """The loaded library with its signatures; OSError (naming the path and ``make cuda``) when it is absent."""
    path = library_path()
    if not path.exists():
        raise OSError(f"{path} not found: build the CUDA kernels with `make cuda` (needs nvcc) or set ${LIB_ENV}")
    lib = ctypes.CDLL(str(path))
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def _check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"dlmscope CUDA kernel {what} failed: {load().dlm_error_string(code).decode()} ({code})")


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _stream(t: Tensor) -> int:
    """The current stream of ``t``'s device, with that device made current for the library's own runtime."""
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    _check(load().dlm_set_device(index), "set_device")
    return torch.cuda.current_stream(t.device).cuda_stream


def usable() -> bool:
    """Whether the library loads and its runtime sees a device (False, e.g., on a driver older than its CUDA)."""
    try:
        return load().dlm_device_count() > 0
    except OSError:
        return False


def dtype_code(t: Tensor) -> int:
    try:
        return _DTYPES[t.dtype]
    except KeyError:
        raise TypeError(f"the cuda kernels take float32, float16 or bfloat16, got {t.dtype}") from None


def topk_select(pre: Tensor, k: int, out_vals: Tensor, out_ids: Tensor, col_offset: int = 0, id_offset: int = 0,
                keep: Tensor | None = None, in_ids: Tensor | None = None) -> None:
    """Top-k of relu(pre) per row (``pre [rows, cols]`` with unit column stride) into
    ``out_vals[:, col_offset:col_offset + k]`` (float32) and ``out_ids`` (int64, rows of the same length);
    ids are ``in_ids[row, j]`` if given, else ``id_offset + j``; ``keep [cols]`` bool zeroes where False."""
    rows, cols = pre.shape
    keep_u8 = None if keep is None else keep.to(torch.uint8).contiguous()
    _check(load().dlm_topk_select(_ptr(pre), dtype_code(pre), rows, cols, pre.stride(0), _ptr(keep_u8),
                                  _ptr(in_ids), id_offset, k, _ptr(out_vals), _ptr(out_ids), out_vals.stride(0),
                                  col_offset, _stream(pre)), "topk_select")


def gather_accumulate(coef: Tensor, idx: Tensor, W: Tensor) -> Tensor:
    B, k = idx.shape
    out = torch.empty((B, W.shape[1]), dtype=W.dtype, device=W.device)
    _check(load().dlm_gather_accumulate(_ptr(coef), _ptr(idx), _ptr(W), _ptr(out), dtype_code(W), B, k, W.shape[1],
                                        _stream(W)), "gather_accumulate")
    return out


def sddmm(G: Tensor, idx: Tensor, W: Tensor) -> Tensor:
    B, k = idx.shape
    out = torch.empty((B, k), dtype=G.dtype, device=G.device)
    _check(load().dlm_sddmm(_ptr(G), _ptr(idx), _ptr(W), _ptr(out), dtype_code(G), B, k, G.shape[1], _stream(G)),
           "sddmm")
    return out


def sort_by_latent(idx: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """(sorted_ids [B*k], perm [B*k] flat positions, starts [n + 1]) of a stable sort of ``idx`` by latent."""
    count = idx.numel()
    lib = load()
    sorted_ids = torch.empty(count, dtype=torch.int64, device=idx.device)
    perm = torch.empty_like(sorted_ids)
    perm_tmp = torch.empty_like(sorted_ids)
    starts = torch.empty(n + 1, dtype=torch.int64, device=idx.device)
    ws_bytes = lib.dlm_sort_workspace_bytes(count, n)
    if ws_bytes < 0:
        _check(-ws_bytes, "sort_workspace_bytes")
    workspace = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=idx.device)
    _check(lib.dlm_sort_by_latent(_ptr(idx), count, n, _ptr(sorted_ids), _ptr(perm), _ptr(starts), _ptr(perm_tmp),
                                  _ptr(workspace), ws_bytes, _stream(idx)), "sort_by_latent")
    return sorted_ids, perm, starts


def reduce_chunk(count: int, device: torch.device) -> int:
    """Sorted entries per block of the transpose-reduce: about 8 blocks per SM, at least 64."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(64, -(-count // (8 * sms)))


def transpose_reduce(coef: Tensor, layout: tuple[Tensor, Tensor, Tensor], X: Tensor, n: int,
                     W: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(out [n, d], coef_sum [n], sddmm [B, k] or None) over a :func:`sort_by_latent` layout; with ``W`` also
    ``sddmm[b, j] = <X[b], W[idx[b, j]]>``."""
    B, k = coef.shape
    d = X.shape[1]
    sorted_ids, perm, starts = layout
    out = torch.empty((n, d), dtype=X.dtype, device=X.device)
    coef_sum = torch.empty(n, dtype=X.dtype, device=X.device)
    sd = torch.empty((B, k), dtype=X.dtype, device=X.device) if W is not None else None
    lib = load()
    chunk = reduce_chunk(B * k, X.device)
    partials = torch.empty(max(lib.dlm_transpose_reduce_partials(B * k, chunk, d), 1), dtype=torch.float32,
                           device=X.device)
    _check(lib.dlm_transpose_reduce(_ptr(coef), _ptr(sorted_ids), _ptr(perm), _ptr(starts), _ptr(X), _ptr(W),
                                    _ptr(out), _ptr(coef_sum), _ptr(sd), _ptr(partials), dtype_code(X), B, k, d, n,
                                    chunk, _stream(X)), "transpose_reduce")
    return out, coef_sum, sd


def decoder_norm_step(W: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, lr: float,
                      beta1: float, beta2: float, eps: float) -> None:
    n, d = W.shape
    bc1, bc2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    _check(load().dlm_decoder_norm_step(_ptr(W), _ptr(grad), _ptr(exp_avg), _ptr(exp_avg_sq), dtype_code(W), n, d,
                                        1.0 - beta1, beta2, 1.0 - beta2, lr / bc1, bc2 ** 0.5, eps, _stream(W)),
           "decoder_norm_step")
