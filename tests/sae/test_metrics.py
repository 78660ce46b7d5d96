"""dlmscope.sae.metrics against the oracle (reference.fraction_of_variance_explained)."""
from __future__ import annotations

import torch

from dlmscope import reference
from dlmscope.sae.metrics import ReconstructionStats, fve, fves


def test_fve_matches_the_oracle_for_one_and_many_reconstructions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 17, generator=g, dtype=torch.float64) * 3 + 1
    x_hats = [x + torch.randn(300, 17, generator=g, dtype=torch.float64) * s for s in (0.1, 1.0, 5.0)]
    want = torch.stack([reference.fraction_of_variance_explained(x, h) for h in x_hats])
    torch.testing.assert_close(fves(x, [x - h for h in x_hats]), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(fve(x.float(), (x - x_hats[0]).float()), want[0], rtol=0, atol=1e-6)


def test_streamed_statistics_equal_one_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 9, generator=g, dtype=torch.float64)
    e = torch.randn(500, 9, generator=g, dtype=torch.float64) * 0.3
    stats = ReconstructionStats()
    for xb, eb in zip(x.split(77), e.split(77)):
        stats.add(xb, eb)
    assert stats.tokens == 500
    torch.testing.assert_close(stats.fve_tensor(), fve(x, e), rtol=0, atol=1e-12)
    assert abs(stats.result()["mse"] - float(e.pow(2).sum(-1).mean())) < 1e-12
