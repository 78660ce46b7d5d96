"""Fused decoder-norm step: project the gradient off each row, Adam, renormalise the row — in place.

Per row (one program per row): ``w_hat = W / |W|``; ``g = grad - <grad, w_hat> w_hat``;
``m = b1 m + (1 - b1) g``; ``v = b2 v + (1 - b2) g^2``; ``W -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)``
exactly as torch.optim.Adam; then ``W /= |W|``. Math in fp32 (IEEE sqrt and division), stores in the tensors'
dtypes. Zero rows as ``dlmscope.reference`` defines them, by per-row selects (no extra pass): a row of W with
``|W|^2 == 0`` takes its gradient unprojected (``<grad, w_hat> = 0``), a row whose updated ``|W|^2`` is 0 is
stored as is (exactly zero, never NaN/Inf); the projection coefficient is ``<grad, w> / |w|^2`` as one division
(no reciprocal of ``|w|^2``, which overflows for a subnormal ``|w|^2``). ``grad`` is read only. When the row
fits one block it stays in registers (one read, one write of each tensor); otherwise three sweeps: norms, new-row
norm (recomputed, nothing stored), final update and stores — the update is recomputed bit-identically from the original values, so the stored row is exactly the
normalised one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import norm_block_d, norm_warps


@triton.jit
def _proj_coef(gw, ww):
    """<g, w> / |w|^2, or 0 for a zero row (no direction to project off)."""
    return tl.where(ww > 0.0, tl.div_rn(gw, tl.where(ww > 0.0, ww, 1.0)), 0.0)


@triton.jit
def _row_scale(nn):
    """The norm a row with updated |w|^2 = nn is divided by: 1 for a zero row (stays zero)."""
    return tl.sqrt_rn(tl.where(nn > 0.0, nn, 1.0))


@triton.jit
def _adam_row(w, g, m, v, proj, one_m_b1, beta2, one_m_b2, step_size, sqrt_bc2, eps):
    g = g - proj * w  # <g, w_hat> w_hat = (<g, w> / |w|^2) w
    m = m + one_m_b1 * (g - m)  # torch: exp_avg.lerp_(g, 1 - beta1)
    v = v * beta2 + one_m_b2 * g * g  # torch: exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = tl.div_rn(tl.sqrt_rn(v), sqrt_bc2) + eps  # IEEE sqrt / div, as torch (tl.sqrt is approximate)
    w = w - step_size * tl.div_rn(m, denom)
    return w, m, v


@triton.jit
def _decoder_norm_kernel(
    w_ptr, g_ptr, m_ptr, v_ptr,
    D, stride_w, stride_g, stride_m, stride_v,
    one_m_b1, beta2, one_m_b2, step_size, sqrt_bc2, eps,
    BLOCK_D: tl.constexpr, SINGLE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    wr = w_ptr + row * stride_w
    gr = g_ptr + row * stride_g
    mr = m_ptr + row * stride_m
    vr = v_ptr + row * stride_v
    if SINGLE:
        dd = tl.arange(0, BLOCK_D)
        mask = dd < D
        w = tl.load(wr + dd, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gr + dd, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(mr + dd, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(vr + dd, mask=mask, other=0.0).to(tl.float32)
        ww = tl.sum(w * w, axis=0)
        gw = tl.sum(g * w, axis=0)
        proj = _proj_coef(gw, ww)
        w, m, v = _adam_row(w, g, m, v, proj, one_m_b1, beta2, one_m_b2, step_size, sqrt_bc2, eps)
        nn = tl.sum(tl.where(mask, w * w, 0.0), axis=0)
        nrm = _row_scale(nn)
        tl.store(mr + dd, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(vr + dd, v.to(v_ptr.dtype.element_ty), mask=mask)
        tl.store(wr + dd, tl.div_rn(w, nrm).to(w_ptr.dtype.element_ty), mask=mask)
    else:
        ww_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        gw_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            mask = dd < D
            w = tl.load(wr + dd, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(gr + dd, mask=mask, other=0.0).to(tl.float32)
            ww_acc += w * w
            gw_acc += g * w
        ww = tl.sum(ww_acc, axis=0)
        gw = tl.sum(gw_acc, axis=0)
        proj = _proj_coef(gw, ww)
        nn_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            mask = dd < D
            w = tl.load(wr + dd, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(gr + dd, mask=mask, other=0.0).to(tl.float32)
            m = tl.load(mr + dd, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(vr + dd, mask=mask, other=0.0).to(tl.float32)
            w, m, v = _adam_row(w, g, m, v, proj, one_m_b1, beta2, one_m_b2, step_size, sqrt_bc2, eps)
            nn_acc += tl.where(mask, w * w, 0.0)
        nn = tl.sum(nn_acc, axis=0)
        nrm = _row_scale(nn)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            mask = dd < D
            w = tl.load(wr + dd, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(gr + dd, mask=mask, other=0.0).to(tl.float32)
            m = tl.load(mr + dd, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(vr + dd, mask=mask, other=0.0).to(tl.float32)
            w, m, v = _adam_row(w, g, m, v, proj, one_m_b1, beta2, one_m_b2, step_size, sqrt_bc2, eps)
            tl.store(mr + dd, m.to(m_ptr.dtype.element_ty), mask=mask)
            tl.store(vr + dd, v.to(v_ptr.dtype.element_ty), mask=mask)
            tl.store(wr + dd, tl.div_rn(w, nrm).to(w_ptr.dtype.element_ty), mask=mask)


def decoder_norm_step(W: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                      step: int, lr: float, beta1: float, beta2: float, eps: float) -> None:
    """In place on W, exp_avg, exp_avg_sq (rows contiguous); ``step`` counted from 1."""
    n, d = W.shape
    if n == 0 or d == 0:
        return
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    step_size = lr / bc1
    sqrt_bc2 = bc2 ** 0.5
    BLOCK_D = norm_block_d(W, d)
    single = BLOCK_D >= d
    _decoder_norm_kernel[(n,)](
        W, grad, exp_avg, exp_avg_sq,
        d, W.stride(0), grad.stride(0), exp_avg.stride(0), exp_avg_sq.stride(0),
        float(1.0 - beta1), float(beta2), float(1.0 - beta2), float(step_size), float(sqrt_bc2), float(eps),
        BLOCK_D=BLOCK_D, SINGLE=single, num_warps=norm_warps(W, BLOCK_D),
    )
