"""The ``torch`` backend: the sparse primitives in plain PyTorch (embedding_bag / index_add_), any device.

This is what a careful PyTorch user writes without custom kernels: the encoder is the unfused
``addmm`` + ``relu`` + ``topk`` over the full B×n pre-activations, the decoder is ``embedding_bag``.
It is the second benchmark baseline (the first, dense scatter-then-matmul, is ``dlmscope.reference``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
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
        reference.decoder_norm_step(W, grad, exp_avg, exp_avg_sq, step, lr, (beta1, beta2), eps)
