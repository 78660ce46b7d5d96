"""The world models' training objectives: stratified mask rates, LLaDA-style masking and the 1/t-weighted loss;
the AR twins' next-token CE."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["stratified_t", "diffusion_mask", "dlm_loss", "ar_loss", "is_causal"]


def stratified_t(n: int, eps: float, gen: torch.Generator) -> torch.Tensor:
    """``n`` mask rates in ``[eps, 1)``, stratified: one per equal slice of ``[0, 1)``, shuffled (the same
    marginal ``U(eps, 1)`` as independent draws, with less variance across the batch)."""
    u = (torch.arange(n, dtype=torch.float32) + torch.rand(n, generator=gen)) / n
    return ((1 - eps) * u + eps)[torch.randperm(n, generator=gen)]


def diffusion_mask(ids: torch.Tensor, t: torch.Tensor, gen: torch.Generator, mask_id: int, pad_id: int,
                   maskable: torch.Tensor | None = None):
    """``(noisy_ids, masked)``: each maskable position (non-pad, not position 0, and ``maskable`` if given)
    replaced by ``mask_id`` with probability ``t`` (one rate per row)."""
    u = torch.rand(ids.shape, generator=gen)
    can = ids != pad_id
    can[:, 0] = False
    if maskable is not None:
        can &= maskable
    masked = (u < t[:, None]) & can
    return torch.where(masked, torch.full_like(ids, mask_id), ids), masked


def dlm_loss(model, ids, t, masked, noisy, attention_mask=None, norm=None):
    """Masked-diffusion loss ``Σ_masked CE / t / norm`` (``norm`` defaults to the number of tokens)."""
    logits = model(input_ids=noisy, attention_mask=attention_mask).logits
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="none")
    ce = ce.view_as(ids) * masked / t[:, None]
    if norm is None:
        return ce.sum() / ids.numel()
    return (ce.sum(1) / norm).mean()


def ar_loss(model, ids):
    """Next-token CE of a causal model on ``ids`` ``[B, T]`` (mean over the ``B·(T−1)`` targets)."""
    logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def is_causal(model) -> bool:
    """Whether ``model`` (a ``LlamaForCausalLM``) attends causally: the AR twins do, the DLMs (``is_causal=False``)
    do not."""
    return getattr(model.config, "is_causal", True) is not False
