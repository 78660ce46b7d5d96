"""Row-wise top-k by threshold-then-compact over a materialised pre-activation chunk (large k).

For k >= 256 the fused encoder's running bitonic top-KP no longer fits in registers (it spills on sm_90), so the
GEMM runs as a plain cuBLAS ``mm`` over a latent chunk and this kernel selects each row's k largest of
``relu(pre + bias)`` — bias and ReLU fused, so the chunk is read only by this kernel.

One program per row, values handled as the bits of non-negative fp32 (monotone as int32):

1. radix search: 4 passes of 8 bits, most significant first. Pass p histograms digit p of the entries whose
   higher digits equal the prefix found so far (``tl.histogram``); the digit holding the ``want``-th largest is
   the number of digits whose strictly-greater count is still >= ``want``; ``want`` drops by that count. After
   the last pass the prefix is the exact bit pattern T of the k-th largest value and ``want`` (>= 1) is how
   many entries equal to T belong to the top k.
2. compact: one sweep writes every entry > T and the first ``want`` entries == T (lowest column first) at
   positions from a running ``tl.cumsum`` — exactly k per row, in column order.

Guarantee: the selection is exact for the fp32 values ``relu(float(pre) + float(bias))`` (ties at the threshold
go to the lower column); values are those fp32 values (float32 unless the caller passes another buffer: cast
in torch, the rounding is right everywhere — the interpreter truncates fp32 -> bf16 casts); indices are
``column + id_offset``. Rows with fewer than k positive entries get zeros at their lowest zero columns, distinct.
Cost: five sweeps over the row (one per pass, one compact) of a chunk that stays in L2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlmscope.util.chunks import merge_topk, over_chunks
from ._launch import select_config

RADIX = 8
PASSES = 4  # 4 x 8 = all 32 bits of the key (bit 31 is always 0: the values are non-negative)


@triton.jit
def _relu_bits(row_ptr, bias_ptr, cols, C, HAS_BIAS: tl.constexpr):
    """int32 bits of relu(pre + bias) at ``cols`` of one row; -1 (below every value) past the end."""
    m = cols < C
    v = tl.load(row_ptr + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + cols, mask=m, other=0.0).to(tl.float32)
    v = tl.where(v > 0.0, v, 0.0)  # ReLU; also maps -0.0 and NaN to +0.0
    return tl.where(m, v.to(tl.int32, bitcast=True), -1)


@triton.jit
def _topk_select_kernel(
    pre_ptr, bias_ptr, val_ptr, idx_ptr,
    C, k, id_offset, stride_pre, stride_val, stride_idx,
    HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, RADIX: tl.constexpr, PASSES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    pre_row = pre_ptr + row * stride_pre
    offs = tl.arange(0, BLOCK_C)
    NBINS: tl.constexpr = 1 << RADIX
    bins = tl.arange(0, NBINS)

    prefix = tl.zeros([], tl.int32)     # the digits of the k-th largest found so far
    want = tl.zeros([], tl.int32) + k    # how many of the entries matching the prefix are still to be taken
    for p in tl.static_range(PASSES):
        SHIFT = RADIX * (PASSES - 1 - p)  # a constexpr (p is); unannotated: it is rebound every pass
        hist = tl.zeros([NBINS], tl.int32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + offs
            bits = _relu_bits(pre_row, bias_ptr, cols, C, HAS_BIAS)
            match = cols < C
            if p > 0:
                match = match & ((bits >> (SHIFT + RADIX)) == (prefix >> (SHIFT + RADIX)))
            hist += tl.histogram((bits >> SHIFT) & (NBINS - 1), NBINS, mask=match)
        above = tl.sum(hist, 0) - tl.cumsum(hist, 0)            # entries with a larger digit, per digit
        digit = tl.sum((above >= want).to(tl.int32), 0)         # above is non-increasing
        want -= tl.sum(tl.where(bins == digit, above, 0), 0)
        prefix = prefix | (digit << SHIFT)

    n_sel = tl.zeros([], tl.int32)
    n_eq = tl.zeros([], tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + offs
        bits = _relu_bits(pre_row, bias_ptr, cols, C, HAS_BIAS)
        eq = (bits == prefix) & (cols < C)
        eq_rank = n_eq + tl.cumsum(eq.to(tl.int32), 0)          # 1-based rank among the ties, in column order
        sel = (bits > prefix) | (eq & (eq_rank <= want))
        pos = n_sel + tl.cumsum(sel.to(tl.int32), 0) - 1
        value = bits.to(tl.float32, bitcast=True)
        tl.store(val_ptr + row * stride_val + pos, value.to(val_ptr.dtype.element_ty), mask=sel)
        tl.store(idx_ptr + row * stride_idx + pos, (cols + id_offset).to(tl.int64), mask=sel)
        n_sel += tl.sum(sel.to(tl.int32), 0)
        n_eq += tl.sum(eq.to(tl.int32), 0)


def topk_select(pre: torch.Tensor, bias: torch.Tensor | None, k: int, *, id_offset: int = 0,
                values: torch.Tensor | None = None,
                indices: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """values [B, k] (float32 unless ``values`` is given), indices [B, k] int64 (column + ``id_offset``): the k
    largest of ``relu(pre + bias)`` per row, in column order.

    ``pre [B, C]`` with unit column stride, ``bias [C]`` or None, ``1 <= k <= C``. ``values`` / ``indices`` may be
    preallocated ``[B, k]`` views with unit column stride (e.g. a column block of a wider candidate buffer).
    """
    B, C = pre.shape
    assert 1 <= k <= C and pre.stride(1) == 1, (pre.shape, pre.stride(), k)
    if values is None:
        values = torch.empty((B, k), dtype=torch.float32, device=pre.device)
    if indices is None:
        indices = torch.empty((B, k), dtype=torch.int64, device=pre.device)
    assert values.shape == (B, k) == indices.shape and values.stride(1) == 1 == indices.stride(1)
    if B == 0:
        return values, indices
    cfg = select_config(pre, C)
    _topk_select_kernel[(B,)](
        pre, bias if bias is not None else pre, values, indices,
        C, k, id_offset, pre.stride(0), values.stride(0), indices.stride(0),
        HAS_BIAS=bias is not None, BLOCK_C=cfg.BLOCK_C, RADIX=RADIX, PASSES=PASSES,
        num_warps=cfg.num_warps,
    )
    return values, indices


def chunked_topk(xc: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int,
                 chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """values [B, k] float32, indices [B, k] int64: the k largest of ``relu(xc @ W_enc.T + b_enc)`` per row, as
    ``mm`` over latent chunks (``chunk >= k``; the product in xc's dtype) with :func:`topk_select` per chunk (b_enc
    added there, in fp32) into one float32 candidate buffer, merged by ``torch.topk``
    (:func:`dlmscope.util.chunks.over_chunks`). Exact on the fp32 values ``relu(mm + b_enc)``. The large-k route
    of :func:`dlmscope.kernels.topk_encode`."""
    def select(pre, kk, keep, vals, ids, col, id_offset):      # one selection from latent 0: id_offset is c0
        topk_select(pre, b_enc[id_offset:id_offset + pre.shape[1]], kk, id_offset=id_offset,
                    values=vals[:, col:col + kk], indices=ids[:, col:col + kk])

    n = W_enc.shape[0]
    [(values, indices)] = over_chunks(lambda c0, c1: xc @ W_enc[c0:c1].T, xc.shape[0], n, [(0, n, k, None)],
                                      select, merge_topk, chunk, torch.float32, xc.device)
    return values, indices
