"""The ``cpu`` backend: the five primitives as C++/OpenMP kernels in the extension ``dlmscope._C`` (csrc/cpu).

* ``encode`` is the fused tiled encoder: the GEMM runs in cache-sized (rows x latents) tiles, one single-threaded
  BLAS call per tile inside the parallel region, and bias + ReLU + top-k selection is applied to each tile while it
  is in cache (running per-row threshold, vectorised reject test) — the B x n pre-activations never exist.
* ``gather_accumulate`` / ``sddmm`` are parallel over rows; ``transpose_reduce`` is a stable counting sort of the
  B·k ids followed by a cost-balanced parallel pass over latents (every output row written once).
* ``encode_grouped`` runs several SAEs stacked along the latent axis (and their AuxK selections) through the same
  tiled kernel in one pass: one GEMM over all S latents, per-segment selections while each tile is in cache.
* ``decode_backward`` fuses the SDDMM (d_values) into the transpose pass that builds dW_dec, so g[b] is read once.
* ``decoder_norm_step`` is one pass per row: project, Adam, renormalise (zero rows as ``reference`` defines them).

Inputs arrive validated and contiguous (``ops.py``); float32/float64 natively (others are upcast by ``ops.py``).
Output rows of ``encode`` are in no particular order (deterministic for a given shape and thread count); rows with
fewer than k positive pre-activations hold their positive entries first, then zeros at the smallest unused ids.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Backend

try:  # the extension is optional: a source checkout without a build simply lacks this backend
    from dlmscope import _C  # type: ignore[attr-defined]
except Exception:  # pragma: no cover - depends on the build
    _C = None


class CpuBackend(Backend):
    name = "cpu"
    native_dtypes = (torch.float32, torch.float64)

    # ---- availability -------------------------------------------------------------------------------
    def is_available(self) -> bool:
        return _C is not None and hasattr(_C, "topk_encode")

    def supports(self, device: torch.device) -> bool:
        return torch.device(device).type == "cpu"

    # ---- primitives ---------------------------------------------------------------------------------
    def encode(self, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int) -> tuple[Tensor, Tensor]:
        values, indices = _C.topk_encode(x, W_enc, b_enc, b_dec, int(k))
        return values, indices

    def gather_accumulate(self, coef: Tensor, idx: Tensor, W: Tensor) -> Tensor:
        return _C.gather_accumulate(coef, idx, W)

    def transpose_reduce(self, coef: Tensor, idx: Tensor, X: Tensor, n: int) -> tuple[Tensor, Tensor]:
        out, coef_sum, _ = _C.transpose_reduce(coef, idx, X, int(n), None)
        return out, coef_sum

    def sddmm(self, G: Tensor, idx: Tensor, W: Tensor) -> Tensor:
        return _C.sddmm(G, idx, W)

    def decoder_norm_step(self, W, grad, exp_avg, exp_avg_sq, step: int, lr: float, beta1: float,
                          beta2: float, eps: float) -> None:
        _C.decoder_norm_step(W, grad, exp_avg, exp_avg_sq, int(step), float(lr), float(beta1), float(beta2),
                             float(eps))

    # ---- fused composites ---------------------------------------------------------------------------
    def encode_grouped(self, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, ks: list[int],
                       sizes: list[int], aux_mask: Tensor | None,
                       k_aux: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """All segments' top-k (and their AuxK selections) off ONE tiled GEMM pass over the S stacked latents.

        Each row keeps one selection per segment and, with ``aux_mask``, a second one over the masked latents only
        (bias -inf elsewhere), both fed from the same cached tile — the aux selection costs a second scan of the
        tile, not a second GEMM. Without ``aux_mask`` the aux outputs are [B, 0].
        """
        if not hasattr(_C, "topk_encode_grouped"):  # an extension built before the grouped kernel existed
            return super().encode_grouped(x, W_enc, b_enc, b_dec, ks, sizes, aux_mask, k_aux)
        k_aux = [int(k) for k in k_aux] if aux_mask is not None else []
        return _C.topk_encode_grouped(x, W_enc, b_enc, b_dec, [int(k) for k in ks], [int(s) for s in sizes],
                                      aux_mask, k_aux)

    def decode_backward(self, g: Tensor, values: Tensor, indices: Tensor,
                        W_dec: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(d_values, dW_dec, db_dec) with the SDDMM fused into the transpose-reduce pass over g."""
        dW_dec, _, d_values = _C.transpose_reduce(values, indices, g, W_dec.shape[0], W_dec)
        db_dec = g.sum(0)
        return d_values, dW_dec, db_dec
