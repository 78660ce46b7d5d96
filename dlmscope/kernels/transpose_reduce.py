"""Transpose-reduce by latent: ``out[i] = sum_{idx[b,j]=i} coef[b,j] * X[b]`` and ``coef_sum[i]``.

The B*k entries are ordered by latent with a stable sort of the flat ids (deterministic: entries of one
latent are reduced in (b, j) order), segment starts come from ``searchsorted`` — all on the device, no host
sync, no B x k x d buffer. Then one program per (latent, d-tile) walks its latent's segment BLOCK_E entries
at a time, gathers the X rows, accumulates in fp32 and writes the row of ``out`` exactly once (zeros for a
latent with an empty segment). Programs of the first d-tile also write ``coef_sum``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import cdiv, entry_block, interpreted, row_block_d, warps_for


@triton.jit
def _transpose_reduce_kernel(
    coef_ptr, perm_ptr, starts_ptr, x_ptr, out_ptr, csum_ptr,
    K, D, stride_x, stride_out,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    lat = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    start = tl.load(starts_ptr + lat).to(tl.int32)  # B * k < 2^31
    end = tl.load(starts_ptr + lat + 1).to(tl.int32)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = dd < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    csum = tl.zeros([BLOCK_E], dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        ee = e0 + tl.arange(0, BLOCK_E)
        e_mask = ee < end
        p = tl.load(perm_ptr + ee, mask=e_mask, other=0)  # flat (b * K + j) position
        c = tl.load(coef_ptr + p, mask=e_mask, other=0.0).to(tl.float32)
        b = p // K
        x = tl.load(x_ptr + b[:, None] * stride_x + dd[None, :], mask=e_mask[:, None] & d_mask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(c[:, None] * x, axis=0)
        csum += c
    tl.store(out_ptr + lat * stride_out + dd, acc.to(out_ptr.dtype.element_ty), mask=d_mask)
    if pid_d == 0:
        tl.store(csum_ptr + lat, tl.sum(csum, axis=0).to(csum_ptr.dtype.element_ty))


def sort_by_latent(idx: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm [B*k] int64: flat positions ordered by latent, stably; starts [n+1] int64: segment bounds)."""
    flat = idx.reshape(-1)
    sorted_ids, perm = torch.sort(flat, stable=True)
    bounds = torch.arange(n + 1, dtype=sorted_ids.dtype, device=idx.device)
    starts = torch.searchsorted(sorted_ids, bounds)
    return perm, starts


def transpose_reduce(coef: torch.Tensor, idx: torch.Tensor, X: torch.Tensor,
                     n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """coef [B,k], idx [B,k] int64, X [B,d] (contiguous) -> (out [n,d], coef_sum [n]) in X's / coef's dtype."""
    B, k = idx.shape
    d = X.shape[1]
    out = torch.empty((n, d), dtype=X.dtype, device=X.device)
    coef_sum = torch.empty((n,), dtype=coef.dtype, device=X.device)
    if n == 0:
        return out, coef_sum
    perm, starts = sort_by_latent(idx, n)
    BLOCK_D = row_block_d(X, d) if d > 0 else 1
    BLOCK_E = entry_block(X)
    grid = (n, max(1, cdiv(d, BLOCK_D)))
    _transpose_reduce_kernel[grid](
        coef, perm, starts, X, out, coef_sum,
        k, d, X.stride(0) if d > 0 else 0, out.stride(0) if d > 0 else 0,
        BLOCK_E=BLOCK_E, BLOCK_D=BLOCK_D, num_warps=warps_for(BLOCK_E * BLOCK_D, interpreted(X)),
    )
    return out, coef_sum
