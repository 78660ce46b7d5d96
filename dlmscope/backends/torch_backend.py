"""The ``torch`` backend: the sparse primitives in plain PyTorch (embedding_bag / index_add_), any device.

This is what a careful PyTorch user writes without custom kernels: the encoder is the unfused
``addmm`` + ``relu`` + ``topk`` over the full B×n pre-activations, the decoder is ``embedding_bag``, the decoder
update is whole-tensor in-place ops. It is the second benchmark baseline (the first, dense scatter-then-matmul,
is ``dlmscope.reference``) and, like every backend, is checked against ``reference``, so it imports none of it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Backend


class TorchBackend(Backend):
    name = "torch"

    def is_available(self) -> bool:
        return True

    def supports(self, device: torch.device) -> bool:
        return True

    def encode(self, x, W_enc, b_enc, b_dec, k):
        pre = torch.addmm(b_enc, x - b_dec, W_enc.T)
        return torch.relu_(pre).topk(k, dim=-1, sorted=False)

    def gather_accumulate(self, coef: Tensor, idx: Tensor, W: Tensor) -> Tensor:
        if idx.shape[1] == 0:  # embedding_bag refuses bags of size 0; an empty sum is zero
            return W.new_zeros(idx.shape[0], W.shape[1])
        return F.embedding_bag(idx, W, per_sample_weights=coef, mode="sum")

    def transpose_reduce(self, coef, idx, X, n):
        flat = idx.reshape(-1)
        rows = (coef.unsqueeze(-1) * X.unsqueeze(1)).reshape(-1, X.shape[1])  # the B·k×d buffer kernels avoid
        out = X.new_zeros(n, X.shape[1]).index_add_(0, flat, rows)
        coef_sum = coef.new_zeros(n).index_add_(0, flat, coef.reshape(-1))
        return out, coef_sum

    def sddmm(self, G, idx, W):
        return torch.bmm(F.embedding(idx, W), G.unsqueeze(-1)).squeeze(-1)

    def decoder_norm_step(self, W, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps):
        """W, grad, exp_avg, exp_avg_sq [n,d]: project, Adam, renormalise rows — in place, ``grad`` read only.

        The math runs in float32 for bfloat16/float16 tensors (results stored back in their dtype), in the
        tensors' dtype otherwise. Zero rows as ``dlmscope.reference`` defines them (per-row selects, no extra
        pass): a zero row of W has no direction to project off, so its gradient is used as is; a row whose norm is
        still 0 after the Adam step is divided by 1 and stays exactly zero (never NaN).
        """
        wide = torch.float32 if W.dtype in (torch.bfloat16, torch.float16) else W.dtype
        w, m, v = W.to(wide), exp_avg.to(wide), exp_avg_sq.to(wide)  # the tensors themselves when already wide
        g = grad.to(wide)
        # g -= (<g, w> / |w|^2) w: the component along each row's direction (out of place: grad is read only)
        ww = (w * w).sum(-1, keepdim=True)
        along = torch.where(ww > 0, (g * w).sum(-1, keepdim=True) / ww, torch.zeros_like(ww))
        g = g - along * w
        # Adam as torch.optim.Adam's single-tensor path: lerp for the first moment, eps after the corrected sqrt
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
        w.addcdiv_(m, denom, value=-lr / (1 - beta1 ** step))
        norm = w.norm(dim=-1, keepdim=True)
        w.div_(torch.where(norm > 0, norm, torch.ones_like(norm)))
        if wide != W.dtype:  # computed on float32 copies: store back
            for target, result in ((W, w), (exp_avg, m), (exp_avg_sq, v)):
                target.copy_(result)
