"""The ``chunked`` backend: the encoder as cuBLAS/BLAS GEMMs over latent chunks, each followed by its own top-k,
and one merge — the torch backend's sparse primitives otherwise.

Exact: the k largest of a row are among the union of each chunk's k largest, so ``topk`` over the
``[B, k · chunks]`` candidates gives the same selection as one ``topk`` over the full ``[B, n]``. The B × n
pre-activations are never materialised (B × ``chunk`` at a time), which is what makes B · n ≥ 2³¹ shapes fit and
keeps the selection cache-sized; on a GPU it is the measured alternative to the fused Triton encoder
(``scripts/gpu_check.sh`` times both). ``DLMSCOPE_CHUNK_LATENTS`` sets the chunk (default 16384).
"""
from __future__ import annotations

import os

import torch

from .torch_backend import TorchBackend

DEFAULT_CHUNK = 16384


def chunk_latents() -> int:
    value = os.environ.get("DLMSCOPE_CHUNK_LATENTS", str(DEFAULT_CHUNK))
    try:
        chunk = int(value)
    except ValueError:
        raise ValueError(f"DLMSCOPE_CHUNK_LATENTS must be a positive integer, got {value!r}") from None
    if chunk < 1:
        raise ValueError(f"DLMSCOPE_CHUNK_LATENTS must be a positive integer, got {value!r}")
    return chunk


class ChunkedBackend(TorchBackend):
    name = "chunked"

    def encode(self, x, W_enc, b_enc, b_dec, k):
        n = W_enc.shape[0]
        chunk = max(chunk_latents(), k)                    # a chunk holds at least k latents: one merge suffices
        if chunk >= n:
            return super().encode(x, W_enc, b_enc, b_dec, k)
        xc = x - b_dec
        values, indices = [], []
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            pre = torch.relu_(torch.addmm(b_enc[start:stop], xc, W_enc[start:stop].T))     # [B, chunk]
            v, i = pre.topk(min(k, stop - start), dim=-1, sorted=False)
            values.append(v)
            indices.append(i + start)
        v, j = torch.cat(values, dim=-1).topk(k, dim=-1, sorted=False)
        return v, torch.cat(indices, dim=-1).gather(-1, j)
