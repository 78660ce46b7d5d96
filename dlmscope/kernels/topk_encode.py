"""Fused Top-K encoder: GEMM tile + bias + ReLU + tile-local top-k merged into a running top-k.

No ``B x n`` tensor is ever written. Each program owns BLOCK_B rows and one range (split) of the latent axis; it
sweeps that range in BLOCK_N tiles, computes ``pre = xc @ W_enc[tile].T + b_enc[tile]`` with ``tl.dot``
(fp32 accumulation), applies ReLU and keeps a running top-KP per row (KP = next power of two >= k).

Indices ride inside the sort key. For a non-negative fp32 value the IEEE bits read as a signed int are
monotone in the value, so a key orders by value first and, among equal values, prefers the lower index; every
key of a split is distinct, so zero-valued padding lands at distinct indices. Latents past the end get key -1,
below every real key. Two key widths (``EncodeConfig.INDEX_BITS``):

* int64 (fp32 inputs, ``INDEX_BITS == 0``): ``bits << 32 | (0xFFFFFFFF - latent)``. Selection and values are
  those of the kernel's fp32 pre-activations, exactly.
* int32 (bf16 / fp16 inputs, the GPU hot path; ``INDEX_BITS = L >= 1``): the fp32 bits with the low L bits
  replaced by ``2^L - 1 - (latent - split start)``; ``encode_config`` bounds each split to ``2^L`` latents with
  ``23 - L >= KEY32_KEPT_BITS[dtype]`` (bf16: 8, fp16: 11 mantissa bits kept, one more than the output
  dtype has). Guarantee, for the kernel's fp32 pre-activations v: the selection is exact for v truncated to
  ``23 - L`` mantissa bits — a latent left out has a truncated value <= that of every kept one, so it exceeds a
  kept latent only when both agree in their kept bits (relative gap < 2^-(23-L)); such ties go to the lower
  split-local index (within a split: the lower latent). Values are the truncated v rounded to the output dtype:
  within 1 ulp of that dtype of v (truncation < 2^-(23-L) <= half an output ulp, then round-to-nearest). On
  sm_90 the int32 keys need 2.1-2.7x fewer SASS instructions, about half the shuffles and up to half the shared
  memory of int64 (benchmarks/results/sm90-encoder-compile.md).

Merging a tile: a bitonic top-k network gives the tile's top KP per row sorted descending; the running
buffer is kept sorted ascending, so the elementwise max of the two is exactly the top KP of their union and
forms a bitonic sequence, which one bitonic merge sorts ascending again.

The program writes its KP candidates to ``cand [B, splits, KP]``; :func:`topk_encode` merges the splits
with one ``torch.topk`` over ``splits * KP`` keys per row and unpacks values and indices (on the device, no
host sync). Large k (KP above ``_launch.fused_max_kp``) takes the chunked GEMM + select route instead.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import (SELECT_CHUNK, EncodeConfig, cdiv, dot_precision, dot_upcast, encode_config, fused_max_kp, log2,
                      next_pow2)
from .topk_select import chunked_topk


# ---- bitonic networks on a hypercube view ----------------------------------------------------------------
# A [2^a, 2^b] block is viewed as a [2] * (a + b) hypercube; "bit i" is the i-th least significant bit of the
# flat (row-major) position, i.e. hypercube axis ND - 1 - i. A compare-and-swap along bit i needs each
# element's partner along that size-2 axis. ONE_RED: the partner is (sum of the pair) - self, one reduction
# (integer adds wrap, so this is exact for any key) then an elementwise min/max; otherwise a min and a max
# reduction (two). tl.sort / tl.topk get the partner from an xor-sum, which the interpreter evaluates element by
# element; tl.sum is one NumPy call there, and the min/max variant is kept for the sm_90 comparison.

@triton.jit
def _bit(ND: tl.constexpr, i: tl.constexpr):
    """0/1 tensor broadcastable to the hypercube: the value of bit ``i`` of the position."""
    return tl.reshape(tl.arange(0, 2), [1] * (ND - 1 - i) + [2] + [1] * i)


@triton.jit
def _cas(h, flip, ND: tl.constexpr, i: tl.constexpr, ONE_RED: tl.constexpr):
    """Compare-and-swap partners along bit ``i``: the low side gets the min where ``flip`` is 0."""
    if ONE_RED:
        other = tl.sum(h, axis=ND - 1 - i, keep_dims=True) - h
        lo = tl.minimum(h, other)
        hi = tl.maximum(h, other)
    else:
        lo = tl.min(h, axis=ND - 1 - i, keep_dims=True)
        hi = tl.max(h, axis=ND - 1 - i, keep_dims=True)
    return tl.where((_bit(ND, i) ^ flip) != 0, hi, lo)


@triton.jit
def _merge(h, flip, ND: tl.constexpr, STAGE: tl.constexpr, ONE_RED: tl.constexpr):
    """Bitonic merge of every run of 2^STAGE positions (ascending where flip is 0)."""
    for t in tl.static_range(STAGE):
        h = _cas(h, flip, ND, STAGE - 1 - t, ONE_RED)
    return h


@triton.jit
def _direction(ND: tl.constexpr, STAGE: tl.constexpr, LAST: tl.constexpr, DESC: tl.constexpr):
    """Alternating directions (by bit STAGE) for inner stages; the fixed direction DESC for the last."""
    if LAST:
        return tl.full([1] * ND, DESC, tl.int32)
    else:
        return _bit(ND, STAGE)


@triton.jit
def _row_topk_desc(key, LB: tl.constexpr, LN: tl.constexpr, LK: tl.constexpr, ONE_RED: tl.constexpr):
    """[2^LB, 2^LN] -> [2^LB, 2^LK]: the 2^LK largest of each row, sorted descending (LK >= 1)."""
    ND: tl.constexpr = LB + LN
    h = tl.reshape(key, [2] * ND)
    # sort runs of 2^LK, alternating directions (descending at the end when LK == LN)
    for s in tl.static_range(1, LK + 1):
        h = _merge(h, _direction(ND, s, s == LN, 1), ND, s, ONE_RED)
    # halve: the max of an ascending and a descending run is the top half of their union, bitonic
    for s in tl.static_range(LK + 1, LN + 1):
        h = tl.max(h, axis=ND - (s - LK - 1) - 1 - LK)  # axis of bit LK in the current hypercube
        h = _merge(h, _direction(ND - (s - LK), LK, s == LN, 1), ND - (s - LK), LK, ONE_RED)
    return tl.reshape(h, [2 ** LB, 2 ** LK])


@triton.jit
def _topk_encode_kernel(
    x_ptr, w_ptr, b_ptr, cand_ptr,
    B, N, D, n_per_split, num_splits,
    stride_xb, stride_wn,
    KP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUP_B: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    LOG_B: tl.constexpr, LOG_N: tl.constexpr, LOG_K: tl.constexpr,
    INDEX_BITS: tl.constexpr, ONE_RED: tl.constexpr,
):
    # program -> (row block, split), grouped: GROUP_B consecutive row blocks x all splits run together.
    pid = tl.program_id(0)
    num_row_blocks = tl.cdiv(B, BLOCK_B)
    per_group = GROUP_B * num_splits
    group = pid // per_group
    first_rb = group * GROUP_B
    group_size = tl.minimum(num_row_blocks - first_rb, GROUP_B)
    local = pid % per_group
    pid_b = first_rb + local % group_size
    pid_s = local // group_size

    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)
    n_start = pid_s * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)

    if INDEX_BITS > 0:
        running = tl.full([BLOCK_B, KP], -1, tl.int32)
    else:
        running = tl.full([BLOCK_B, KP], -1, tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + offs_n
        col_mask = cols < n_end
        cols64 = cols.to(tl.int64)
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            d_mask = dd < D
            xt = tl.load(x_ptr + rows64[:, None] * stride_xb + dd[None, :],
                         mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            wt = tl.load(w_ptr + cols64[None, :] * stride_wn + dd[:, None],
                         mask=col_mask[None, :] & d_mask[:, None], other=0.0)
            if DOT_FP32:  # interpreter: its bf16 tl.dot is wrong; bf16 products are exact in fp32
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(xt, wt, acc, input_precision=INPUT_PRECISION)
        bias = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        pre = acc + bias[None, :]
        pre = tl.where(pre > 0.0, pre, 0.0)  # ReLU; also maps -0.0 and NaN to +0.0
        bits = pre.to(tl.int32, bitcast=True)
        if INDEX_BITS > 0:
            # low INDEX_BITS bits: the complemented split-local index (< 2^INDEX_BITS by encode_config)
            low = (1 << INDEX_BITS) - 1 - (cols - n_start)
            key = (bits & -(1 << INDEX_BITS)) | low[None, :]
        else:
            low = tl.full([BLOCK_N], 4294967295, tl.int64) - cols64  # explicit int64: no uint32 literal
            key = (bits.to(tl.int64) << 32) | low[None, :]
        key = tl.where(col_mask[None, :], key, -1)
        top = _row_topk_desc(key, LOG_B, LOG_N, LOG_K, ONE_RED)  # [BLOCK_B, KP] descending
        # running is ascending: elementwise max = top KP of the union, bitonic; merge it ascending again
        merged = tl.reshape(tl.maximum(running, top), [2] * (LOG_B + LOG_K))
        merged = _merge(merged, 0, LOG_B + LOG_K, LOG_K, ONE_RED)
        running = tl.reshape(merged, [BLOCK_B, KP])

    out = cand_ptr + rows64[:, None] * (num_splits * KP) + pid_s * KP + tl.arange(0, KP)[None, :]
    tl.store(out, running, mask=row_mask[:, None])


def topk_candidates(xc: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, *,
                    return_compiled: bool = False,
                    ) -> tuple[torch.Tensor, EncodeConfig] | tuple[torch.Tensor, EncodeConfig, object]:
    """Packed candidate keys ``[B, splits * KP]`` (int64, or int32 when ``cfg.INDEX_BITS``) whose top-k is the
    encoder's top-k, and the config that packed them (:func:`unpack_candidates` needs it).

    ``xc = x - b_dec`` (contiguous ``[B, d]``), ``W_enc [n, d]`` contiguous, ``b_enc [n]``. ``return_compiled``:
    a third element, the launch's compiled kernel as triton returns it (``n_regs``, ``n_spills``; ``None`` under
    ``TRITON_INTERPRET=1``), for tools that report a tile's registers (``benchmarks/encode_sweep.py``).
    """
    B, d = xc.shape
    n = W_enc.shape[0]
    # the kernel reads rows with unit column stride (a transposed W_dec passed as W_enc would read garbage)
    assert xc.stride(-1) == 1 and W_enc.stride(-1) == 1 and b_enc.is_contiguous(), (xc.stride(), W_enc.stride())
    cfg = encode_config(xc, n, k)
    key_dtype = torch.int32 if cfg.INDEX_BITS else torch.int64
    cand = torch.empty((B, cfg.splits, cfg.KP), dtype=key_dtype, device=xc.device)
    grid = (cdiv(B, cfg.BLOCK_B) * cfg.splits,)
    compiled = _topk_encode_kernel[grid](
        xc, W_enc, b_enc, cand,
        B, n, d, cfg.n_per_split, cfg.splits,
        xc.stride(0), W_enc.stride(0),
        KP=cfg.KP, BLOCK_B=cfg.BLOCK_B, BLOCK_N=cfg.BLOCK_N, BLOCK_D=cfg.BLOCK_D, GROUP_B=cfg.GROUP_B,
        INPUT_PRECISION=dot_precision(xc), DOT_FP32=dot_upcast(xc),
        LOG_B=log2(cfg.BLOCK_B), LOG_N=log2(cfg.BLOCK_N), LOG_K=log2(cfg.KP),
        INDEX_BITS=cfg.INDEX_BITS, ONE_RED=cfg.ONE_RED,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if return_compiled:
        return cand.view(B, cfg.splits * cfg.KP), cfg, compiled
    return cand.view(B, cfg.splits * cfg.KP), cfg


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values fp32, indices int64) from int64 keys."""
    values = (keys >> 32).to(torch.int32).view(torch.float32)
    indices = 4294967295 - (keys & 4294967295)
    return values, indices


def unpack_candidates(keys: torch.Tensor, pos: torch.Tensor, cfg: EncodeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(values fp32, latent ids int64) of keys picked from ``topk_candidates``' output at positions ``pos``
    (both ``[B, k]``): int32 keys hold a split-local index, and the split is the position's ``// KP``."""
    if not cfg.INDEX_BITS:
        return unpack_keys(keys)
    low = (1 << cfg.INDEX_BITS) - 1
    values = (keys & ~low).view(torch.float32)
    indices = (pos // cfg.KP) * cfg.n_per_split + (low - (keys & low)).long()
    return values, indices


def topk_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """values [B,k] (x.dtype), indices [B,k] int64 of the k largest relu((x - b_dec) @ W_enc.T + b_enc)
    (exact for fp32 inputs; for bf16 / fp16 up to the 32-bit key truncation stated in the module docstring).

    Above ``fused_max_kp`` (bf16/fp16 k > 512, fp32 k > 256; there every fused tile spills on sm_90) this is
    :func:`~dlmscope.kernels.topk_select.chunked_topk` instead: ``mm`` in x's dtype over ``SELECT_CHUNK``-latent
    chunks + the exact threshold-then-compact select, i.e. exact for the GEMM rounded to x's dtype, plus b_enc.
    """
    xc = (x - b_dec).contiguous()
    if next_pow2(k) > fused_max_kp(x.dtype):
        values, indices = chunked_topk(xc, W_enc, b_enc, k, max(SELECT_CHUNK, k))
        return values.to(x.dtype), indices
    cand, cfg = topk_candidates(xc, W_enc, b_enc, k)
    if cand.shape[1] == k:
        keys, pos = cand, torch.arange(k, device=cand.device).expand(cand.shape[0], k)
    else:
        keys, pos = torch.topk(cand, k, dim=1, sorted=False)
    values, indices = unpack_candidates(keys, pos, cfg)
    return values.to(x.dtype), indices
