"""The ``cuda`` backend: the primitives as the plain-CUDA kernels of ``csrc/cuda`` (``make cuda`` builds
``dlmscope/libdlmscope_cuda.so``; :mod:`.cuda_lib` binds it), the encoder GEMM on cuBLAS.

* ``encode`` runs ``addmm`` over latent chunks (``DLMSCOPE_CHUNK_LATENTS``, default 16384) into one reused
  ``[B, chunk]`` buffer, each chunk's top-k by the threshold-then-compact select kernel (radix search for the k-th
  value, then a block scan), and one more select over the ``[B, chunks * k]`` candidates. The ``B × n``
  pre-activations never exist.
* ``encode_grouped`` takes every SAE's selection *and* its AuxK selection from the same chunk buffer: AuxK costs
  one more select pass over a chunk already in L2, not a second GEMM.
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
from .base import Backend, SortCache
from .chunked_backend import chunk_latents
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

    # ---- encoder ------------------------------------------------------------------------------------
    def _select_chunks(self, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor,
                       selections: list[tuple[int, int, int, Tensor | None]]) -> list[tuple[Tensor, Tensor]]:
        """For each selection ``(start, stop, k, keep)`` over latent range [start, stop): the top-k of
        relu(pre) (with ``keep [stop - start]`` bool zeroing where False), from ONE pass of chunked GEMMs over
        the union of the ranges. Returns (values [B, k] x.dtype, indices [B, k] int64) per selection."""
        B = x.shape[0]
        xc = x - b_dec
        chunk = chunk_latents()
        n = W_enc.shape[0]
        buf = torch.empty((B, min(chunk, n)), dtype=x.dtype, device=x.device)
        # per selection: candidate columns [B, sum over the chunks it meets of min(k, overlap)] and the next column
        cands = []
        for start, stop, k, _keep in selections:
            width = sum(min(k, min(stop, c0 + chunk) - max(start, c0))
                        for c0 in range(start // chunk * chunk, stop, chunk))
            cands.append([torch.empty((B, width), dtype=torch.float32, device=x.device),
                          torch.empty((B, width), dtype=torch.int64, device=x.device), 0])
        keeps = [None if keep is None else keep.to(torch.uint8) for *_, keep in selections]  # converted once
        for c0 in range(0, n, chunk):
            c1 = min(c0 + chunk, n)
            users = [s for s, (start, stop, _, _) in enumerate(selections) if start < c1 and c0 < stop]
            if not users:
                continue
            pre = torch.addmm(b_enc[c0:c1], xc, W_enc[c0:c1].T, out=buf[:, :c1 - c0])
            for s in users:
                start, stop, k, _ = selections[s]
                lo, hi = max(start, c0), min(stop, c1)
                vals, ids, col = cands[s]
                kk = min(k, hi - lo)
                keep = keeps[s]
                cuda_lib.topk_select(pre[:, lo - c0:hi - c0], kk, vals, ids, col_offset=col, id_offset=lo - start,
                                     keep=None if keep is None else keep[lo - start:hi - start])
                cands[s][2] = col + kk
        out = []
        for (start, stop, k, _), (vals, ids, used) in zip(selections, cands):
            assert used == vals.shape[1], (used, vals.shape)
            if used > k:  # merge the chunks' candidates
                v = torch.empty((B, k), dtype=torch.float32, device=x.device)
                i = torch.empty((B, k), dtype=torch.int64, device=x.device)
                cuda_lib.topk_select(vals, k, v, i, in_ids=ids)
                vals, ids = v, i
            out.append((vals.to(x.dtype), ids))
        return out

    def encode(self, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return self._select_chunks(x, W_enc, b_enc, b_dec, [(0, W_enc.shape[0], k, None)])[0]

    def encode_grouped(self, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, ks: list[int],
                       sizes: list[int], aux_mask: Tensor | None,
                       k_aux: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every segment's top-k and (with ``aux_mask``) its AuxK top-k among masked latents, all off the same
        chunked GEMMs; indices global in [0, S)."""
        selections, starts = [], []
        start = 0
        for k, size in zip(ks, sizes):
            selections.append((start, start + size, k, None))
            starts.append(start)
            start += size
        n_main = len(selections)
        aux = []
        if aux_mask is not None:
            for g, (ka, st, size) in enumerate(zip(k_aux, starts, sizes)):
                if ka > 0:
                    selections.append((st, st + size, ka, aux_mask[st:st + size]))
                    aux.append(g)
        results = self._select_chunks(x, W_enc, b_enc, b_dec, selections)
        values = torch.cat([v for v, _ in results[:n_main]], 1)
        indices = torch.cat([i + st for (_, i), st in zip(results[:n_main], starts)], 1)
        if aux:
            aux_values = torch.cat([v for v, _ in results[n_main:]], 1)
            aux_indices = torch.cat([i + starts[g] for (_, i), g in zip(results[n_main:], aux)], 1)
        else:
            aux_values = x.new_empty(x.shape[0], 0)
            aux_indices = x.new_empty(x.shape[0], 0, dtype=torch.int64)
        return values, indices, aux_values, aux_indices

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
        db_dec = g.sum(0, dtype=torch.float32 if g.dtype in (torch.bfloat16, torch.float16) else None)
        return d_values, dW_dec, db_dec.to(g.dtype)

    def decoder_norm_step(self, W, grad, exp_avg, exp_avg_sq, step: int, lr: float, beta1: float,
                          beta2: float, eps: float) -> None:
        if W.shape[1] > MAX_D:
            return _TORCH.decoder_norm_step(W, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps)
        cuda_lib.decoder_norm_step(W, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps)
