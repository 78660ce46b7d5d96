"""dlmscope.util.bootstrap: bootstrap intervals against the analytic ones, pairing, NaN / None handling."""
from __future__ import annotations

import math

import pytest
import torch

from dlmscope.util.bootstrap import bootstrap_mean, correlation, paired_difference


def test_bootstrap_interval_matches_the_normal_approximation():
    x = torch.randn(400, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 + 1
    ci = bootstrap_mean(x, resamples=4000)
    se = float(x.std()) / math.sqrt(len(x))
    assert ci.mean == pytest.approx(float(x.mean()))
    assert ci.low == pytest.approx(float(x.mean()) - 1.96 * se, abs=0.25 * se)
    assert ci.high == pytest.approx(float(x.mean()) + 1.96 * se, abs=0.25 * se)
    assert ci.n == 400 and ci.excludes_zero()
    assert bootstrap_mean(x, seed=3) == bootstrap_mean(x, seed=3)


def test_pairing_removes_the_shared_prompt_effect():
    gen = torch.Generator().manual_seed(0)
    prompt_effect = torch.randn(60, generator=gen, dtype=torch.float64) * 5
    before = prompt_effect
    after = prompt_effect + 0.1 + 0.01 * torch.randn(60, generator=gen, dtype=torch.float64)
    paired = paired_difference(before, after)
    assert paired.low > 0.09 and paired.high < 0.11
    # the same numbers treated as independent samples would not exclude 0
    assert bootstrap_mean(after).low < float(before.mean()) < bootstrap_mean(after).high


def test_groups_resample_units_together_and_missing_values_are_dropped():
    before = [[0.0, 0.0, None, 0.0], [0.0, 0.0, 0.0, 0.0]]
    after = [[1.0, 1.0, 5.0, 1.0], [0.0, 0.0, 0.0, float("nan")]]
    ci = paired_difference(before, after)
    assert ci.mean == pytest.approx(3 / 6) and ci.n == 4
    assert 0 <= ci.low <= ci.mean <= ci.high <= 1
    assert f"{ci}".startswith("+0.50 [")
    with pytest.raises(ValueError, match="same shape"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one unit"):
        bootstrap_mean([])
    with pytest.raises(ValueError, match="level"):
        bootstrap_mean([1.0], level=1.5)


def test_correlation_and_its_interval():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(300, generator=gen, dtype=torch.float64)
    y = 0.6 * x + 0.8 * torch.randn(300, generator=gen, dtype=torch.float64)
    r = correlation(x, y)
    assert r.mean == pytest.approx(float(torch.corrcoef(torch.stack([x, y]))[0, 1]))
    assert r.low < 0.6 < r.high and r.excludes_zero() and r.n == 300
    assert correlation([1.0, 2.0, None, 4.0], [2.0, 4.0, 5.0, 8.0]).mean == pytest.approx(1.0)
    assert math.isnan(correlation([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]).mean)         # a constant side
    assert math.isnan(correlation([1.0, 2.0], [1.0, 2.0]).mean)                     # too few units
    with pytest.raises(ValueError, match="same length"):
        correlation([1.0, 2.0, 3.0], [1.0, 2.0])
