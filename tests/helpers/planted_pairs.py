"""Planted paired data for crosscoder tests (S = 2 sources from one set of unit directions; see
tests/sae/test_crosscoder.py's docstring) and a crosscoder trained on it."""
from __future__ import annotations

import torch

from dlmscope.sae.crosscoder import Crosscoder
from dlmscope.train.crosscoder import fit_crosscoder

N_SHARED, N_EX0, N_EX1 = 12, 6, 6


def planted_pairs(seed: int = 0, d: int = 32, p: float = 0.1):
    """(U [F, d] unit directions, kind [F] int: 2 shared / 0 exclusive to source 0 / 1 exclusive to source 1,
    sample(B, generator, boost=1.0) -> x [B, 2, d]); F = N_SHARED + N_EX0 + N_EX1, in that order. Each feature
    fires with probability p (the source-1-exclusive ones with p · boost: a text where they are more common)."""
    g = torch.Generator().manual_seed(seed)
    F = N_SHARED + N_EX0 + N_EX1
    U = torch.nn.functional.normalize(torch.randn(F, d, generator=g), dim=1)
    kind = torch.tensor([2] * N_SHARED + [0] * N_EX0 + [1] * N_EX1)
    in0, in1 = (kind != 1).float(), (kind != 0).float()

    def sample(B: int, gen: torch.Generator, boost: float = 1.0) -> torch.Tensor:
        prob = torch.where(kind == 1, p * boost, p)
        act = (torch.rand(B, F, generator=gen) < prob).float() * (0.5 + torch.rand(B, F, generator=gen))
        x = torch.stack([(act * in0) @ U, (act * in1) @ U], 1)
        return x + 0.01 * torch.randn(x.shape, generator=gen)

    return U, kind, sample


def train_planted(rule: str = "topk", steps: int = 400, seed: int = 0, *, init_seed: int | None = None):
    """(crosscoder trained on planted pairs, U, kind, sample, history): d = 32, n = 64, k = 4, B = 256; the data
    from ``seed``, the init from ``init_seed`` (default ``seed``)."""
    U, kind, sample = planted_pairs(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    init = torch.Generator().manual_seed(seed if init_seed is None else init_seed)
    cc = Crosscoder(2, 32, 64, 4, rule=rule, backend="torch", generator=init)
    batches = (sample(256, gen) for _ in range(steps))
    history = fit_crosscoder(cc, batches, steps=steps, lr=3e-3, dead_tokens=256 * 20, seed=seed)
    cc.eval()
    return cc, U, kind, sample, history
