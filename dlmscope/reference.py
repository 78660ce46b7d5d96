"""Plain-PyTorch implementation of every dlmscope op: the test oracle and the dense benchmark baseline.

Written for clarity, not speed: dense B×n pre-activations, dense scatter-then-matmul decoding (what the
DLM-Scope paper's code does), gradients by ordinary autograd. It imports no kernel and no backend, so it stays
an independent judge of them. Works in any float dtype, float64 included.

Contents
  the public ops: ``topk_encode`` (via ``pre_activations``), ``sparse_decode`` (via ``densify``),
  ``decoder_norm_step`` (= ``project_out_parallel`` + ``adam_update`` + ``normalize_rows``) and ``forward``
  (encode then decode);
  the backend primitives (dlmscope/backends/base.py): ``gather_accumulate``, ``transpose_reduce``, ``sddmm``;
  the other sparsity rules: ``batchtopk_encode`` (+ ``batchtopk_min_selected``, the inference threshold's
  statistic), ``threshold_encode`` (JumpReLU / BatchTopK inference), ``jumprelu`` and ``jumprelu_l0`` (with the
  straight-through threshold gradient), ``matryoshka_reconstructions`` / ``matryoshka_loss``; the crosscoder's
  ``crosscoder_code`` / ``crosscoder_decode``;
  the metric ``fraction_of_variance_explained``;
  the plain-PyTorch training step ``dense_train_step`` = ``dense_loss`` (``mse_loss`` of the dense
  reconstruction) + backward + ``dense_update``.

Zero decoder rows (the definition every backend follows): a row of W_dec with zero norm has no direction, so
``project_out_parallel`` leaves its gradient row unprojected and ``normalize_rows`` leaves it exactly zero; hence
``decoder_norm_step`` turns a zero row into a unit row when its Adam update is nonzero and keeps it exactly zero
when the update is zero (a zero gradient row with a zero ``exp_avg`` row). Nothing here produces NaN or Inf
from a zero row.

Conventions (docs/design.md): x [B,d]; W_enc [n,d]; b_enc [n]; W_dec [n,d] with unit-norm (or zero) rows; b_dec [d].
"""
from __future__ import annotations

import torch
from torch import Tensor


def pre_activations(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
    """pre [B,n] = (x - b_dec) @ W_enc.T + b_enc."""
    return (x - b_dec) @ W_enc.T + b_enc


def topk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """values [B,k], indices [B,k] int64: the k largest entries of relu(pre) per row (sorted descending)."""
    values, indices = torch.relu(pre_activations(x, W_enc, b_enc, b_dec)).topk(k, dim=-1)
    return values, indices


def densify(values: Tensor, indices: Tensor, n: int) -> Tensor:
    """The dense latent code [B,n] with values at indices (duplicate indices add up)."""
    dense = values.new_zeros(values.shape[0], n)
    return dense.scatter_add(1, indices.long(), values)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """x_hat [B,d] = b_dec + sum_j values[b,j] W_dec[indices[b,j]], computed densely (scatter into B×n, matmul)."""
    return densify(values, indices, W_dec.shape[0]) @ W_dec + b_dec


# ---- the backend primitives (dlmscope/backends/base.py), densely --------------------------------------------


def gather_accumulate(coef: Tensor, idx: Tensor, W: Tensor) -> Tensor:
    """out [B,d]: out[b] = sum_j coef[b,j] W[idx[b,j]] for coef, idx [B,k] and W [n,d]."""
    return densify(coef, idx, W.shape[0]) @ W


def transpose_reduce(coef: Tensor, idx: Tensor, X: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(out [n,d], coef_sum [n]): out[i] = sum over (b,j) with idx[b,j] = i of coef[b,j] X[b]; coef_sum[i] the
    sum of those coef. coef, idx [B,k]; X [B,d]; latents that never occur get zero rows."""
    dense = densify(coef, idx, n)
    return dense.T @ X, dense.sum(0)


def sddmm(G: Tensor, idx: Tensor, W: Tensor) -> Tensor:
    """out [B,k]: out[b,j] = <G[b], W[idx[b,j]]> for G [B,d], idx [B,k], W [n,d] (all B×n products, then gather)."""
    return (G @ W.T).gather(1, idx.long())


# ---- the other sparsity rules: BatchTopK, a threshold (JumpReLU, BatchTopK at inference), Matryoshka ----------


def batchtopk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int) -> Tensor:
    """The dense code [B,n] of BatchTopK in training (Bussmann et al. 2024): of relu(pre) over the whole batch,
    the entries ``>= tau`` are kept, ``tau`` the (B·k)-th largest entry of the batch; zeros are never kept. Ties
    at ``tau`` are all kept (then more than B·k are active); with fewer than B·k positive entries every positive
    one is kept. A row may keep anything from 0 to n latents."""
    act = torch.relu(pre_activations(x, W_enc, b_enc, b_dec))
    total = act.numel()
    tau = act.flatten().topk(min(k * act.shape[0], total)).values[-1] if total else act.new_zeros(())
    return act * ((act >= tau) & (act > 0))


def batchtopk_min_selected(code: Tensor) -> Tensor:
    """The smallest kept (positive) entry of a BatchTopK code [B,n] (0-d; 0 when nothing was kept): the per-batch
    statistic whose running mean is the inference threshold."""
    kept = code[code > 0]
    return kept.min() if kept.numel() else code.new_zeros(())


def threshold_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, threshold: Tensor) -> Tensor:
    """The dense code [B,n] of a threshold rule: pre where ``pre > threshold`` (per latent [n], or a scalar), else 0
    — JumpReLU (Rajamanoharan et al. 2024, SAELens ``jumprelu``) and BatchTopK at inference (one global
    threshold). ``threshold`` must be >= 0, so a kept entry is positive."""
    pre = pre_activations(x, W_enc, b_enc, b_dec)
    return pre * (pre > threshold)


def rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel ``1{|u| < 1/2}`` of JumpReLU's straight-through estimator."""
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """``pre · H(pre − θ)`` with the pseudo-derivative of Rajamanoharan et al. (2024) for θ:
    ∂/∂θ = −(θ/ε) K((pre − θ)/ε); the gradient to ``pre`` is H(pre − θ) (the function's own)."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        d_pre = g * (pre > theta)
        d_theta = -(theta / ctx.eps) * rectangle((pre - theta) / ctx.eps) * g
        return d_pre, d_theta.reshape(-1, *theta.shape).sum(0), None


class _Step(torch.autograd.Function):
    """``H(pre − θ)`` (the L0 count) with the pseudo-derivative ∂/∂θ = −(1/ε) K((pre − θ)/ε); none to ``pre``."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta = ctx.saved_tensors
        d_theta = -(1.0 / ctx.eps) * rectangle((pre - theta) / ctx.eps) * g
        return None, d_theta.reshape(-1, *theta.shape).sum(0), None


def jumprelu(pre: Tensor, threshold: Tensor, eps: float) -> Tensor:
    """JumpReLU ``pre · H(pre − θ)`` of pre [B,n] and θ [n] (> 0), with the straight-through gradient for θ
    (bandwidth ``eps``), dense."""
    return _JumpReLU.apply(pre, threshold, eps)


def jumprelu_l0(pre: Tensor, threshold: Tensor, eps: float) -> Tensor:
    """The L0 sparsity penalty of JumpReLU: the mean over rows of the number of entries above θ, with the
    straight-through gradient for θ (none to ``pre``), dense."""
    return _Step.apply(pre, threshold, eps).sum(-1).mean()


def matryoshka_reconstructions(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor,
                               prefixes: list[int]) -> Tensor:
    """[P,B,d]: for each prefix size m of ``prefixes`` (increasing, the last = n), the reconstruction from the
    active latents whose index is below m only (Bussmann et al. 2025; the nested dictionaries of a Matryoshka
    SAE), each a dense decode."""
    return torch.stack([sparse_decode(values * (indices < m), indices, W_dec, b_dec) for m in prefixes])


def matryoshka_loss(x: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor,
                    prefixes: list[int]) -> Tensor:
    """The Matryoshka training loss: the sum over prefixes of ``mse_loss`` of their reconstructions."""
    recon = matryoshka_reconstructions(values, indices, W_dec, b_dec, prefixes)
    return sum(mse_loss(x, r) for r in recon)


def crosscoder_code(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, rule: str = "topk") -> Tensor:
    """Dense code [B,n] of a crosscoder over S sources: Top-K (or BatchTopK in training) of
    relu(concat_s(x_s − b_dec[s]) W_encᵀ + b_enc); x [B,S,d], W_enc [n,S·d], b_enc [n], b_dec [S,d]."""
    x_cat, b_cat = x.reshape(x.shape[0], -1), b_dec.reshape(-1)
    if rule == "batchtopk":
        return batchtopk_encode(x_cat, W_enc, b_enc, b_cat, k)
    values, indices = topk_encode(x_cat, W_enc, b_enc, b_cat, k)
    return densify(values, indices, W_enc.shape[0])


def crosscoder_decode(code: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """x̂ [B,S,d] = code [B,n] @ W_dec[s] + b_dec[s] for every source s; W_dec [S,n,d], b_dec [S,d]."""
    return torch.einsum("bn,snd->bsd", code, W_dec) + b_dec[None]


def forward(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, k: int) -> Tensor:
    """A Top-K SAE's reconstruction x_hat [B,d] of x [B,d]."""
    values, indices = topk_encode(x, W_enc, b_enc, b_dec, k)
    return sparse_decode(values, indices, W_dec, b_dec)


def _row_norms(W: Tensor) -> Tensor:
    """[..., 1]: each row's L2 norm, with 1 in place of 0 (dividing a zero row by it leaves the row zero)."""
    norm = W.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, norm, torch.ones_like(norm))


def project_out_parallel(grad: Tensor, W: Tensor) -> Tensor:
    """grad with each row's component along the unit direction of the matching row of W removed; where that row of
    W is zero (no direction) the grad row is returned unchanged."""
    w_hat = W / _row_norms(W)  # a zero row gives w_hat = 0: nothing removed
    return grad - (grad * w_hat).sum(-1, keepdim=True) * w_hat


def normalize_rows(W: Tensor) -> Tensor:
    """W with every nonzero row scaled to unit L2 norm; zero rows stay exactly zero (never NaN)."""
    return W / _row_norms(W)


def adam_update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, lr: float,
                beta1: float, beta2: float, eps: float) -> None:
    """One step of torch.optim.Adam (no weight decay, no amsgrad), in place, ``step`` counted from 1."""
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


@torch.no_grad()
def decoder_norm_step(W_dec: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, lr: float,
                      betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """The paper's decoder update, in place: project the gradient off the unit decoder rows, Adam, renormalise.

    A zero row of ``W_dec`` takes its gradient unprojected; after the Adam step a row of nonzero norm is rescaled
    to unit norm and a row still zero stays exactly zero (see the module docstring)."""
    g = project_out_parallel(grad, W_dec)
    adam_update(W_dec, g, exp_avg, exp_avg_sq, step, lr, betas[0], betas[1], eps)
    W_dec.copy_(normalize_rows(W_dec))


def fraction_of_variance_explained(x: Tensor, x_hat: Tensor) -> Tensor:
    """FVE = 1 - sum_d Var_b(x - x_hat) / sum_d Var_b(x)  (docs/reference.md §4)."""
    return 1 - (x - x_hat).var(0, unbiased=False).sum() / x.var(0, unbiased=False).sum()


def mse_loss(x: Tensor, x_hat: Tensor) -> Tensor:
    """The training loss: mean over b of ||x[b] - x_hat[b]||^2 for x, x_hat [B,d] (0-d; summed in float32 for
    bfloat16/float16 inputs)."""
    err = x - x_hat
    if err.dtype in (torch.bfloat16, torch.float16):
        err = err.float()
    return err.pow(2).sum(-1).mean()


def dense_loss(sae, x: Tensor) -> Tensor:
    """``mse_loss`` of the dense Top-K reconstruction of ``x`` [B,d]; ``sae`` has ``W_enc, b_enc, W_dec, b_dec, k``."""
    values, indices = topk_encode(x, sae.W_enc, sae.b_enc, sae.b_dec, sae.k)
    return mse_loss(x, sparse_decode(values, indices, sae.W_dec, sae.b_dec))


def dense_update(sae, opt: torch.optim.Optimizer, grad_clip: float | None = 1.0) -> None:
    """The update after ``backward``: W_dec's gradient projected off its unit rows, the global grad norm of the four
    parameters clipped to ``grad_clip`` (None: no clipping), ``opt.step()``, W_dec's rows renormalised."""
    with torch.no_grad():
        sae.W_dec.grad.copy_(project_out_parallel(sae.W_dec.grad, sae.W_dec))
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec], grad_clip)
    opt.step()
    with torch.no_grad():
        sae.W_dec.copy_(normalize_rows(sae.W_dec))


def dense_train_step(sae, opt: torch.optim.Optimizer, x: Tensor, grad_clip: float | None = 1.0) -> Tensor:
    """One step of the paper's plain-PyTorch recipe (the speed baseline): ``dense_loss`` (dense Top-K encode,
    scatter decode, MSE), autograd, ``dense_update``. ``sae`` has ``W_enc, b_enc, W_dec, b_dec, k`` (leaf
    parameters that ``opt`` updates); ``x`` is ``[B, d]``. Returns the loss (detached)."""
    loss = dense_loss(sae, x)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    dense_update(sae, opt, grad_clip)
    return loss.detach()
