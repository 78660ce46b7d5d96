"""The published samplers' rules that need no model: commit counts per step (LLaDA, Dream) and Dream's token
sampling with its confidence measures (docs/reference.md §8). :mod:`dlmscope.models.sampling` runs them."""
from __future__ import annotations

import torch

__all__ = ["step_counts", "dream_counts", "dream_tokens", "filter_top_p", "filter_top_k"]


def step_counts(n: int, steps: int) -> list[int]:
    """LLaDA's per-step commit counts for ``n`` masks in ``steps`` steps: ``n // steps`` each, the remainder
    added to the first steps."""
    base, rem = divmod(n, steps)
    return [base + (i < rem) for i in range(steps)]


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits outside the smallest set of tokens whose probability reaches ``top_p`` set to -inf."""
    sorted_logits, order = logits.sort(-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum > top_p
    drop[..., 1:] = drop[..., :-1].clone()
    drop[..., 0] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter_(-1, order, drop), -torch.inf)


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    top_k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -torch.inf)


def dream_tokens(logits, alg, temperature, top_p, top_k, gen):
    """Dream's ``sample_tokens``: ``(tokens [B, G], confidence [B, G])``."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = filter_top_p(logits, top_p)
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    probs = logits.softmax(-1)
    if temperature > 0:
        x0 = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen).view(probs.shape[:-1])
        conf = probs.gather(-1, x0[..., None])[..., 0]
    else:
        conf, x0 = probs.max(-1)
    if alg == "topk_margin":
        top2 = probs.topk(2, dim=-1).values
        conf = top2[..., 0] - top2[..., 1]
    elif alg == "entropy":
        conf = (probs * torch.log(probs + 1e-10)).sum(-1)
    return x0, conf


def dream_counts(n: int, steps: int, eps: float) -> list[int]:
    """Tokens Dream's confidence algorithms commit per step: ``int(n_mask · (1 − s/t))`` on the timesteps
    ``linspace(1, eps, steps + 1)`` (float32, as Dream computes them), everything left on the last step."""
    ts = torch.linspace(1, eps, steps + 1)
    out, left = [], n
    for i in range(steps):
        k = left if i == steps - 1 else int(left * (1 - ts[i + 1] / ts[i]))
        out.append(k)
        left -= k
    return out
