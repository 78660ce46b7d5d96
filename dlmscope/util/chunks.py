"""Top-k selections over latent chunks of the encoder's product: the one loop behind every chunked encode.

The ``chunked`` and ``cuda`` backends (:func:`dlmscope.backends.chunked_backend.select_over_chunks`) and the
large-k route of the Triton encoder (:func:`dlmscope.kernels.topk_select.chunked_topk`) all compute the
``[B, n]`` pre-activations a latent chunk at a time, take each selection's top-k of the chunk into a candidate
buffer, and merge the buffer down to k. Exact: a row's k largest are among the union of each chunk's k largest.

Pure torch (no triton, no dlmscope imports): the torch-only wheel's chunked backend and the kernels share it.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["CANDIDATE_BUFFER", "Selection", "merge_topk", "over_chunks", "select_topk"]

#: a selection's candidate buffer holds at most this many times k columns (merged down to k in place when full;
#: at n = 16M, k = 1024 a buffer of every chunk's candidates would be 48 GiB per 4096 rows)
CANDIDATE_BUFFER = 8

#: one selection of a chunked pass: latent range [start, stop), k, and ``keep [stop - start]`` bool or None (AuxK:
#: latents where keep is False count as 0)
Selection = tuple[int, int, int, "Tensor | None"]


def select_topk(pre: Tensor, k: int, keep: Tensor | None, vals: Tensor, ids: Tensor, col: int,
                id_offset: int) -> None:
    """:func:`over_chunks`' ``select`` in torch: the top-k of ``relu(pre)`` (``keep``: the others count as 0)."""
    # relu is monotone, so the top-k of relu(pre) is relu of pre's top-k: no relu'd copy of the chunk (a row with
    # fewer than k positives gets its largest negatives, i.e. zeros at distinct ids, as the contract allows)
    if keep is not None:
        pre = pre.masked_fill(~keep, float("-inf"))   # AuxK: the unmasked latents rank last (value 0)
    v, i = pre.topk(k, dim=-1, sorted=False)
    vals[:, col:col + k] = v.clamp_min(0)
    ids[:, col:col + k] = i + id_offset


def merge_topk(vals: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest candidates per row (``vals``/``ids [B, c]`` → ``[B, k]``, unordered)."""
    v, j = vals.topk(k, dim=-1, sorted=False)
    return v, ids.gather(-1, j)


def over_chunks(product: Callable[[int, int], Tensor], rows: int, n: int, selections: list[Selection],
                select, merge, chunk: int, cand_dtype: torch.dtype,
                device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """Every selection's top-k off ONE pass over latent chunks ``[c0, c0 + chunk)`` of ``n``.

    ``product(c0, c1)`` is the chunk's ``[rows, c1 - c0]`` pre-activations, computed once and shared by every
    selection whose range meets the chunk (so several SAEs and their AuxK selections share the GEMM).
    ``select(pre [rows, w], k, keep [w] | None, vals, ids, col, id_offset)`` writes the top-k of
    ``relu(pre)`` (values, ids + ``id_offset``) into columns [col, col + k) of the candidate buffers
    (``cand_dtype``; int64); ``merge(vals, ids, k)`` reduces candidates to k, also whenever a buffer of
    ``CANDIDATE_BUFFER · k`` columns fills. Returns (values [rows, k] ``cand_dtype``, indices [rows, k] int64,
    relative to the selection's start) per selection.
    """
    buffers = []
    for start, stop, k, _ in selections:
        width = sum(min(k, min(stop, c0 + chunk) - max(start, c0))
                    for c0 in range(start // chunk * chunk, stop, chunk))
        width = min(width, CANDIDATE_BUFFER * k)
        buffers.append([torch.empty((rows, width), dtype=cand_dtype, device=device),
                        torch.empty((rows, width), dtype=torch.int64, device=device), 0])
    for c0 in range(0, n, chunk):
        c1 = min(c0 + chunk, n)
        users = [s for s, (start, stop, _, _) in enumerate(selections) if start < c1 and c0 < stop]
        if not users:
            continue
        pre = product(c0, c1)                                                           # [rows, c1 - c0]
        for s in users:
            start, stop, k, keep = selections[s]
            lo, hi = max(start, c0), min(stop, c1)
            kk = min(k, hi - lo)
            vals, ids, col = buffers[s]
            if col + kk > vals.shape[1]:                   # the buffer is full: keep its top k, in columns [0, k)
                merged_v, merged_i = merge(vals[:, :col], ids[:, :col], k)
                vals[:, :k], ids[:, :k] = merged_v, merged_i
                col = k
            select(pre[:, lo - c0:hi - c0], kk, None if keep is None else keep[lo - start:hi - start], vals, ids,
                   col, lo - start)
            buffers[s][2] = col + kk
        del pre                                    # free this chunk's product before the next one is allocated
    out = []
    for (_, _, k, _), (vals, ids, used) in zip(selections, buffers):
        vals, ids = vals[:, :used], ids[:, :used]
        if used > k:
            vals, ids = merge(vals, ids, k)
        out.append((vals.contiguous(), ids.contiguous()))
    return out
