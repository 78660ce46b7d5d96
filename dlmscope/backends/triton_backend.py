"""The ``triton`` backend: the five primitives as Triton kernels (``dlmscope.kernels``).

Runs on CUDA tensors; on CPU tensors only under ``TRITON_INTERPRET=1`` (the interpreter, for tests).
Inputs arrive validated and contiguous from ``dlmscope.ops``; float dtypes other than
``native_dtypes`` are cast to float32 (and back) by ``ops``.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from . import autotune
from .base import Backend, SortCache
from .chunked_backend import ChunkedBackend
from .torch_backend import TorchBackend

_CHUNKED, _TORCH = ChunkedBackend(), TorchBackend()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend(Backend):
    name = "triton"
    native_dtypes = (torch.float32, torch.bfloat16, torch.float16)

    def __init__(self):
        # one sort of a step's ids serves the decoder's and the encoder's transpose-reduce
        self._sorts = SortCache(lambda idx, n: self._k().sort_by_latent(idx, n))

    def is_available(self) -> bool:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception:
            return False
        return torch.cuda.is_available() or _interpreting()

    def supports(self, device: torch.device) -> bool:
        device = torch.device(device)
        return device.type == "cuda" or (device.type == "cpu" and _interpreting())

    @staticmethod
    def _k():
        from dlmscope import kernels  # imported lazily: importing triton costs ~1 s
        return kernels

    def encode(self, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The fused kernel, or on a GPU whichever of fused / chunked / torch :mod:`dlmscope.backends.autotune` measured
        fastest for this shape."""
        fused = lambda: self._k().topk_encode(x, W_enc, b_enc, b_dec, k)  # noqa: E731
        if not (x.is_cuda and autotune.enabled()):
            return fused()
        candidates = {"fused": fused,
                      "chunked": lambda: _CHUNKED.encode(x, W_enc, b_enc, b_dec, k),
                      "torch": lambda: _TORCH.encode(x, W_enc, b_enc, b_dec, k)}
        return candidates[autotune.choose(autotune.shape_key("encode", x, W_enc.shape[0], k), candidates)]()

    def encode_grouped(self, x, W_enc, b_enc, b_dec, ks, sizes, aux_mask, k_aux):
        """One fused encode per segment and per AuxK selection, or on a GPU with AuxK on, if
        :mod:`dlmscope.backends.autotune` measured it faster for this shape, the chunked pass that takes the AuxK
        selections from the main selections' GEMM chunks (:meth:`ChunkedBackend.encode_grouped`)."""
        separate = lambda: super(TritonBackend, self).encode_grouped(  # noqa: E731
            x, W_enc, b_enc, b_dec, ks, sizes, aux_mask, k_aux)
        if aux_mask is None or not (x.is_cuda and autotune.enabled()):
            return separate()
        candidates = {"fused": separate,
                      "chunked": lambda: _CHUNKED.encode_grouped(x, W_enc, b_enc, b_dec, ks, sizes, aux_mask, k_aux)}
        key = autotune.shape_key(f"encode_grouped_aux{sum(k_aux)}", x, W_enc.shape[0], sum(ks))
        return candidates[autotune.choose(key, candidates)]()

    def gather_accumulate(self, coef: Tensor, idx: Tensor, W: Tensor) -> Tensor:
        return self._k().gather_accumulate(coef, idx, W)

    def transpose_reduce(self, coef: Tensor, idx: Tensor, X: Tensor, n: int) -> tuple[Tensor, Tensor]:
        return self._k().transpose_reduce(coef, idx, X, n, layout=self._sorts.get(idx, n))

    def sddmm(self, G: Tensor, idx: Tensor, W: Tensor) -> Tensor:
        return self._k().sddmm(G, idx, W)

    def decoder_norm_step(self, W, grad, exp_avg, exp_avg_sq, step: int, lr: float, beta1: float,
                          beta2: float, eps: float) -> None:
        self._k().decoder_norm_step(W, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps)
