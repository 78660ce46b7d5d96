"""Sparsity rules beyond per-row Top-K, built on the fused Top-K encoder (``ops.topk_encode``), never dense.

Rules (each exact against its dense oracle in :mod:`dlmscope.reference`):

- :func:`threshold_encode`: the entries with ``pre > threshold`` (JumpReLU, BatchTopK at inference);
- :func:`batch_topk_encode`: BatchTopK in training (the ``B·k`` largest entries of the whole batch, ties kept);
  :func:`batch_topk_encode_aux` adds AuxK's selection among given latents from the same first encoder call;
- :func:`jumprelu_candidates` + :func:`jumprelu` / :func:`jumprelu_l0` (= :func:`jumprelu_encode`; both at once:
  :func:`jumprelu_with_l0`): JumpReLU and its L0 penalty, with the straight-through gradient to the threshold.

Layout: the padded sparse code of ``ops.topk_encode`` — ``values [..., c]`` and ``indices [..., c]`` int64, indices
distinct within a row, an inactive slot holds value 0 (at an index not otherwise in the row). It feeds
``ops.sparse_decode`` unchanged (a zero value contributes nothing, to the output or to any gradient) and costs
``B·c`` memory, never ``B·n``. ``c`` is the caller's ``cap`` unless a row has more active entries than that: such
rows are re-encoded with a doubled width (up to ``n``) until every row is complete, and all rows come back at the
largest width used — the output width is the cap, or a power-of-two multiple of it, not ``n`` (unless reached).

Method: a rule "keep the entries above t" is the per-row top-``c`` of ``relu(pre − t)``, i.e. ``ops.topk_encode``
with the bias ``b_enc − t``; a row whose smallest candidate is still positive may have lost entries, which is the
redo test. Gradients to x, W_enc, b_enc, b_dec flow through ``ops.topk_encode``'s autograd (any backend); the
shifts are detached, so thresholds get gradient only from the JumpReLU straight-through terms.
Leading dimensions of x are flattened into one batch (BatchTopK's batch is all of them) and restored.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch
from torch import Tensor

from dlmscope import ops

__all__ = ["threshold_encode", "batch_topk_encode", "batch_topk_encode_aux", "batch_topk_min_selected",
           "update_threshold_ema", "jumprelu_candidates", "jumprelu", "jumprelu_l0", "jumprelu_with_l0",
           "jumprelu_encode", "rectangle"]


# ---- the growing-cap selection ----------------------------------------------------------------------------------


def _require_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= int(value) <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")
    return int(value)


def _widen(values: Tensor, indices: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """values/indices [B, c] padded to [B, width] with zero values at indices new to each row: the first
    ``width − c`` numbers of ``0..width−1`` absent from the row (at most c of those width numbers are taken)."""
    B, c = values.shape
    extra = width - c
    if extra <= 0:
        return values, indices
    taken = torch.zeros(B, width + 1, dtype=torch.uint8, device=indices.device)
    taken.scatter_(1, indices.clamp_max(width), 1)  # indices >= width land in the spare last column
    free = torch.argsort(taken[:, :width], dim=1, stable=True)[:, :extra]  # the free numbers sort first, ascending
    return torch.cat([values, values.new_zeros(B, extra)], 1), torch.cat([indices, free], 1)


def _grow(x2: Tensor, W_enc: Tensor, bias: Tensor, b_dec: Tensor, cap: int, backend: str | None,
          redo: Callable[[Tensor], Tensor], first: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Top-c of ``relu((x2 − b_dec) W_encᵀ + bias)`` per row, c starting at ``cap``: while ``redo(values)`` (bool
    [B]) names rows and c < n, those rows are re-encoded at 2c (at most n) and every row is widened to 2c.
    ``first``: the top-``cap`` (values, indices) when the caller has already encoded them."""
    n = W_enc.shape[0]
    c = cap
    values, indices = ops.topk_encode(x2, W_enc, bias, b_dec, c, backend=backend) if first is None else first
    while c < n:
        rows = redo(values.detach()).nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        c = min(2 * c, n)
        v_rows, i_rows = ops.topk_encode(x2[rows], W_enc, bias, b_dec, c, backend=backend)
        values, indices = _widen(values, indices, c)
        values, indices = values.index_copy(0, rows, v_rows), indices.index_copy(0, rows, i_rows)
    return values, indices


def _flat(x: Tensor, W_enc: Tensor, cap) -> tuple[Tensor, tuple[int, ...], int]:
    """x [..., d] as [B, d], its leading shape, and ``cap`` clamped to n (a cap above n means n)."""
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor of shape [..., d]")
    cap = _require_int("cap", cap, 1, 2**62)
    return x.reshape(-1, x.shape[-1]), tuple(x.shape[:-1]), min(cap, W_enc.shape[0])


def _at(threshold: Tensor, indices: Tensor) -> Tensor:
    """The threshold of each slot [B, c]: ``threshold[indices]`` for a per-latent [n], the scalar for a 0-d one."""
    return threshold.expand(indices.shape) if threshold.dim() == 0 else threshold[indices]


def _above(x2, W_enc, b_enc, b_dec, t: Tensor, cap, backend) -> tuple[Tensor, Tensor, Tensor]:
    """(pre [B, c] at the selected slots, indices [B, c], kept [B, c] bool): every entry with pre > t (t [n] or
    0-d, detached, any sign), each row complete. ``pre`` is differentiable; where not kept it is meaningless."""
    t = torch.as_tensor(t, dtype=x2.dtype if not isinstance(t, Tensor) else None)  # a float in x's precision
    if t.dim() not in (0, 1) or (t.dim() == 1 and t.shape[0] != W_enc.shape[0]):
        raise ValueError(f"threshold must be 0-d or [n] = [{W_enc.shape[0]}], got shape {list(t.shape)}")
    t = t.detach().to(device=x2.device, dtype=x2.dtype)
    shifted, indices = _grow(x2, W_enc, b_enc - t, b_dec, cap, backend,
                             lambda v: v.min(1).values > 0)  # a full row may have more above t
    kept = shifted > 0
    return shifted + _at(t, indices), indices, kept


# ---- threshold rule (JumpReLU, BatchTopK at inference) ----------------------------------------------------------


def threshold_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, threshold: Tensor, cap: int, *,
                     backend: str | None = None) -> tuple[Tensor, Tensor]:
    """(values [..., c], indices [..., c]): exactly the entries with ``pre > threshold``, value = pre, the rest of
    the slots zero — ``reference.threshold_encode`` in the padded sparse layout.

    threshold: [n] per latent or 0-d, >= 0 (then every kept value is positive); no gradient reaches it.
    c = ``cap`` (clamped to n), doubled while some row has more entries above threshold (see the module doc)."""
    x2, lead, cap = _flat(x, W_enc, cap)
    pre, indices, kept = _above(x2, W_enc, b_enc, b_dec, threshold, cap, backend)
    values = torch.where(kept, pre, torch.zeros_like(pre))
    return values.reshape(*lead, -1), indices.reshape(*lead, -1)


# ---- BatchTopK --------------------------------------------------------------------------------------------------


def _tau(values: Tensor, k: int) -> Tensor:
    """The (B·k)-th largest entry of candidates [B, c] (c >= k, so B·c >= B·k): 0-d."""
    return values.flatten().topk(values.shape[0] * k, sorted=False).values.min()


def batch_topk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, cap: int, *,
                      backend: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(values [..., c], indices [..., c], tau 0-d): BatchTopK in training = ``reference.batchtopk_encode``.

    Of relu(pre) over the whole batch (all leading rows, B of them) the entries ``>= tau`` and ``> 0`` are kept,
    tau the (B·k)-th largest entry; ties at tau are all kept; with fewer than B·k positive entries tau = 0 and every
    positive entry is kept. ``tau`` (detached) is the batch's own threshold; the smallest kept value
    (:func:`batch_topk_min_selected`) is the statistic of the inference threshold.

    Exact: the per-row top-c candidates give tau_c <= tau. A row whose smallest candidate is 0 holds all its
    positives; one whose smallest candidate is < tau_c holds all its entries >= tau_c; any other row is re-encoded
    at 2c and tau_c recomputed (it only grows). When no row is left, the entries >= tau_c of the batch are exactly
    the candidates >= tau_c, at least B·k of them, so tau_c is the batch's tau. c starts at max(cap, k), <= n."""
    values, indices, tau, _, _ = _batch_topk(x, W_enc, b_enc, b_dec, k, cap, None, 0, backend)
    return values, indices, tau


def batch_topk_encode_aux(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, cap: int,
                          aux_mask: Tensor, k_aux: int, *, backend: str | None = None
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`batch_topk_encode` plus AuxK's selection, ``(values, indices, tau, aux_values [..., k_aux],
    aux_indices [..., k_aux])``: per row the ``k_aux`` largest relu'd pre-activations among the latents where
    ``aux_mask`` [n] (bool) is True, zero-padded where fewer are (``ops.topk_encode_grouped``'s AuxK selection).
    It comes out of the code's first encoder op call, without a host sync; the code is the same as without it."""
    return _batch_topk(x, W_enc, b_enc, b_dec, k, cap, aux_mask, k_aux, backend)


def _batch_topk(x, W_enc, b_enc, b_dec, k, cap, aux_mask, k_aux, backend):
    """:func:`batch_topk_encode` (its doc says how), with :func:`batch_topk_encode_aux`'s selection where
    ``aux_mask`` is given (else None, None)."""
    x2, lead, cap = _flat(x, W_enc, cap)
    n = W_enc.shape[0]
    k = _require_int("k", k, 1, n)
    c = max(cap, k)
    first = aux = None  # without a mask _grow's plain first encode, as every other rule's
    if aux_mask is not None:
        codes = ops.topk_encode_grouped(x2, W_enc, b_enc, b_dec, [c], [n], aux_mask=aux_mask,
                                        k_aux=[_require_int("k_aux", k_aux, 0, n)], backend=backend)
        first, aux = (codes.values, codes.indices), (codes.aux_values.reshape(*lead, -1),
                                                     codes.aux_indices.reshape(*lead, -1))

    seen: dict = {}   # the last tau_c computed and the width it was computed at

    def redo(values: Tensor) -> Tensor:
        low = values.min(1).values
        seen["tau"], seen["width"] = _tau(values, k), values.shape[1]
        return (low > 0) & (low >= seen["tau"])

    values, indices = _grow(x2, W_enc, b_enc, b_dec, c, backend, redo, first)
    # the last redo saw these values unless the widening stopped at n after it
    tau = seen["tau"] if seen.get("width") == values.shape[1] else _tau(values.detach(), k)
    kept = (values >= tau) & (values > 0)
    values = torch.where(kept, values, torch.zeros_like(values))
    return values.reshape(*lead, -1), indices.reshape(*lead, -1), tau, *(aux or (None, None))


def _min_positive(values: Tensor) -> Tensor:
    """The smallest positive entry of ``values`` (0-d, detached; +inf when there is none), without a host sync."""
    v = values.detach()
    if v.numel() == 0:
        return v.new_full((), math.inf)
    return v.masked_fill(v <= 0, math.inf).amin()


def batch_topk_min_selected(values: Tensor) -> Tensor:
    """The smallest kept (positive) value of a code [..., c] (0-d, detached; 0 when nothing is kept) — the
    statistic of ``reference.batchtopk_min_selected``, read from the sparse code."""
    m = _min_positive(values)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


@torch.no_grad()
def update_threshold_ema(threshold: Tensor, updates: Tensor, values: Tensor, beta: float) -> None:
    """Fold one training batch's code [..., c] into an inference threshold's moving average, in place and without
    a host sync: ``θ ← β·θ + (1 − β)·m`` with ``m`` the smallest kept value (:func:`batch_topk_min_selected`), the
    first update (``updates == 0``) setting ``θ = m``; a batch that keeps nothing changes neither ``threshold``
    (0-d) nor ``updates`` (0-d int, the count of updates)."""
    m = _min_positive(values)
    has = torch.isfinite(m)
    m = m.to(threshold.dtype)
    new = torch.where(updates == 0, m, beta * threshold + (1 - beta) * m)
    threshold.copy_(torch.where(has, new, threshold))
    updates.add_(has.to(updates.dtype))


# ---- JumpReLU ---------------------------------------------------------------------------------------------------


def rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel ``1{|u| < 1/2}`` of JumpReLU's straight-through estimator."""
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """``pre · H(pre − θ)`` over the slots [B, c] (θ gathered per slot), with the pseudo-derivative of Rajamanoharan
    et al. (2024): ∂/∂θ = −(θ/ε) K((pre − θ)/ε); the gradient to ``pre`` is H(pre − θ)."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return torch.where(pre > theta, pre, torch.zeros_like(pre))  # where: a −inf slot gives 0, not NaN

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        d_pre = torch.where(pre > theta, g, torch.zeros_like(g))
        d_theta = -(theta / ctx.eps) * rectangle((pre - theta) / ctx.eps) * g
        return d_pre, d_theta, None


class _Step(torch.autograd.Function):
    """``H(pre − θ)`` over the slots [B, c], with ∂/∂θ = −(1/ε) K((pre − θ)/ε) and no gradient to ``pre``."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        return None, -(1.0 / ctx.eps) * rectangle((pre - theta) / ctx.eps) * g, None


def _theta(threshold: Tensor, pre: Tensor) -> Tensor:
    threshold = torch.as_tensor(threshold, dtype=pre.dtype if not isinstance(threshold, Tensor) else None)
    if threshold.dim() not in (0, 1):
        raise ValueError(f"threshold must be 0-d or [n], got shape {list(threshold.shape)}")
    return threshold.to(device=pre.device, dtype=pre.dtype)


def _eps(eps) -> float:
    eps = float(eps)
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps (the JumpReLU bandwidth) must be > 0 and finite, got {eps}")
    return eps


def jumprelu_candidates(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, threshold: Tensor, eps: float,
                        cap: int, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """(pre [..., c], indices [..., c]): every entry with ``pre > θ − ε/2`` — all of those above θ and all in the
    straight-through window ``|pre − θ| < ε/2`` — with its pre-activation; the other slots hold ``−inf`` (never
    above θ, outside every window). ``pre`` is differentiable to x, W_enc, b_enc, b_dec; θ ([n] or 0-d, > 0) gets no
    gradient here (it comes from :func:`jumprelu` / :func:`jumprelu_l0`). c as in :func:`threshold_encode`."""
    x2, lead, cap = _flat(x, W_enc, cap)
    eps = _eps(eps)
    theta = torch.as_tensor(threshold, dtype=x2.dtype if not isinstance(threshold, Tensor) else None).detach()
    pre, indices, kept = _above(x2, W_enc, b_enc, b_dec, theta - eps / 2, cap, backend)
    pre = torch.where(kept, pre, torch.full_like(pre, -math.inf))
    return pre.reshape(*lead, -1), indices.reshape(*lead, -1)


def jumprelu(pre: Tensor, indices: Tensor, threshold: Tensor, eps: float) -> Tensor:
    """values [..., c] = ``pre · H(pre − θ[indices])`` of :func:`jumprelu_candidates`' code: the sparse
    ``reference.jumprelu``, with its gradients — H to ``pre``, −(θ/ε)·K((pre − θ)/ε) to θ, summed over slots."""
    theta = _theta(threshold, pre)
    return _JumpReLU.apply(pre, _at(theta, indices), _eps(eps))


def jumprelu_l0(pre: Tensor, indices: Tensor, threshold: Tensor, eps: float) -> Tensor:
    """The L0 penalty (0-d): the mean over rows of the number of entries above θ, from :func:`jumprelu_candidates`'
    code — the sparse ``reference.jumprelu_l0``, with its straight-through gradient to θ (none to ``pre``)."""
    theta = _theta(threshold, pre)
    return _Step.apply(pre, _at(theta, indices), _eps(eps)).sum(-1).mean()


def jumprelu_with_l0(pre: Tensor, indices: Tensor, threshold: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(values [..., c], l0 0-d): :func:`jumprelu` and :func:`jumprelu_l0` of one code, with their gradients, from
    one gather of θ per slot (so one scatter of θ's gradient in the backward pass)."""
    theta, eps = _at(_theta(threshold, pre), indices), _eps(eps)
    return _JumpReLU.apply(pre, theta, eps), _Step.apply(pre, theta, eps).sum(-1).mean()


def jumprelu_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, threshold: Tensor, eps: float,
                    cap: int, *, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """(values [..., c], indices [..., c]): JumpReLU's code, ``jumprelu(*jumprelu_candidates(...))``; the values
    equal :func:`threshold_encode`'s at θ (the width may be larger: the window's entries are slots too) and carry
    the straight-through gradient to θ."""
    pre, indices = jumprelu_candidates(x, W_enc, b_enc, b_dec, threshold, eps, cap, backend=backend)
    return jumprelu(pre, indices, threshold, eps), indices
