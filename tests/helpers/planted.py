"""Planted sparse data for trainer tests: x = a sparse non-negative combination of a known unit dictionary, scaled,
plus a constant shift and a little noise (the problem of tests/train/test_trainer.py's recovery test, as a helper).

    planted = Planted(d=32, n_true=48)
    trainer.fit(planted.stream(300))                    # [256, d] batches, deterministic
    held = planted.batch(torch.Generator().manual_seed(99), 4096)
    share = planted.recovered(sae.W_dec)                # fraction of true directions some decoder row matches
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor


@dataclasses.dataclass
class Planted:
    """``n_true`` unit directions in ``d`` dims; each row switches each direction on with probability
    ``active / n_true`` (``active`` directions per row on average) at magnitude ``scale * U(0.5, 1.5)``; plus
    ``shift`` (a fixed random vector) and ``noise * N(0, 1)`` per coordinate."""

    d: int = 32
    n_true: int = 48
    active: float = 3.0
    scale: float = 5.0
    noise: float = 0.01
    seed: int = 1

    def __post_init__(self):
        g = torch.Generator().manual_seed(self.seed)
        #: [n_true, d] the planted unit directions
        self.truth = torch.nn.functional.normalize(torch.randn(self.n_true, self.d, generator=g), dim=1)
        #: [d] the constant every row carries
        self.shift = torch.randn(self.d, generator=g)

    def batch(self, gen: torch.Generator, rows: int) -> Tensor:
        """[rows, d] float32 rows drawn with ``gen``."""
        on = torch.rand(rows, self.n_true, generator=gen) < self.active / self.n_true
        mags = torch.rand(rows, self.n_true, generator=gen) + 0.5
        return (on * mags) @ self.truth * self.scale + self.shift + self.noise * torch.randn(rows, self.d,
                                                                                              generator=gen)

    def stream(self, n_batches: int, rows: int = 256, seed: int = 2):
        """``n_batches`` batches of ``rows`` rows from a generator seeded ``seed`` (the same for equal arguments)."""
        gen = torch.Generator().manual_seed(seed)
        for _ in range(n_batches):
            yield self.batch(gen, rows)

    def held_out(self, rows: int = 4096, seed: int = 99) -> Tensor:
        """[rows, d] rows no training stream of another seed holds."""
        return self.batch(torch.Generator().manual_seed(seed), rows)

    @torch.no_grad()
    def max_cos(self, W_dec: Tensor) -> Tensor:
        """[n_true]: for each planted direction, its largest cosine with a decoder row of ``W_dec`` [n, d]."""
        W = torch.nn.functional.normalize(W_dec.detach().float(), dim=1)
        return (self.truth @ W.T).max(dim=1).values

    def recovered(self, W_dec: Tensor, cos: float = 0.9) -> float:
        """The fraction of planted directions matched by some decoder row with cosine > ``cos``."""
        return float((self.max_cos(W_dec) > cos).float().mean())
