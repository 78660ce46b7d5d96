"""The ``chunked`` backend: the encoder as cuBLAS/BLAS GEMMs over latent chunks, each followed by its own top-k,
and one merge — the torch backend's sparse primitives otherwise.

Exact: the k largest of a row are among the union of each chunk's k largest, so ``topk`` over the
``[B, k · chunks]`` candidates gives the same selection as one ``topk`` over the full ``[B, n]``. The B × n
pre-activations are never materialised (B × ``chunk`` at a time), which is what makes B · n ≥ 2³¹ shapes fit and
keeps the selection cache-sized; on a GPU it is the measured alternative to the fused Triton encoder
(``scripts/gpu_check.sh`` times both). ``DLMSCOPE_CHUNK_LATENTS`` sets the chunk (default 16384).

Per-chunk selection: ``torch.topk`` of ``relu(addmm)``; from k = ``SELECT_MIN_K`` (256: there the fused encoder's
row block drops below a warp group, losing warp-group MMA, and above 512 it spills) on tensors the Triton kernels
can take (CUDA, or CPU under ``TRITON_INTERPRET=1``) in fp32 / bf16 / fp16, the Triton threshold-then-compact
select (:func:`dlmscope.kernels.topk_select.topk_select`, exact on the fp32 values of ``relu(addmm)``); each
chunk's candidates go to one float32 buffer that a final ``torch.topk`` merges. ``encode_grouped`` takes every
SAE's selection and its AuxK selection from the same chunk products (:func:`select_over_chunks`, over the loop of
:mod:`dlmscope.util.chunks`, which the ``cuda`` backend drives with its own select kernel).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from dlmscope.util.chunks import Selection, merge_topk, over_chunks, select_topk
from .torch_backend import TorchBackend

DEFAULT_CHUNK = 16384
#: k from which the per-chunk selection is the Triton select where it can run
SELECT_MIN_K = 256


def triton_select_applies(x: torch.Tensor, k: int) -> bool:
    """Whether the chunks' top-k run as :func:`dlmscope.kernels.topk_select` (see the module docstring)."""
    if k < SELECT_MIN_K or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if not (x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")):
        return False
    return importlib.util.find_spec("triton") is not None


def chunk_latents() -> int:
    value = os.environ.get("DLMSCOPE_CHUNK_LATENTS", str(DEFAULT_CHUNK))
    try:
        chunk = int(value)
    except ValueError:
        raise ValueError(f"DLMSCOPE_CHUNK_LATENTS must be a positive integer, got {value!r}") from None
    if chunk < 1:
        raise ValueError(f"DLMSCOPE_CHUNK_LATENTS must be a positive integer, got {value!r}")
    return chunk


def select_over_chunks(x, W_enc, b_enc, b_dec, selections: list[Selection], select, merge,
                       chunk: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every selection's top-k of ``relu((x - b_dec) @ W_enc.T + b_enc)`` off one pass of ``addmm`` over latent
    chunks (:func:`dlmscope.util.chunks.over_chunks`, whose ``select`` / ``merge`` contract these follow; the
    candidates are float32, float64 for float64 x). Returns (values [B, k] x.dtype, indices [B, k] int64 relative
    to the selection's start) per selection."""
    xc = x - b_dec
    cand_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32    # holds every input dtype exactly
    out = over_chunks(lambda c0, c1: torch.addmm(b_enc[c0:c1], xc, W_enc[c0:c1].T), x.shape[0], W_enc.shape[0],
                      selections, select, merge, chunk, cand_dtype, x.device)
    return [(vals.to(x.dtype), ids) for vals, ids in out]


def grouped_selections(ks: list[int], sizes: list[int], aux_mask,
                       k_aux: list[int]) -> tuple[list[Selection], list[int], list[int]]:
    """(selections, each segment's start, the segments that have an AuxK selection) for ``encode_grouped``: one
    selection per segment, then one per segment with ``k_aux > 0`` restricted to ``aux_mask``."""
    starts = [sum(sizes[:g]) for g in range(len(sizes))]
    selections: list[Selection] = [(st, st + size, k, None) for st, size, k in zip(starts, sizes, ks)]
    aux = []
    if aux_mask is not None:
        for g, (ka, st, size) in enumerate(zip(k_aux, starts, sizes)):
            if ka > 0:
                selections.append((st, st + size, ka, aux_mask[st:st + size]))
                aux.append(g)
    return selections, starts, aux


def assemble_grouped(x, results, starts: list[int], aux: list[int]):
    """``encode_grouped``'s four outputs from :func:`select_over_chunks`' results (ids made global)."""
    n_main = len(starts)
    values = torch.cat([v for v, _ in results[:n_main]], 1)
    indices = torch.cat([i + st for (_, i), st in zip(results[:n_main], starts)], 1)
    if not aux:
        return values, indices, x.new_empty(x.shape[0], 0), x.new_empty(x.shape[0], 0, dtype=torch.int64)
    return (values, indices, torch.cat([v for v, _ in results[n_main:]], 1),
            torch.cat([i + starts[g] for (_, i), g in zip(results[n_main:], aux)], 1))


def _triton_select(pre, k, keep, vals, ids, col, id_offset):
    from dlmscope.kernels.topk_select import topk_select  # lazily: importing triton costs ~1 s
    bias = None if keep is None else torch.zeros(keep.shape, dtype=torch.float32, device=keep.device).masked_fill_(
        ~keep, float("-inf"))
    topk_select(pre, bias, k, id_offset=id_offset, values=vals[:, col:col + k], indices=ids[:, col:col + k])


class ChunkedBackend(TorchBackend):
    name = "chunked"

    @staticmethod
    def _pass(x, W_enc, b_enc, b_dec, selections: list[Selection]):
        k_max = max(k for _, _, k, _ in selections)
        select = _triton_select if triton_select_applies(x, k_max) else select_topk
        chunk = max(chunk_latents(), k_max)               # a chunk holds at least k latents: fewer candidates
        return select_over_chunks(x, W_enc, b_enc, b_dec, selections, select, merge_topk, chunk)

    def encode(self, x, W_enc, b_enc, b_dec, k):
        n = W_enc.shape[0]
        if max(chunk_latents(), k) >= n and not triton_select_applies(x, k):
            return super().encode(x, W_enc, b_enc, b_dec, k)
        return self._pass(x, W_enc, b_enc, b_dec, [(0, n, k, None)])[0]

    def encode_grouped(self, x, W_enc, b_enc, b_dec, ks, sizes, aux_mask, k_aux):
        """Every segment's top-k and its AuxK top-k among ``aux_mask`` latents off the same chunked GEMMs: AuxK
        costs one more selection over a chunk already computed, not a second GEMM."""
        selections, starts, aux = grouped_selections(ks, sizes, aux_mask, k_aux)
        return assemble_grouped(x, self._pass(x, W_enc, b_enc, b_dec, selections), starts, aux)
