"""Gather-accumulate: ``out[b] = sum_j coef[b, j] * W[idx[b, j]]`` (decoder forward, encoder dx).

One program per (row, d-tile): it walks the row's k entries BLOCK_K at a time, gathers the [BLOCK_K, BLOCK_D]
slab of W rows and accumulates in fp32. Output in W's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import cdiv, interpreted, k_block, row_block_d, warps_for


@triton.jit
def _gather_accumulate_kernel(
    coef_ptr, idx_ptr, w_ptr, out_ptr,
    K, D, stride_w, stride_out,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = dd < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j0 in range(0, K, BLOCK_K):
        jj = j0 + tl.arange(0, BLOCK_K)
        j_mask = jj < K
        ids = tl.load(idx_ptr + row * K + jj, mask=j_mask, other=0).to(tl.int64)
        c = tl.load(coef_ptr + row * K + jj, mask=j_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + ids[:, None] * stride_w + dd[None, :], mask=j_mask[:, None] & d_mask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(c[:, None] * w, axis=0)
    tl.store(out_ptr + row * stride_out + dd, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


def gather_accumulate(coef: torch.Tensor, idx: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """coef [B,k], idx [B,k] int64, W [n,d] (all contiguous) -> [B,d] in W's dtype."""
    B, k = idx.shape
    d = W.shape[1]
    out = torch.empty((B, d), dtype=W.dtype, device=W.device)
    if B == 0 or d == 0:
        return out
    if k == 0:
        return out.zero_()
    BLOCK_D = row_block_d(W, d)
    BLOCK_K = k_block(W, k)
    grid = (B, cdiv(d, BLOCK_D))
    _gather_accumulate_kernel[grid](
        coef, idx, W, out, k, d, W.stride(0), out.stride(0),
        BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, num_warps=warps_for(BLOCK_K * BLOCK_D, interpreted(W)),
    )
    return out
