"""dlmscope.sae.metrics against the oracle (reference.fraction_of_variance_explained), and held-out evaluation."""
from __future__ import annotations

import pytest
import torch

from dlmscope import reference
from dlmscope.sae.metrics import ReconstructionStats, evaluate_sae, failed_training, fve, fves, training_failure

from tests.helpers.saes import perfect_sae, random_sae
from tests.helpers.tiny_models import D


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


# -------------------------------------------------------------------------------------------- evaluate_sae
def test_evaluate_sae_matches_reference():
    torch.manual_seed(0)
    x = torch.randn(300, D) * torch.linspace(0.2, 3, D) + 1.0
    sae = random_sae(5, n=64, k=8)
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
        x_hat = sae(x)
        vals, idx = sae.encode(x)
    res = evaluate_sae(sae, x, batch_size=64)
    assert res["n_tokens"] == 300
    assert res["fve"] == pytest.approx(float(reference.fraction_of_variance_explained(x, x_hat)), abs=1e-5)
    assert res["fvu"] == pytest.approx(1 - res["fve"])
    assert res["mse"] == pytest.approx(float(((x - x_hat) ** 2).sum(1).mean()), rel=1e-5)
    assert res["l0"] == pytest.approx(float((vals > 0).sum(1).float().mean()))
    fired = torch.zeros(64, dtype=torch.long).index_add_(0, idx.reshape(-1), (vals > 0).long().reshape(-1))
    assert res["dead_fraction"] == pytest.approx(float((fired == 0).float().mean()))
    # a stream of batches gives the same numbers; the perfect SAE explains everything
    stream_res = evaluate_sae(sae, list(x.split(50)))
    assert stream_res["fve"] == pytest.approx(res["fve"], abs=1e-9)
    assert evaluate_sae(perfect_sae(), x)["fve"] == pytest.approx(1.0, abs=1e-6)
    assert evaluate_sae(sae, x, max_tokens=100)["n_tokens"] == 100
    with pytest.raises(ValueError, match="no activations"):
        evaluate_sae(sae, [])


# ------------------------------------------------------------------------------------------ failed_training
def test_failed_training_flags_dead_and_falling_fve():
    ks = (4, 8, 16, 32)
    # a healthy sweep (the world DLM's block-1 Mask-SAEs): FVE rising with k, few dead
    assert failed_training(ks, [0.854, 0.899, 0.923, 0.938], [0.44, 0.10, 0.01, 0.0]) == [False] * 4
    # the block-0 Mask-SAEs under the paper's normalisation (seed 0): 90-97% dead, FVE falling from k=4 to k=16
    assert failed_training(ks, [0.507, 0.116, 0.405, 0.797], [0.97, 0.96, 0.95, 0.90]) == [True] * 4
    # FVE falling alone: only the SAEs below a smaller k's FVE (beyond the tolerance) fail; the order is free
    assert failed_training((32, 4, 8, 16), [0.80, 0.90, 0.95, 0.945], [0.0] * 4) == [True, False, False, False]
    assert failed_training((4, 8), [0.90, 0.85], [0.0, 0.0], fve_tolerance=0.1) == [False, False]
    # dead alone, at the threshold and past it
    assert failed_training((4, 8), [0.90, 0.95], [0.5, 0.51]) == [False, True]
    assert failed_training((4, 8), [0.90, 0.95], [0.6, 0.6], max_dead=0.7) == [False, False]
    # NaN is a failure and does not make a larger k fail
    assert failed_training((4, 8, 16), [float("nan"), 0.9, 0.95], [0.0, 0.0, float("nan")]) == [True, False, True]
    with pytest.raises(ValueError, match="one entry per SAE"):
        failed_training((4, 8), [0.9], [0.0, 0.0])
    with pytest.raises(ValueError, match="one SAE per k"):
        failed_training((4, 4), [0.9, 0.9], [0.0, 0.0])


def test_training_failure_says_why():
    assert training_failure(0.9, 0.2, [0.8, 0.85]) is None
    assert "dead" in training_failure(0.9, 0.6, [0.8])                       # more than half of the latents dead
    assert "smaller k" in training_failure(0.3, 0.1, [0.7, 0.2])              # FVE falls as k rises
    assert training_failure(0.5, 0.5) is None                                 # the bound itself is not a failure
    assert training_failure(0.695, 0.1, [0.70]) is None                       # within the FVE tolerance (0.01)
    assert "undefined" in training_failure(float("nan"), 0.1)
    both = training_failure(0.26, 0.95, [0.69])
    assert "dead" in both and "smaller k" in both
