"""dlmscope.interp.baselines on synthetic residuals with a known answer: one coordinate carries each concept (the
best-dimension baseline finds it, F1 ≈ 1), random SAEs matched to a trained one (its b_dec, its row norms), and
the chance distribution over them below an SAE built to detect the concepts."""
from __future__ import annotations

import pytest
import torch

from dlmscope.interp.baselines import best_dimension_f1, chance_concept_f1, concept_baselines, random_saes_like
from dlmscope.interp.concepts import score_concepts
from dlmscope.sae.topk import TopKSAE

D, N_LAT, K = 64, 64, 2
NAMES = ["up", "down", "never"]
OFFSET = 4.0   # the residual stream's mean: far from zero, so centring by b_dec matters


def _data(seed: int, n: int = 1500):
    """``(x [n, D], labels [n])``: concept 0 raises coordinate 5 by 4, concept 1 lowers coordinate 9 by 4,
    concept 2 never occurs; every coordinate is OFFSET + N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(-1, 2, (n,), generator=g)
    x = OFFSET + torch.randn(n, D, generator=g)
    x[labels == 0, 5] += 4.0
    x[labels == 1, 9] -= 4.0
    return x, labels


def _detector_sae():
    """A 'trained' SAE: b_dec the stream's mean, latent 0 reads +e5, latent 1 reads −e9, the rest random; the
    normalisation scale folded in (decoder rows of norm 3, encoder rows of norm 1/3)."""
    sae = TopKSAE(D, N_LAT, K, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.W_dec[0] = torch.eye(D)[5]
        sae.W_dec[1] = -torch.eye(D)[9]
        sae.W_enc.copy_(sae.W_dec / 3)
        sae.W_dec.mul_(3)
        sae.b_enc.fill_(-2 / 3)                             # fires 2 above the mean: on the concept's tokens
        sae.b_dec.fill_(OFFSET)
    return sae


def test_22_8_best_dimension_finds_the_coordinate_that_carries_a_concept():
    x, labels = _data(0)
    held = _data(1)
    s = best_dimension_f1(*held, NAMES, select_on=(x, labels), chunk=5)      # chunks split the dims
    assert s.dim[:2] == [5, 9] and s.sign[:2] == [1, -1]
    assert s.f1[0] > 0.95 and s.f1[1] > 0.95 and s.support[2] == 0 and s.f1[2] == 0.0
    assert s.median_f1 == pytest.approx((s.f1[0] + s.f1[1]) / 2)                # over the concepts that occur
    d = s.as_dict()
    assert d["concepts"]["up"]["dim"] == 5 and d["concepts"]["down"]["sign"] == -1


@pytest.mark.parametrize("seed", range(3))
def test_best_dimension_matches_brute_force_over_every_threshold(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (40, 3), generator=g).float()                     # many ties
    labels = torch.randint(-1, 2, (40,), generator=g)
    s = best_dimension_f1(x, labels, ["a", "b"])
    for c in range(2):
        best = 0.0
        for j in range(3):
            for sign in (1, -1):
                for t in (sign * x[:, j]).unique():
                    pred = sign * x[:, j] >= t
                    tp, fired, n_c = int((pred & (labels == c)).sum()), int(pred.sum()), int((labels == c).sum())
                    best = max(best, 2 * tp / (fired + n_c))
        assert s.f1[c] == pytest.approx(best)


def test_22_8_random_saes_are_matched_to_the_trained_one():
    trained = _detector_sae()
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    saes = random_saes_like(trained, 3, seed=7)
    assert len(saes) == 3 and all(torch.equal(v, trained.state_dict()[k]) for k, v in before.items())
    for r in saes:
        assert torch.equal(r.b_dec, trained.b_dec) and not r.b_enc.any()
        torch.testing.assert_close(r.W_dec.norm(dim=1), trained.W_dec.norm(dim=1))
        torch.testing.assert_close(r.W_enc.norm(dim=1), trained.W_enc.norm(dim=1))
        torch.testing.assert_close(r.W_enc / r.W_enc.norm(dim=1, keepdim=True),
                                   r.W_dec / r.W_dec.norm(dim=1, keepdim=True))              # tied directions
    assert not torch.equal(saes[0].W_dec, saes[1].W_dec)
    assert torch.equal(random_saes_like(trained, 1, seed=8)[0].W_dec, saes[1].W_dec)           # copy i: seed + i
    with pytest.raises(ValueError, match="count"):
        random_saes_like(trained, 0)


def test_22_8_chance_distribution_sits_below_a_detector_and_the_best_dimension():
    """Held-out choice on both sides: the detector SAE scores ≈ 1 on both concepts; random SAEs with its b_dec
    give a distribution (five values, mean inside the interval) well below it; the best single dimension ≈ 1.
    Without the trained b_dec the random SAEs' latents are always on and their F1 is the concepts' frequency's."""
    choose, score = _data(0), _data(1)
    trained = score_concepts(_detector_sae(), *score, NAMES, select_on=choose)
    assert trained.f1[0] > 0.9 and trained.f1[1] > 0.9
    base = concept_baselines(_detector_sae(), *score, NAMES, count=5, seed=3, select_on=choose)
    chance = base["random_sae"]
    m = chance["median_f1"]
    assert len(m["values"]) == 5 and m["low"] <= m["mean"] <= m["high"] and chance["over"] == {"random SAEs": 5}
    assert m["high"] < trained.median_f1 - 0.2
    assert set(chance["concepts"]) == set(NAMES)
    assert base["best_dimension"]["concepts"]["up"]["f1"] > 0.95
    assert base["best_dimension"]["concepts"]["down"]["f1"] > 0.95
    again = chance_concept_f1(_detector_sae(), *score, NAMES, count=5, seed=3, select_on=choose)
    assert again["median_f1"] == m                                                # seeded
    # the same random SAEs uncentred (b_dec = 0): the stream's mean picks the same latents on every token, so a
    # concept of frequency p gets F1 = 2p / (1 + p) from an always-on latent — a chance level set by the mean
    p = [float((score[1] == c).double().mean()) for c in range(2)]
    for r in random_saes_like(_detector_sae(), 2, seed=3):
        with torch.no_grad():
            r.b_dec.zero_()
        f1 = score_concepts(r, *score, NAMES, select_on=choose).f1
        assert f1[:2] == pytest.approx([2 * q / (1 + q) for q in p], abs=0.01)


def test_bad_inputs_are_named():
    x, labels = _data(0, 20)
    with pytest.raises(ValueError, match=r"activations must be \[N, d\]"):
        best_dimension_f1(x, labels[:5], NAMES)
    with pytest.raises(ValueError, match=r"labels must lie in -1\.\.2"):
        best_dimension_f1(x, labels + 3, NAMES)
    with pytest.raises(ValueError, match="select_on has d"):
        best_dimension_f1(x, labels, NAMES, select_on=(x[:, :4], labels))
    with pytest.raises(ValueError, match="level"):
        chance_concept_f1(_detector_sae(), x, labels, NAMES, level=1.0)
