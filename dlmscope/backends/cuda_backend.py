"""The ``cuda`` backend: the primitives as the plain-CUDA kernels of ``csrc/cuda`` (``make cuda`` builds
``dlmscope/libdlmscope_cuda.so``; :mod:`.cuda_lib` binds it), the encoder GEMM on cuBLAS.

* ``encode`` / ``encode_grouped`` drive :func:`.chunked_backend.select_over_chunks` with the CUDA select: one
  ``addmm`` per latent chunk (``DLMSCOPE_CHUNK_LATENTS``, default 16384), each selection's top-k of it by the
  threshold-then-compact kernel (radix search for the k-th value, then a block scan), the candidates merged by
  the same kernel. The ``B × n`` pre-activations never exist, and every SAE's AuxK selection comes from the same
  chunks as its main selection: one more select pass over a chunk in L2, not a second GEMM.
* ``transpose_reduce`` is one stable cub radix sort of the B·k ids (cached per ids tensor: the decoder's and the
  encoder's backward share it) and a reduction in fixed-size chunks of sorted entries, so a latent firing on most
  rows is split across blocks; ``decode_backward`` fuses the SDDMM (d_values) into that pass.
* ``decoder_norm_step`` is one block per row in registers.
* Rows wider than ``MAX_D`` (16384) take the torch backend's transpose-reduce and decoder-norm step.

Never chosen by default: pick it by name (``backend="cuda"`` / ``DLMSCOPE_BACKEND=cuda``) — it has not yet been
validated on a GPU (``scripts/gpu_check.sh`` runs its tests and times it).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import cuda_lib
from .base import Backend, SortCache, bias_grad
from .chunked_backend import assemble_grouped, chunk_latents, grouped_selections, select_over_chunks
from .torch_backend import TorchBackend

#: widest row the register-resident row kernels take (transpose-reduce, decoder-norm); wider rows use torch's
MAX_D = 16384
_TORCH = TorchBackend()


class CudaBackend(Backend):
    name = "cuda"
    native_dtypes = (torch.float32, torch.bfloat16, torch.float16)

    def __init__(self):
        self._sorts = SortCache(cuda_lib.sort_by_latent)

    def is_available(self) -> bool:
        return torch.cuda.is_available() and cuda_lib.usable()

    def supports(self, device: torch.device) -> bool:
        return torch.device(device).type == "cuda"

    # ---- encoder ----------------------------------------------------------------------------------------
    @staticmethod
    def _select(pre, k, keep, vals, ids, col, id_offset):
        cuda_lib.topk_select(pre, k, vals, ids, col_offset=col, id_offset=id_offset, keep=keep)

    @staticmethod
    def _merge(vals, ids, k):
        v = torch.empty((vals.shape[0], k), dtype=torch.float32, device=vals.device)
        i = torch.empty((vals.shape[0], k), dtype=torch.int64, device=vals.device)
        cuda_lib.topk_select(vals.contiguous(), k, v, i, in_ids=ids.contiguous())  # in_ids: dense [rows, cols]
        return v, i

    def _pass(self, x, W_enc, b_enc, b_dec, selections):
        return select_over_chunks(x, W_enc, b_enc, b_dec, selections, self._select, self._merge, chunk_latents())

    def encode(self, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return self._pass(x, W_enc, b_enc, b_dec, [(0, W_enc.shape[0], k, None)])[0]

    def encode_grouped(self, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, ks: list[int],
                       sizes: list[int], aux_mask: Tensor | None,
                       k_aux: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every segment's top-k and (with ``aux_mask``) its AuxK top-k among masked latents, all off the same
        chunked GEMMs; indices global in [0, S)."""
        selections, starts, aux = grouped_selections(ks, sizes, aux_mask, k_aux)
        return assemble_grouped(x, self._pass(x, W_enc, b_enc, b_dec, selections), starts, aux)

    # ---- sparse primitives --------------------------------------------------------------------------
    def gather_accumulate(self, coef: Tensor, idx: Tensor, W: Tensor) -> Tensor:
        return cuda_lib.gather_accumulate(coef, idx, W)

    def sddmm(self, G: Tensor, idx: Tensor, W: Tensor) -> Tensor:
        return cuda_lib.sddmm(G, idx, W)

    def transpose_reduce(self, coef: Tensor, idx: Tensor, X: Tensor, n: int) -> tuple[Tensor, Tensor]:
        if X.shape[1] > MAX_D:
            return _TORCH.transpose_reduce(coef, idx, X, n)
        out, coef_sum, _ = cuda_lib.transpose_reduce(coef, self._sorts.get(idx, n), X, n)
        return out, coef_sum

    def decode_backward(self, g: Tensor, values: Tensor, indices: Tensor,
                        W_dec: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(d_values, dW_dec, db_dec): the SDDMM fused into the transpose-reduce pass over g."""
        if g.shape[1] > MAX_D:
            return super().decode_backward(g, values, indices, W_dec)
        dW_dec, _, d_values = cuda_lib.transpose_reduce(values, self._sorts.get(indices, W_dec.shape[0]), g,
                                                        W_dec.shape[0], W=W_dec)
        return d_values, dW_dec, bias_grad(g)

    def decoder_norm_step(self, W, grad, exp_avg, exp_avg_sq, step: int, lr: float, beta1: float,
                          beta2: float, eps: float) -> None:
        if W.shape[1] > MAX_D:
            return _TORCH.decoder_norm_step(W, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps)
        cuda_lib.decoder_norm_step(W, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps)
