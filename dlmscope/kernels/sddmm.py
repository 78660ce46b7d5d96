"""SDDMM at the selected entries: ``out[b, j] = <G[b], W[idx[b, j]]>`` (d_values of the decoder).

One program per (row, block of BLOCK_K entries): it sweeps d in BLOCK_D tiles, loads the row of G once per
tile and the BLOCK_K gathered W rows, and reduces in fp32. Output in G's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import cdiv, interpreted, k_block, row_block_d, warps_for


@triton.jit
def _sddmm_kernel(
    g_ptr, idx_ptr, w_ptr, out_ptr,
    K, D, stride_g, stride_w,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    jj = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    j_mask = jj < K
    ids = tl.load(idx_ptr + row * K + jj, mask=j_mask, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        d_mask = dd < D
        g = tl.load(g_ptr + row * stride_g + dd, mask=d_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + ids[:, None] * stride_w + dd[None, :], mask=j_mask[:, None] & d_mask[None, :],
                    other=0.0).to(tl.float32)
        acc += w * g[None, :]
    tl.store(out_ptr + row * K + jj, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=j_mask)


def sddmm(G: torch.Tensor, idx: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """G [B,d], idx [B,k] int64, W [n,d] (all contiguous) -> [B,k] in G's dtype."""
    B, k = idx.shape
    d = G.shape[1]
    out = torch.empty((B, k), dtype=G.dtype, device=G.device)
    if B == 0 or k == 0:
        return out
    if d == 0:
        return out.zero_()
    BLOCK_K = k_block(G, k)
    BLOCK_D = row_block_d(G, d)
    if not interpreted(G):
        BLOCK_D = min(BLOCK_D, 128)  # BLOCK_K x BLOCK_D fp32 accumulator stays in registers
    grid = (B, cdiv(k, BLOCK_K))
    _sddmm_kernel[grid](
        G, idx, W, out, k, d, G.stride(0), W.stride(0),
        BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, num_warps=warps_for(BLOCK_K * BLOCK_D, interpreted(G)),
    )
    return out
