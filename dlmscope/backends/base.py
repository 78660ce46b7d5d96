"""The backend contract: five primitives, and the SAE ops composed from them once for every backend.

A backend supplies the primitives below for already-validated, contiguous inputs (``ops.py`` validates and
makes inputs contiguous; a backend never re-validates). Shapes: ``B`` rows, ``d`` model width, ``n`` latents,
``k`` active latents per row. All float inputs of one call share one dtype; ``idx`` is int64. Outputs have
the float dtype of the inputs (accumulation happens in at least float32).

Primitives
  encode(x [B,d], W_enc [n,d], b_enc [n], b_dec [d], k) -> (values [B,k], indices [B,k] int64)
      values = the k largest entries of relu((x - b_dec) @ W_enc.T + b_enc) per row, indices distinct within a
      row; order within a row unspecified; rows with fewer than k positive entries are padded with zeros at
      distinct indices.
  gather_accumulate(coef [B,k], idx [B,k], W [n,d]) -> out [B,d]
      out[b] = sum_j coef[b,j] * W[idx[b,j]]                       (decoder forward, encoder dx)
  transpose_reduce(coef [B,k], idx [B,k], X [B,d], n) -> (out [n,d], coef_sum [n])
      out[i] = sum_{(b,j): idx[b,j]=i} coef[b,j] * X[b]; coef_sum[i] = sum of those coef; every row of ``out``
      is written exactly once (zero for latents that never occur)   (dW_enc, dW_dec, db_enc)
  sddmm(G [B,d], idx [B,k], W [n,d]) -> out [B,k]
      out[b,j] = <G[b], W[idx[b,j]]>                                 (d_values of the decoder)
  decoder_norm_step(W [n,d], grad [n,d], exp_avg [n,d], exp_avg_sq [n,d], step, lr, beta1, beta2, eps) -> None
      in place: g = grad - <grad, w_hat> w_hat per row (w_hat = W row / its norm); Adam exactly as
      torch.optim.Adam (bias-corrected, ``step`` counted from 1, eps added after the sqrt); then every row of W
      rescaled to unit norm. ``grad`` is not modified. Zero rows (as dlmscope/reference.py): a zero row of W has
      no w_hat, its gradient is used unprojected; a row whose norm is 0 after the Adam step stays exactly zero —
      never NaN or Inf (a per-row select on the norm, no extra pass over the matrix).

A backend may override ``decode_backward`` to fuse SDDMM into the transpose pass, and ``encode_grouped`` to run
several SAEs' encoders (and their AuxK selections) off one GEMM.
"""
from __future__ import annotations

import torch
from torch import Tensor


#: rows of W converted to float32 at a time by :func:`weighted_row_sum` (8192 × d × 4 bytes of scratch)
ROW_SUM_CHUNK = 8192


def weighted_row_sum(coef: Tensor, W: Tensor) -> Tensor:
    """``coef @ W`` (``coef [n]``, ``W [n, d]`` → ``[d]``), accumulated in float32 for bfloat16 / float16 without a
    float32 copy of the whole of ``W`` (at n = 131072, d = 4096 that copy alone is 2 GiB): rows are widened
    ``ROW_SUM_CHUNK`` at a time."""
    if W.dtype not in (torch.bfloat16, torch.float16):
        return coef.to(W.dtype) @ W
    out = torch.zeros(W.shape[1], dtype=torch.float32, device=W.device)
    for start in range(0, W.shape[0], ROW_SUM_CHUNK):
        stop = start + ROW_SUM_CHUNK
        out += coef[start:stop].float() @ W[start:stop].float()
    return out


def bias_grad(g: Tensor) -> Tensor:
    """``g.sum(0)`` in ``g``'s dtype, accumulated in float32 for bfloat16 / float16 (db_dec of the decoder)."""
    return g.sum(0, dtype=torch.float32 if g.dtype in (torch.bfloat16, torch.float16) else None).to(g.dtype)


def in_native_dtype(method, *args):
    """``method(*args)`` for a bound method of a :class:`Backend`; where that backend lacks the float dtype of
    the inputs, the float inputs are widened to float32 and the float outputs cast back to that dtype."""
    backend: Backend = method.__self__
    dtype = next((a.dtype for a in args if isinstance(a, Tensor) and a.is_floating_point()), None)
    if dtype is None or dtype in backend.native_dtypes:
        return method(*args)
    cast = [a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
    out = method(*cast)
    if isinstance(out, tuple):
        return tuple(o.to(dtype) if o.is_floating_point() else o for o in out)
    return out.to(dtype)


class SortCache:
    """The last sort of an ids tensor by latent, so that a training step's two transpose-reduces (dW_dec in the
    decoder's backward, dW_enc in the encoder's, over the same ``indices``) sort once.

    Keyed by the ids' address, shape, strides, version counter and ``n``. The cache holds a reference to the ids,
    so their memory cannot be reused by another tensor while the entry lives; an in-place change bumps the version.
    """

    def __init__(self, compute):
        self._compute = compute
        self._key = None
        self._ids: Tensor | None = None
        self._value = None

    def get(self, idx: Tensor, n: int):
        key = (idx.data_ptr(), tuple(idx.shape), idx.stride(), idx._version, int(n), idx.device)
        if key != self._key:
            self._value, self._key, self._ids = self._compute(idx, n), key, idx
        return self._value


class Backend:
    """Base class. Subclasses set ``name`` and implement the primitives; composites are shared."""

    name: str = "abstract"
    #: float dtypes the primitives accept natively; others are computed in float32 and cast back.
    native_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

    # ---- availability -------------------------------------------------------------------------------
    def is_available(self) -> bool:
        raise NotImplementedError

    def supports(self, device: torch.device) -> bool:
        """Whether this backend can run on tensors of ``device``."""
        raise NotImplementedError

    # ---- primitives ---------------------------------------------------------------------------------
    def encode(self, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def gather_accumulate(self, coef: Tensor, idx: Tensor, W: Tensor) -> Tensor:
        raise NotImplementedError

    def transpose_reduce(self, coef: Tensor, idx: Tensor, X: Tensor, n: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def sddmm(self, G: Tensor, idx: Tensor, W: Tensor) -> Tensor:
        raise NotImplementedError

    def decoder_norm_step(self, W, grad, exp_avg, exp_avg_sq, step: int, lr: float, beta1: float,
                          beta2: float, eps: float) -> None:
        raise NotImplementedError

    # ---- composites (shared by every backend) -------------------------------------------------------
    def encode_grouped(self, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, ks: list[int],
                       sizes: list[int], aux_mask: Tensor | None,
                       k_aux: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Top-k per latent segment, plus an optional auxiliary top-k among masked latents of each segment.

        W_enc [S,d] is the row-concatenation of segments of ``sizes`` latents (S = sum(sizes)); segment g keeps
        its ``ks[g]`` largest relu'd pre-activations, and, if ``aux_mask`` [S] bool is given, also its
        ``k_aux[g]`` largest among latents where aux_mask is True (others count as -inf, so a segment with
        fewer masked latents than k_aux[g] pads with zeros). Returns values [B, sum(ks)], indices (global, in
        [0, S)), aux_values [B, sum(k_aux)], aux_indices — blocks in segment order.
        This default runs one encode per segment (and one more per segment for the aux selection).
        """
        values, indices, aux_values, aux_indices = [], [], [], []
        start = 0
        for k, size, ka in zip(ks, sizes, k_aux):
            W, b = W_enc[start:start + size], b_enc[start:start + size]
            v, i = self.encode(x, W, b, b_dec, k)
            values.append(v)
            indices.append(i + start)
            if aux_mask is not None and ka > 0:
                b_aux = torch.where(aux_mask[start:start + size], b, torch.full_like(b, float("-inf")))
                v, i = self.encode(x, W, b_aux, b_dec, ka)
                aux_values.append(v)
                aux_indices.append(i + start)
            start += size
        empty_v, empty_i = x.new_empty(x.shape[0], 0), x.new_empty(x.shape[0], 0, dtype=torch.int64)
        return (torch.cat(values, 1), torch.cat(indices, 1),
                torch.cat(aux_values, 1) if aux_values else empty_v,
                torch.cat(aux_indices, 1) if aux_indices else empty_i)

    def decode(self, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
        """x_hat [B,d] = b_dec + sum_j values[b,j] W_dec[indices[b,j]]."""
        out = self.gather_accumulate(values, indices, W_dec)
        out += b_dec
        return out

    def encode_backward(self, d_values: Tensor, values: Tensor, indices: Tensor, x: Tensor, W_enc: Tensor,
                        b_dec: Tensor, need_dx: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Gradients (dx [B,d], dW_enc [n,d], db_enc [n], db_dec [d]) of topk_encode from d_values [B,k].

        Only the k selected pre-activations carry gradient, and only where relu passed (values > 0).
        db_dec = -sum_b dx[b] = -(db_enc @ W_enc), so dx (a gather over B·k rows) is computed only when
        ``need_dx``; otherwise an empty tensor is returned in its place (SAE training never needs dx).
        """
        d_pre = torch.where(values > 0, d_values, torch.zeros_like(d_values))
        dW_enc, db_enc = self.transpose_reduce(d_pre, indices, x - b_dec, W_enc.shape[0])
        db_dec = -weighted_row_sum(db_enc, W_enc)
        dx = self.gather_accumulate(d_pre, indices, W_enc) if need_dx else x.new_empty(0)
        return dx, dW_enc, db_enc, db_dec.to(b_dec.dtype)

    def decode_backward(self, g: Tensor, values: Tensor, indices: Tensor,
                        W_dec: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Gradients (d_values [B,k], dW_dec [n,d], db_dec [d]) of sparse_decode from g = dL/dx_hat [B,d]."""
        d_values = self.sddmm(g, indices, W_dec)
        dW_dec, _ = self.transpose_reduce(values, indices, g, W_dec.shape[0])
        return d_values, dW_dec, bias_grad(g)
