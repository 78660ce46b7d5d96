"""Post-training stability measurements (dlmscope.analysis.transfer): hand-built cases with known answers, the
bad-input errors, and paired activations of the embedded world's base / instruct / AR models."""
from __future__ import annotations

import json
import math

import pytest
import torch

from dlmscope.sae.topk import TopKSAE
from dlmscope.analysis.transfer import (alive_overlap, chance_sae, check_same_tokens, compare_layer,
                                        correlation_summary, fve_replicate, fve_verdict, fve_verdict_over_seeds,
                                        latent_agreement, match_decoders,
                                        match_summary, matched_agreement, measure_verdict, paired_activations,
                                        transfer_verdict)

from tests.helpers.saes import random_biased_sae as random_sae

D, N, K = 32, 48, 4  # random_sae's default shape


def _acts(n_tokens: int = 2_000, seed: int = 0, d: int = D) -> torch.Tensor:
    return torch.randn(n_tokens, d, generator=torch.Generator().manual_seed(seed))


def _permuted(sae: TopKSAE, perm: torch.Tensor) -> TopKSAE:
    """The same SAE with its latents reordered: new latent j is old latent perm[j]."""
    out = TopKSAE(sae.d, sae.n, sae.k)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc"):
            getattr(out, name).copy_(getattr(sae, name)[perm])
        out.b_dec.copy_(sae.b_dec)
    return out


# ------------------------------------------------------------------------------------------ known answers
def test_an_sae_compared_with_itself_matches_perfectly():
    sae, x = random_sae(0), _acts()
    m = match_decoders(sae, sae)
    s = match_summary(m)
    assert s["max_cos_mean"] == pytest.approx(1.0, abs=1e-5) and s["hungarian_mean"] == pytest.approx(1.0, abs=1e-5)
    assert s["hungarian_frac_gt_0.9"] == 1.0 and s["max_cos_frac_gt_0.9"] == 1.0
    assert torch.equal(m.assignment, torch.arange(N)) and s["identity_fraction"] == 1.0
    agree = latent_agreement(sae, x, x)
    alive = agree.fires_base > 0
    assert alive.sum() > N // 2  # most latents fire on 2000 random tokens
    assert torch.allclose(agree.corr[alive], torch.ones(int(alive.sum()), dtype=torch.float64), atol=1e-9)
    c = correlation_summary(agree)
    assert c["median"] == pytest.approx(1.0) and c["corr_frac_gt_0.9"] == 1.0 and c["n_latents_used"] == alive.sum()
    a = alive_overlap(agree.fires_base, agree.fires_target)
    assert a["jaccard"] == 1.0 and a["alive_base"] == a["alive_target"] == a["alive_both"] == int(alive.sum())
    assert a["alive_base_only"] == a["alive_target_only"] == 0


def test_compare_layer_of_an_sae_with_itself():
    sae, x = random_sae(0), _acts()
    out = compare_layer(sae, sae, x, x.clone())
    assert out["fve"]["ratio"] == pytest.approx(1.0)
    assert out["fve"]["base_on_base"]["fve"] == pytest.approx(out["fve"]["target_on_target"]["fve"])
    assert out["decoder"]["hungarian_mean"] == pytest.approx(1.0, abs=1e-5)
    assert out["decoder_chance"]["hungarian_mean"] < 0.6 and "decoder_init" not in out
    assert out["alive"]["jaccard"] == 1.0 and out["correlation"]["median"] == pytest.approx(1.0)
    json.dumps(out)  # plain JSON-able numbers


def test_a_permuted_copy_is_matched_one_to_one_and_the_permutation_recovered():
    sae = random_sae(3)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(7))
    m = match_decoders(sae, _permuted(sae, perm))
    # base row perm[j] is the other SAE's row j, so base row i is matched to inverse(perm)[i]
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(N)
    assert torch.equal(m.assignment, inverse) and torch.equal(m.best, inverse)
    s = match_summary(m)
    assert s["hungarian_mean"] == pytest.approx(1.0, abs=1e-5) and s["hungarian_frac_gt_0.9"] == 1.0
    assert s["identity_fraction"] < 0.2  # the match is found by direction, not index


def test_a_random_sae_matches_poorly():
    # d=64, n=48: the best of 48 random unit vectors has cos ≈ sqrt(2 ln 48 / 64) ≈ 0.35
    s = match_summary(match_decoders(random_sae(0, d=64), random_sae(100, d=64)))
    assert s["max_cos_mean"] < 0.5 and s["hungarian_mean"] < 0.4
    assert s["hungarian_frac_gt_0.7"] == 0.0 and s["max_cos_frac_gt_0.7"] == 0.0


def test_signed_cosine_a_negated_decoder_is_not_a_match():
    sae = random_sae(0)
    m = match_decoders(sae, -sae.W_dec.detach())  # a decoder matrix is accepted too
    assert m.same_index_cos.max() == pytest.approx(-1.0, abs=1e-5) and match_summary(m)["hungarian_frac_gt_0.7"] == 0


def test_correlation_of_a_scaled_copy_is_one_and_of_shuffled_tokens_is_low():
    sae = TopKSAE(D, N, K, generator=torch.Generator().manual_seed(1))  # zero biases: scaling x scales the code
    x = _acts(4_000)
    scaled = correlation_summary(latent_agreement(sae, x, 2.0 * x))
    assert scaled["median"] == pytest.approx(1.0) and scaled["corr_frac_gt_0.9"] == 1.0
    shuffled = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(2))]
    low = correlation_summary(latent_agreement(sae, x, shuffled))  # the same set of tokens, not aligned
    assert abs(low["median"]) < 0.1 and low["corr_frac_gt_0.5"] == 0.0


def test_alive_overlap_counts():
    got = alive_overlap(torch.tensor([3, 0, 1, 0]), torch.tensor([1, 1, 0, 0]))
    assert got == {"n_latents": 4, "alive_base": 2, "alive_target": 2, "alive_both": 1, "alive_base_only": 1,
                   "alive_target_only": 1, "jaccard": pytest.approx(1 / 3)}
    assert math.isnan(alive_overlap(torch.zeros(3), torch.zeros(3))["jaccard"])


def _noisy(sae: TopKSAE, scale: float, seed: int) -> TopKSAE:
    """``sae`` with Gaussian noise of ``scale`` added to its encoder and decoder rows (decoder renormalised)."""
    g = torch.Generator().manual_seed(seed)
    out = TopKSAE(sae.d, sae.n, sae.k)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            w = getattr(sae, name)
            getattr(out, name).copy_(w + scale * torch.randn(w.shape, generator=g) * (name.startswith("W")))
        out.W_dec.copy_(torch.nn.functional.normalize(out.W_dec, dim=1))
    return out


# ------------------------------------------------------------------------------- ceiling, null, verdict (22.7)
def test_matched_agreement_of_a_permuted_copy_is_one():
    sae, x = random_sae(3), _acts()
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(7))
    other = _permuted(sae, perm)
    got = matched_agreement(sae, x, other, x, match_decoders(sae, other).assignment)
    alive = got.fires_base > 0
    assert torch.allclose(got.corr[alive], torch.ones(int(alive.sum()), dtype=torch.float64), atol=1e-9)
    unmatched = matched_agreement(sae, x, other, x, torch.arange(N))  # same index: a different latent
    assert correlation_summary(unmatched)["median"] < 0.5


def test_measure_verdict_reads_the_observed_against_ceiling_and_null():
    g = torch.Generator().manual_seed(0)
    noise = lambda: 0.05 * torch.randn(200, generator=g)  # noqa: E731
    ceiling, null = 0.9 + noise(), 0.1 + noise()
    at = measure_verdict(0.9 + noise(), ceiling, null)
    assert at["outcome"] == "at_ceiling" and at["minus_ceiling"]["low"] < 0 < at["minus_ceiling"]["high"]
    assert at["minus_null"]["over"] == {"latents": 200} and "consistent with" in at["words"]
    assert measure_verdict(0.5 + noise(), ceiling, null)["outcome"] == "below_ceiling"
    low = measure_verdict(0.1 + noise(), ceiling, null)
    assert low["outcome"] == "at_null" and low["minus_null"]["low"] < 0
    with_nan = torch.cat([0.9 + noise()[:199], torch.tensor([math.nan])])
    assert measure_verdict(with_nan, ceiling, null)["outcome"] == "at_ceiling"  # a NaN latent is dropped


def test_fve_verdict_uses_the_seed_spread_and_the_null():
    assert fve_verdict(0.97, 1.02, 0.1)["outcome"] == "below_ceiling"   # floor 0.98: below two seeds' spread
    assert fve_verdict(0.985, 1.02, 0.1)["outcome"] == "at_ceiling"
    assert fve_verdict(0.985, 0.98, 0.1)["ceiling_floor"] == pytest.approx(0.98)
    assert fve_verdict(0.05, 1.0, 0.1)["outcome"] == "at_null"
    assert fve_verdict(math.nan, 1.0, 0.1)["outcome"] == "undefined"


def test_fve_over_seeds_is_the_worst_replicate_with_min_max_ranges():
    rep = lambda r, c, z: {"ratio": r, "ceiling_ratio": c, "null_ratio": z}  # noqa: E731
    v = fve_verdict_over_seeds([rep(0.99, 0.98, 0.1), rep(0.992, 1.01, 0.2), rep(1.0, 0.995, 0.15)])
    assert v["outcome"] == "at_ceiling" and v["per_seed"] == ["at_ceiling"] * 3 and v["seeds"] == 3
    assert v["observed"] == pytest.approx((0.99 + 0.992 + 1.0) / 3)
    assert (v["over_seeds"]["ratio"]["low"], v["over_seeds"]["ratio"]["high"]) == (0.99, 1.0)
    assert v["over_seeds"]["null_ratio"]["high"] == 0.2 and "worst of 3" in v["words"]
    # one replicate below its ceiling (floor 0.98) decides: not "at ceiling" on the strength of the others
    v = fve_verdict_over_seeds([rep(0.99, 0.98, 0.1), rep(0.97, 1.02, 0.1), rep(1.0, 1.0, 0.1)])
    assert v["outcome"] == "below_ceiling" and v["per_seed"] == ["at_ceiling", "below_ceiling", "at_ceiling"]
    assert fve_verdict_over_seeds([rep(0.99, 1.0, 0.1), rep(0.05, 1.0, 0.1)])["outcome"] == "at_null"
    with pytest.raises(ValueError, match="at least one"):
        fve_verdict_over_seeds([])


def test_fve_replicate_equals_compare_layers_ratios():
    sae = TopKSAE(64, 48, 4, generator=torch.Generator().manual_seed(0))
    x = _dictionary_data(sae, 2_000, seed=1)
    second, target = _noisy(sae, 0.03, seed=1), _noisy(sae, 0.1, seed=3)
    y = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    full = compare_layer(sae, target, x, y, second_base_sae=second, resamples=100)
    rep = fve_replicate(sae, second, target, x, y)
    assert rep["ratio"] == pytest.approx(full["fve"]["ratio"])
    assert rep["ceiling_ratio"] == pytest.approx(full["ceiling"]["fve_ratio"])
    assert rep["null_ratio"] == pytest.approx(full["null"]["fve_ratio"])


def test_transfer_verdict_needs_every_measure():
    m = lambda o: {"outcome": o}  # noqa: E731
    assert transfer_verdict({"a": m("at_ceiling"), "b": m("at_ceiling")})["outcome"] == "consistent"
    v = transfer_verdict({"a": m("at_ceiling"), "b": m("below_ceiling")})
    assert v["outcome"] == "below_ceiling" and v["words"].endswith("ceiling on b")
    v = transfer_verdict({"a": m("at_null"), "b": m("below_ceiling"), "c": m("undefined")})
    assert v["outcome"] == "at_null" and "a not above the null" in v["words"] and "c undefined" in v["words"]
    assert "reproduced" not in " ".join(transfer_verdict({"a": m(o)})["words"] for o in
                                        ("at_ceiling", "below_ceiling", "at_null"))


def _dictionary_data(sae: TopKSAE, n_tokens: int, seed: int) -> torch.Tensor:
    """``[n_tokens, d]`` activations made of ``sae.k`` of its own decoder rows with positive weights (it
    reconstructs them well)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n_tokens, sae.n, generator=g).topk(sae.k, dim=1).indices
    codes = torch.zeros(n_tokens, sae.n).scatter_(1, idx, 1.0 + torch.rand(n_tokens, sae.k, generator=g))
    return codes @ sae.W_dec.detach() + sae.b_dec.detach()


def test_compare_layer_with_a_ceiling_on_known_cases():
    sae = TopKSAE(64, 48, 4, generator=torch.Generator().manual_seed(0))
    x = _dictionary_data(sae, 3_000, seed=1)
    second = _noisy(sae, 0.03, seed=1)  # two "seeds" that found nearly the same dictionary
    # the target model's SAE nearly equals the base SAE and its activations equal the base's
    same = compare_layer(sae, _noisy(sae, 0.01, seed=2), x, x.clone(), second_base_sae=second, resamples=500)
    assert same["ceiling"]["decoder"]["hungarian_mean"] > 0.9 and same["ceiling"]["fve_ratio"] == pytest.approx(
        same["fve"]["base_on_base"]["fve"] / same["ceiling"]["fve_second_on_base"])
    assert same["verdict"]["outcome"] == "consistent", same["verdict"]
    assert set(same["verdict"]["measures"]) == {"fve_ratio", "decoder_cos", "matched_corr"}
    json.dumps(same)
    # a target SAE that moved further than a second seed does: above chance, below the ceiling
    moved = compare_layer(sae, _noisy(sae, 0.1, seed=3), x, x.clone(), second_base_sae=second, resamples=500)
    assert moved["verdict"]["measures"]["decoder_cos"]["outcome"] == "below_ceiling"
    assert moved["verdict"]["outcome"] == "below_ceiling", moved["verdict"]
    # an unrelated target SAE on unrelated activations: at the null
    other_sae = TopKSAE(64, 48, 4, generator=torch.Generator().manual_seed(9))
    other = compare_layer(sae, other_sae, x, _dictionary_data(other_sae, 3_000, seed=5), second_base_sae=second,
                          resamples=500)
    assert other["verdict"]["outcome"] == "at_null"
    assert other["verdict"]["measures"]["matched_corr"]["outcome"] == "at_null"
    # the null SAE is random but centred like the base SAE
    assert torch.equal(chance_sae(sae).b_dec, sae.b_dec.detach())


# ------------------------------------------------------------------------------------------------ bad input
def test_saes_of_different_d_or_n_are_refused():
    x = _acts()
    with pytest.raises(ValueError, match=r"base SAE has d=32 but the target SAE has d=16"):
        compare_layer(random_sae(0), random_sae(1, d=16), x, x)
    with pytest.raises(ValueError, match=r"base SAE has n=48 latents but the target SAE has n=24"):
        compare_layer(random_sae(0), random_sae(1, n=24), x, x)
    with pytest.raises(ValueError, match=r"different size n: 48 vs 24"):
        match_decoders(random_sae(0), random_sae(1, n=24))


def test_activations_of_different_tokens_or_d_are_refused():
    sae = random_sae(0)
    with pytest.raises(ValueError, match=r"differ in shape: they must be the same tokens"):
        compare_layer(sae, sae, _acts(100), _acts(90))
    with pytest.raises(ValueError, match=r"differ in shape"):
        latent_agreement(sae, _acts(100), _acts(90))
    with pytest.raises(ValueError, match=r"activations have d=16 but the SAE expects d=32"):
        compare_layer(sae, sae, _acts(100, d=16), _acts(100, d=16))
    with pytest.raises(ValueError, match=r"must be a \[N, d\] tensor"):
        check_same_tokens(torch.zeros(3), torch.zeros(3))


# --------------------------------------------------------------------------------------- the world models
def test_paired_activations_are_the_same_tokens(world):
    base, inst, ar, (_, held) = world
    same_a, same_b = paired_activations(base, base, held, [0, 2], "unmask", tokens=500, seed=1)
    assert torch.equal(same_a[2], same_b[2]) and same_a[0].shape == (500, 128)
    b, i = paired_activations(base, inst, held, [2], "unmask", tokens=500, seed=1)
    assert b[2].shape == i[2].shape and not torch.equal(b[2], i[2])
    assert torch.equal(b[2], same_a[2])  # the same positions whichever model it is paired with
    with pytest.raises(ValueError, match=r"masks the text, but the models' mask tokens differ"):
        paired_activations(base, ar, held, [2], "unmask", tokens=100)
