"""dlmscope.util.bootstrap: bootstrap intervals against the analytic ones, pairing, NaN / None handling."""
from __future__ import annotations

import math

import pytest
import torch

from dlmscope.util.bootstrap import bootstrap_crossed, bootstrap_mean, correlation, paired_difference, two_sample_difference


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


def test_22_a_few_concepts_carrying_the_effect_give_a_crossed_interval_covering_zero():
    """Six concepts whose effects nearly cancel, each measured precisely on 64 prompts: over prompts alone the
    mean looks certain; over concepts × prompts the interval covers 0, as it must for a claim about features."""
    gen = torch.Generator().manual_seed(0)
    concept_effect = torch.tensor([0.9, 0.5, -0.3, -0.6, 0.2, -0.4], dtype=torch.float64)[:, None]
    values = concept_effect + 0.02 * torch.randn(6, 64, generator=gen, dtype=torch.float64)
    prompts_only = bootstrap_mean(values, unit="prompts")
    crossed = bootstrap_crossed(values, ("concepts", "prompts"))
    assert crossed.mean == pytest.approx(prompts_only.mean) == pytest.approx(float(values.mean()))
    assert prompts_only.excludes_zero() and not crossed.excludes_zero()
    assert crossed.high - crossed.low > 20 * (prompts_only.high - prompts_only.low)
    assert crossed.over == {"concepts": 6, "prompts": 64} and crossed.n == 6 * 64
    assert prompts_only.over == {"prompts": 64}


def test_22_crossed_interval_keeps_its_coverage_where_the_prompt_interval_loses_it():
    """Simulated crossed designs (random concept and prompt effects, true mean 0): the crossed 95% interval
    covers 0 in most of them, the prompts-only one in far fewer."""
    gen = torch.Generator().manual_seed(1)
    covered = {"crossed": 0, "prompts": 0}
    trials = 200
    for trial in range(trials):
        concepts = 0.5 * torch.randn(8, 1, generator=gen, dtype=torch.float64)
        prompts = 0.2 * torch.randn(1, 24, generator=gen, dtype=torch.float64)
        values = concepts + prompts + 0.3 * torch.randn(8, 24, generator=gen, dtype=torch.float64)
        covered["crossed"] += not bootstrap_crossed(values, ("concepts", "prompts"), resamples=400,
                                                    seed=trial).excludes_zero()
        covered["prompts"] += not bootstrap_mean(values, resamples=400, seed=trial).excludes_zero()
    assert covered["crossed"] / trials >= 0.85
    assert covered["prompts"] / trials <= 0.6


def test_22_crossed_bootstrap_over_seeds_nan_cells_and_paired_axes():
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)
    v[0, 1, 2] = float("nan")
    ci = bootstrap_crossed(v, ("seeds", "concepts", "prompts"), resamples=300)
    assert ci.mean == pytest.approx(float(v[~v.isnan()].mean()))
    assert ci.low < ci.mean < ci.high and ci.over == {"seeds": 3, "concepts": 5, "prompts": 7}
    assert bootstrap_crossed(v, ("s", "c", "p"), resamples=300) == bootstrap_crossed(v, ("s", "c", "p"),
                                                                                      resamples=300)
    before = torch.zeros(4, 9, dtype=torch.float64)
    after = torch.full((4, 9), 2.0, dtype=torch.float64)
    d = paired_difference(before, after, axes=("concepts", "prompts"), resamples=100)
    assert (d.mean, d.low, d.high) == (2.0, 2.0, 2.0) and d.over == {"concepts": 4, "prompts": 9}
    with pytest.raises(ValueError, match="axes"):
        bootstrap_crossed(v, ("concepts", "prompts"))
    with pytest.raises(ValueError, match="level"):
        bootstrap_crossed(v, ("s", "c", "p"), level=1.5)


def test_two_sample_difference_resamples_each_sample_on_its_own():
    d = two_sample_difference([1.0, None, 3.0], [0.0, 1.0], seed=1, unit="latents")
    assert d.mean == pytest.approx(1.5) and d.n == 4 and d.over == {"latents_a": 2, "latents_b": 2}
    assert d == two_sample_difference([1.0, 3.0], [0.0, 1.0], seed=1, unit="latents")
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(300, generator=gen, dtype=torch.float64), torch.randn(200, generator=gen, dtype=torch.float64)
    same, shifted = two_sample_difference(a, a.flip(0)), two_sample_difference(a + 0.5, b)
    assert same.mean == pytest.approx(0.0, abs=1e-12) and not same.excludes_zero() and shifted.excludes_zero()
    se = math.sqrt(float(a.var()) / 300 + float(b.var()) / 200)
    assert shifted.high - shifted.low == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert math.isnan(two_sample_difference([], [1.0]).mean)


def test_crossed_bootstrap_takes_nested_lists_of_any_depth():
    """[seeds, concepts, prompts] as plain nested lists (None as a missing cell) equals the same tensor."""
    cells = [[[0.1 * (s + c + p) for p in range(4)] for c in range(3)] for s in range(2)]
    cells[1][2][3] = None
    as_list = bootstrap_crossed(cells, ("seeds", "concepts", "prompts"), resamples=200)
    t = torch.tensor([[[float("nan") if x is None else x for x in row] for row in block] for block in cells],
                     dtype=torch.float64)
    as_tensor = bootstrap_crossed(t, ("seeds", "concepts", "prompts"), resamples=200)
    assert (as_list.mean, as_list.low, as_list.high) == (as_tensor.mean, as_tensor.low, as_tensor.high)
    assert as_list.over == {"seeds": 2, "concepts": 3, "prompts": 4}


def test_side_of_zero_reads_an_interval_or_its_dict():
    from dlmscope.util.bootstrap import Interval, side_of_zero

    words = ("better", "worse", "tie")
    assert side_of_zero(Interval(0.2, 0.1, 0.3, 5), *words) == "better"
    assert side_of_zero({"low": -0.3, "high": -0.01}, *words) == "worse"
    assert side_of_zero({"low": -0.1, "high": 0.2}, *words) == "tie"
    assert side_of_zero({"low": 0.0, "high": 0.2}, *words) == "tie"      # touching 0 is not above it
    assert side_of_zero(None, *words) is None and side_of_zero({"low": float("nan"), "high": 1.0}, *words) is None
