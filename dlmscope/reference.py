"""Plain-PyTorch implementation of every dlmscope op: the test oracle and the dense benchmark baseline.

Written for clarity, not speed: dense B×n pre-activations, dense scatter-then-matmul decoding (what the
DLM-Scope paper's code does), gradients by ordinary autograd. It imports no kernel and no backend, so it stays
an independent judge of them. Works in any float dtype, float64 included.

Conventions (DESIGN.md): x [B,d]; W_enc [n,d]; b_enc [n]; W_dec [n,d] with unit-norm rows; b_dec [d].
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


def forward(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, k: int) -> Tensor:
    """A Top-K SAE's reconstruction x_hat [B,d] of x [B,d]."""
    values, indices = topk_encode(x, W_enc, b_enc, b_dec, k)
    return sparse_decode(values, indices, W_dec, b_dec)


def project_out_parallel(grad: Tensor, W: Tensor) -> Tensor:
    """grad with each row's component along the unit direction of the matching row of W removed."""
    w_hat = W / W.norm(dim=-1, keepdim=True)
    return grad - (grad * w_hat).sum(-1, keepdim=True) * w_hat


def normalize_rows(W: Tensor) -> Tensor:
    """W with every row scaled to unit L2 norm."""
    return W / W.norm(dim=-1, keepdim=True)


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
    """The paper's decoder update, in place: project the gradient off the unit decoder rows, Adam, renormalise."""
    g = project_out_parallel(grad, W_dec)
    adam_update(W_dec, g, exp_avg, exp_avg_sq, step, lr, betas[0], betas[1], eps)
    W_dec.copy_(normalize_rows(W_dec))


def fraction_of_variance_explained(x: Tensor, x_hat: Tensor) -> Tensor:
    """FVE = 1 - sum_d Var_b(x - x_hat) / sum_d Var_b(x)  (REFERENCE.md §4)."""
    return 1 - (x - x_hat).var(0, unbiased=False).sum() / x.var(0, unbiased=False).sum()


def dense_train_step(sae, opt: torch.optim.Optimizer, x: Tensor, grad_clip: float | None = 1.0) -> Tensor:
    """One step of the paper's plain-PyTorch recipe (the speed baseline): dense Top-K encode, scatter decode,
    MSE, autograd, decoder gradient projected off the unit rows, global grad-norm clip, ``opt.step()``,
    decoder rows renormalised. ``sae`` has ``W_enc, b_enc, W_dec, b_dec, k``; ``x`` is ``[B, d]``. Returns the loss."""
    values, indices = topk_encode(x, sae.W_enc, sae.b_enc, sae.b_dec, sae.k)
    x_hat = sparse_decode(values, indices, sae.W_dec, sae.b_dec)
    loss = (x - x_hat).pow(2).sum(-1).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        sae.W_dec.grad.copy_(project_out_parallel(sae.W_dec.grad, sae.W_dec))
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec], grad_clip)
    opt.step()
    with torch.no_grad():
        sae.W_dec.copy_(normalize_rows(sae.W_dec))
    return loss.detach()
