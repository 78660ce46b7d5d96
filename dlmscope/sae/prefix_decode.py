"""The Matryoshka SAE's prefix reconstructions from ONE sparse decode.

A Matryoshka SAE (Bussmann et al. 2025; Nabeshima 2024) nests its dictionaries: prefixes ``m_1 < … < m_P = n``
of the latent index range; prefix ``p`` reconstructs from the active latents with index ``< m_p`` only, and the
training loss sums every prefix's MSE. With the index segments ``S_p = [m_{p-1}, m_p)`` (``m_0 = 0``),

    x_hat_p[b] = b_dec + sum_{q <= p} s_q[b],   s_q[b] = sum_{j: indices[b, j] in S_q} values[b, j] W_dec[indices[b, j]]

so the P reconstructions are ``b_dec`` plus a cumulative sum over P of the per-segment partials ``s_q``. Each
active entry lies in exactly one segment, so the partials together cost about one decode — not P decodes as the
oracle (:func:`dlmscope.reference.matryoshka_reconstructions`) spends, and never a dense [B, n] code.

Layout (:func:`_segment_layout`). Each row's c entries are sorted by segment (a stable per-row sort of c small
ints); the entries of one (row, segment) group are cut into chunks of ``w = ceil(c / P)`` slots, the last chunk
of a group padded with zero coefficients; the chunks, R of them, become the rows of one ``[R, w]`` code that
``ops.sparse_decode`` decodes in ONE call (any backend, its autograd included). The chunk partials [R, d] are
summed per group (``index_add``) into [B·P, d], then cumulatively over P, and b_dec is added once.

Cost against one decode of the same code (B rows, c entries, d wide), P prefixes:
  - row gathers (decode forward; SDDMM and transpose-reduce in backward): ``R·w < 2·B·c`` — padding is at most
    ``w - 1 < c / P`` slots per non-empty group and there are at most ``B·P`` of them; empty groups cost nothing;
  - memory: chunk partials ``R·d <= min(2·B·P, B·c)·d`` (``R <= B·c / w + B·P``), the group sums and the output
    ``B·P·d`` each (the output itself is P reconstructions, so this is the size of the answer);
  - bookkeeping: O(B·c) integer ops (sort, bincount, scatter) and O(B·P) for the group offsets, plus ONE
    device-to-host sync (the chunk count R, a data-dependent shape: under ``torch.compile`` a graph break).
The layout that pads every group to the largest group's count would need ``B·P·c`` slots when one segment holds
all of a row's entries; the chunking bounds the worst case at 2× one decode whatever the distribution.

Precision: for bfloat16 / float16 the group sums, the cumulative sum and b_dec's addition run in float32 and the
result is cast back once. On CUDA ``index_add`` sums a group's chunks in an unspecified order (atomics); only
groups with more than ``w`` entries have more than one chunk.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
from torch import Tensor

from dlmscope import ops

__all__ = ["prefix_reconstructions", "prefix_losses"]

_HALF = (torch.bfloat16, torch.float16)


def _check_prefixes(prefixes, n: int) -> list[int]:
    """``prefixes`` as a list of ints ``0 < m_1 < … < m_P = n``; ValueError naming ``prefixes`` otherwise."""
    items = list(prefixes) if isinstance(prefixes, (list, tuple, range)) else None
    if not items or any(isinstance(m, bool) or not isinstance(m, numbers.Integral) for m in items):
        raise ValueError(f"prefixes must be a non-empty list of ints, got {prefixes!r}")
    items = [int(m) for m in items]
    if items[0] < 1 or any(a >= b for a, b in zip(items, items[1:])):
        raise ValueError(f"prefixes must be strictly increasing positive ints, got {items}")
    if items[-1] != n:
        raise ValueError(f"prefixes must end at n = {n} (the rows of W_dec), got last = {items[-1]}")
    return items


def _check_shapes(values, indices, W_dec, b_dec) -> None:
    """Shape, dtype and device checks of what is used before (or outside) ``ops.sparse_decode``, which checks the
    rest (dtypes, index range, NaN in values) on the laid-out code."""
    for name, t in (("values", values), ("indices", indices), ("W_dec", W_dec), ("b_dec", b_dec)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if values.dim() < 1 or values.shape != indices.shape:
        raise ValueError(f"values {list(values.shape)} and indices {list(indices.shape)} must have one shape "
                         "[..., c]")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be int64 or int32, got {indices.dtype}")
    if W_dec.dim() != 2:
        raise ValueError(f"W_dec must be [n, d], got shape {list(W_dec.shape)}")
    if b_dec.shape != (W_dec.shape[1],):
        raise ValueError(f"b_dec must have shape [d] = [{W_dec.shape[1]}] to match W_dec {list(W_dec.shape)}, "
                         f"got {list(b_dec.shape)}")
    if b_dec.dtype != values.dtype or b_dec.device != values.device:
        raise TypeError(f"b_dec ({b_dec.dtype}, {b_dec.device}) must match values ({values.dtype}, "
                        f"{values.device})")
    if values.numel() == 0 and values.shape[-1] != 0:
        raise ValueError(f"values {list(values.shape)} is an empty batch")


def _segment_layout(indices: Tensor, prefixes: list[int], n_rows: int):
    """The chunk layout of an [n_rows, c] code (c >= 1) over the P segments of ``prefixes``.

    Returns (pos [n_rows·c], order [n_rows, c], owner [R], pad [R], w): the entry at ``order[b, j]`` of row b
    (flattened row-major as entry ``b·c + j``, rows sorted by segment) goes to slot ``pos`` of the flat [R·w]
    chunk code; chunk r belongs to group ``owner[r] = b·P + p`` (non-decreasing in r); ``pad[r]`` is a real index
    of chunk r, used for its padding slots (zero coefficients) so that padding touches no other latent.
    """
    P, c = len(prefixes), indices.shape[1]
    device = indices.device
    bounds = torch.tensor(prefixes[:-1], dtype=torch.int64, device=device)
    seg = torch.bucketize(indices, bounds, right=True).clamp_(max=P - 1)  # out-of-range ids: ops.sparse_decode raises
    seg, order = torch.sort(seg, dim=1, stable=True)
    key = (torch.arange(n_rows, device=device).unsqueeze(1) * P + seg).reshape(-1)  # non-decreasing group ids
    w = max(1, -(-c // P))
    counts = torch.bincount(key, minlength=n_rows * P)
    group_start = counts.cumsum(0) - counts
    chunks = (counts + (w - 1)) // w
    chunk_ends = chunks.cumsum(0)
    R = int(chunk_ends[-1])  # the one host sync
    chunk_start = chunk_ends - chunks
    rank = torch.arange(key.numel(), device=device) - group_start[key]
    pos = (chunk_start[key] + rank // w) * w + rank % w
    owner = torch.repeat_interleave(torch.arange(n_rows * P, device=device), chunks, output_size=R)
    first = group_start[owner] + (torch.arange(R, device=device) - chunk_start[owner]) * w
    pad = indices.gather(1, order).reshape(-1)[first]
    return pos, order, owner, pad, w


def prefix_reconstructions(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, prefixes: Sequence[int],
                           *, backend: str | None = None) -> Tensor:
    """The P nested reconstructions of a Matryoshka SAE: ``[P, ..., d]``, entry p from the active latents with
    index ``< prefixes[p]`` (plus b_dec), computed with ONE ``ops.sparse_decode`` (module docstring: < 2× one
    decode's row gathers, one host sync; no [B, n] tensor).

    values [..., c] float and indices [..., c] int64/int32 in [0, n) (a sparse code; zero values mark inactive
    slots; duplicate indices add up as in ``ops.sparse_decode``), W_dec [n, d], b_dec [d], one dtype and device;
    ``prefixes`` strictly increasing positive ints ending at n (P = 1: the plain decode). Returns
    ``out[p] == reference.matryoshka_reconstructions(...)[p]`` up to rounding, leading dims as ``values``, the
    dtype of ``values``; ``out[-1]`` is ``ops.sparse_decode(values, indices, W_dec, b_dec)``. Differentiable in
    values, W_dec and b_dec (through the op's autograd on every backend).
    """
    _check_shapes(values, indices, W_dec, b_dec)
    n, d = W_dec.shape
    prefixes = _check_prefixes(prefixes, n)
    P, lead, c = len(prefixes), tuple(values.shape[:-1]), values.shape[-1]
    B = math.prod(lead)
    v2, i2 = values.reshape(B, c), indices.reshape(B, c).long()
    if c == 0:  # no entries: one zero slot per row keeps the op (and its checks) in the path
        v2, i2 = v2.new_zeros(B, 1), i2.new_zeros(B, 1)
        c = 1
    pos, order, owner, pad, w = _segment_layout(i2, prefixes, B)
    R = owner.numel()
    coef = v2.new_zeros(R * w).scatter(0, pos, v2.gather(1, order).reshape(-1)).view(R, w)
    idx = pad.unsqueeze(1).expand(R, w).reshape(-1).scatter(0, pos, i2.gather(1, order).reshape(-1)).view(R, w)
    partial = ops.sparse_decode(coef, idx, W_dec, torch.zeros_like(b_dec), backend=backend)  # [R, d]
    acc = torch.float32 if values.dtype in _HALF else values.dtype
    groups = partial.new_zeros(B * P, d, dtype=acc).index_add(0, owner, partial.to(acc))
    recon = groups.view(B, P, d).cumsum(1) + b_dec.to(acc)
    return recon.transpose(0, 1).reshape(P, *lead, d).to(values.dtype)


def prefix_losses(x: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, prefixes: Sequence[int],
                  *, backend: str | None = None) -> Tensor:
    """Per-prefix reconstruction losses ``[P]``: entry p the mean over rows of ``||x - x_hat_p||^2`` (as
    ``reference.mse_loss``; float32 for bfloat16 / float16 inputs), x [..., d] with the leading dims of
    ``values``. Their sum is the Matryoshka training loss (``reference.matryoshka_loss``). Costs one
    :func:`prefix_reconstructions` plus O(P·B·d) elementwise work."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _check_shapes(values, indices, W_dec, b_dec)
    if x.shape != (*values.shape[:-1], W_dec.shape[1]):
        raise ValueError(f"x has shape {list(x.shape)} but values {list(values.shape)} and W_dec "
                         f"{list(W_dec.shape)} give reconstructions of shape "
                         f"{[*values.shape[:-1], W_dec.shape[1]]}")
    recon = prefix_reconstructions(values, indices, W_dec, b_dec, prefixes, backend=backend)
    err = x - recon
    if err.dtype in _HALF:
        err = err.float()
    return err.pow(2).sum(-1).reshape(recon.shape[0], -1).mean(1)
