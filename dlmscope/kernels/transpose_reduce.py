"""Transpose-reduce by latent: ``out[i] = sum_{idx[b,j]=i} coef[b,j] * X[b]`` and ``coef_sum[i]``.

The B*k entries are ordered by latent with a stable sort of the flat ids (deterministic: a latent's entries
are taken in (b, j) order, BLOCK_E at a time, each block summed by a fixed tree), segment starts come from ``searchsorted`` — all on the device, no host
sync, no B x k x d buffer. The sorted layout (:func:`sort_by_latent`) can be passed in, so a training step's two
transpose-reduces over the same ids sort once.

Work is split in *pieces* of at most ``piece_entries`` entries of one latent, so a latent that fires on most rows
is spread over many programs instead of one long tail: one program per (piece, d-tile) gathers the X rows
BLOCK_E at a time and accumulates in fp32. A latent of one piece (the common case, also an empty latent, which
writes zeros) stores its row of ``out`` directly; the pieces of a split latent store fp32 partial rows, which a
second kernel sums in piece order (deterministic) into ``out``. The piece plan is built on the device from the
segment bounds with cumsum / searchsorted, grids sized by upper bounds (programs past the plan do nothing).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import cdiv, entry_block, interpreted, row_block_d, warps_for


def piece_entries(t: torch.Tensor) -> int:
    """Most entries of one latent a program reduces (small under the interpreter, so tests split latents)."""
    return 8 if interpreted(t) else 2048


@triton.jit
def _and(mask, flag):
    """``mask & flag`` for a block ``mask`` and a scalar ``flag`` (broadcast through int32: the interpreter
    refuses a scalar-bool broadcast as a store mask)."""
    return mask & ((tl.zeros_like(mask).to(tl.int32) + flag.to(tl.int32)) != 0)


@triton.jit
def _pieces_kernel(
    coef_ptr, perm_ptr, starts_ptr, item_lat_ptr, first_item_ptr, pieces_ptr, slot_ptr, x_ptr,
    out_ptr, csum_ptr, part_ptr, part_csum_ptr,
    N, K, D, stride_x, stride_out, PIECE,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    item = tl.program_id(0)
    pid_d = tl.program_id(1)
    lat_raw = tl.load(item_lat_ptr + item)
    valid = lat_raw < N
    lat = tl.where(valid, lat_raw, 0).to(tl.int64)
    piece = item - tl.load(first_item_ptr + lat)
    n_pieces = tl.load(pieces_ptr + lat)
    seg_end = tl.load(starts_ptr + lat + 1).to(tl.int32)  # B * k < 2^31
    start = tl.load(starts_ptr + lat).to(tl.int32) + piece * PIECE
    end = tl.where(valid, tl.minimum(start + PIECE, seg_end), start)
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
    whole = valid & (n_pieces == 1)
    split = valid & (n_pieces > 1)
    slot = tl.load(slot_ptr + lat) + piece
    tl.store(out_ptr + lat * stride_out + dd, acc.to(out_ptr.dtype.element_ty), mask=_and(d_mask, whole))
    tl.store(part_ptr + slot * D + dd, acc, mask=_and(d_mask, split))
    if pid_d == 0:
        total = tl.sum(csum, axis=0)
        tl.store(csum_ptr + lat, total.to(csum_ptr.dtype.element_ty), mask=whole)
        tl.store(part_csum_ptr + slot, total, mask=split)


@triton.jit
def _sum_pieces_kernel(
    split_lat_ptr, pieces_ptr, slot_ptr, part_ptr, part_csum_ptr, out_ptr, csum_ptr,
    N, D, stride_out,
    BLOCK_D: tl.constexpr,
):
    lat_raw = tl.load(split_lat_ptr + tl.program_id(0))
    valid = lat_raw < N
    lat = tl.where(valid, lat_raw, 0).to(tl.int64)
    pid_d = tl.program_id(1)
    n_pieces = tl.where(valid, tl.load(pieces_ptr + lat), 0)
    slot0 = tl.load(slot_ptr + lat)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = dd < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    csum = 0.0
    for q in range(0, n_pieces):
        acc += tl.load(part_ptr + (slot0 + q) * D + dd, mask=d_mask, other=0.0)
        csum += tl.load(part_csum_ptr + slot0 + q)
    tl.store(out_ptr + lat * stride_out + dd, acc.to(out_ptr.dtype.element_ty), mask=_and(d_mask, valid))
    if pid_d == 0:
        tl.store(csum_ptr + lat, csum.to(csum_ptr.dtype.element_ty), mask=valid)


def sort_by_latent(idx: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm [B*k] int64: flat positions ordered by latent, stably; starts [n+1] int64: segment bounds)."""
    flat = idx.reshape(-1)
    sorted_ids, perm = torch.sort(flat, stable=True)
    bounds = torch.arange(n + 1, dtype=sorted_ids.dtype, device=idx.device)
    starts = torch.searchsorted(sorted_ids, bounds)
    return perm, starts


def plan_pieces(starts: torch.Tensor, count: int, piece: int):
    """The split of every latent's segment into pieces of at most ``piece`` entries, on the device.

    Returns (item_lat [items] (latent of each work item, n past the plan), first_item [n], pieces [n] (>= 1),
    slot [n] (first partial-row slot of a split latent), split_lat [splits] (the split latents, n past the end),
    slots (partial rows to allocate)). ``items`` = n + count // piece + 1 bounds sum(pieces), since a latent
    with c >= 1 entries has ceil(c / piece) <= 1 + (c - 1) / piece pieces; a split latent (c > piece) has at
    most 2 c / piece pieces, so 2 * count // piece + 1 slots suffice."""
    n = starts.numel() - 1
    counts = starts[1:] - starts[:-1]
    pieces = torch.clamp((counts + piece - 1) // piece, min=1)
    ends = torch.cumsum(pieces, 0)
    first_item = ends - pieces
    items = n + count // piece + 1
    item_lat = torch.searchsorted(ends, torch.arange(items, device=starts.device), right=True)
    split = pieces > 1
    slot_counts = torch.where(split, pieces, 0)
    slot = torch.cumsum(slot_counts, 0) - slot_counts
    max_splits = count // piece + 1
    rank = torch.cumsum(split.to(torch.int64), 0) - 1
    split_lat = torch.full((max_splits + 1,), n, dtype=torch.int64, device=starts.device)
    # non-split latents all land on the sink slot max_splits, which the kernel never reads
    split_lat.scatter_(0, torch.where(split, rank, max_splits), torch.arange(n, device=starts.device))
    split_lat[max_splits] = n
    return item_lat, first_item, pieces, slot, split_lat[:max_splits], 2 * count // piece + 1


def transpose_reduce(coef: torch.Tensor, idx: torch.Tensor, X: torch.Tensor, n: int,
                     layout: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """coef [B,k], idx [B,k] int64, X [B,d] (contiguous) -> (out [n,d], coef_sum [n]) in X's / coef's dtype.

    ``layout``: ``sort_by_latent(idx, n)`` if the caller already has it."""
    B, k = idx.shape
    d = X.shape[1]
    # flat positions b * k + j index coef, and rows of X are read with unit column stride; offsets are int32
    assert coef.is_contiguous() and (d == 0 or X.stride(1) == 1) and B * k < 2 ** 31, (coef.stride(), X.stride())
    out = torch.empty((n, d), dtype=X.dtype, device=X.device)
    coef_sum = torch.empty((n,), dtype=coef.dtype, device=X.device)
    if n == 0:
        return out, coef_sum
    perm, starts = layout if layout is not None else sort_by_latent(idx, n)
    piece = piece_entries(X)
    item_lat, first_item, pieces, slot, split_lat, slots = plan_pieces(starts, B * k, piece)
    part = torch.empty((slots, max(d, 1)), dtype=torch.float32, device=X.device)
    part_csum = torch.empty((slots,), dtype=torch.float32, device=X.device)
    BLOCK_D = row_block_d(X, d) if d > 0 else 1
    BLOCK_E = entry_block(X)
    d_tiles = max(1, cdiv(d, BLOCK_D))
    stride_x, stride_out = (X.stride(0), out.stride(0)) if d > 0 else (0, 0)
    _pieces_kernel[(item_lat.numel(), d_tiles)](
        coef, perm, starts, item_lat, first_item, pieces, slot, X, out, coef_sum, part, part_csum,
        n, k, d, stride_x, stride_out, piece,
        BLOCK_E=BLOCK_E, BLOCK_D=BLOCK_D, num_warps=warps_for(BLOCK_E * BLOCK_D, interpreted(X)),
    )
    _sum_pieces_kernel[(split_lat.numel(), d_tiles)](
        split_lat, pieces, slot, part, part_csum, out, coef_sum, n, d, stride_out,
        BLOCK_D=BLOCK_D, num_warps=warps_for(BLOCK_D, interpreted(X)),
    )
    return out, coef_sum
