"""Model-diffing analysis of a crosscoder (dlmscope.analysis.crosscoder): relative decoder norms, classification,
Latent Scaling, the swap null, replication across seeds and firing-rate specificity — known answers on hand-set
crosscoders, and the planted pairs of tests/sae/test_crosscoder.py."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from scipy.stats import binom

from dlmscope.analysis.crosscoder import (EXCLUSIVE_0, EXCLUSIVE_1, NO_DECODER, SHARED, beta_least_squares,
                                          classify, exclusive_replication, firing_counts, latent_labels,
                                          latent_scaling, relative_decoder_norm, source_partners, specificity)
from dlmscope.sae.crosscoder import Crosscoder
from tests.helpers.planted_pairs import N_EX0, N_EX1, N_SHARED, train_planted

F64 = torch.float64


@pytest.fixture(scope="module")
def planted():
    """(trained crosscoder, U, kind, held-out x [4096, 2, 32], matched latent per planted direction [F])."""
    cc, U, kind, sample, _ = train_planted("topk")
    x = sample(4096, torch.Generator().manual_seed(123))
    target = torch.nn.functional.normalize(torch.cat([U * (kind != 1)[:, None], U * (kind != 0)[:, None]], 1), dim=1)
    cos = target @ torch.nn.functional.normalize(cc.decoder_cat(), dim=1).T
    assert bool((cos.max(1).values > 0.9).all())
    return cc, U, kind, x, cos.argmax(1)


# ---- relative decoder norm and classification ---------------------------------------------------------------------


def test_relative_decoder_norm_known_answer():
    cc = Crosscoder(2, 3, 5, 1, dtype=F64)
    with torch.no_grad():
        cc.W_dec.zero_()
        cc.W_dec[0, 0, 0] = 1.0                            # source 0 only -> 0
        cc.W_dec[1, 1, 2] = 2.0                            # source 1 only -> 1
        cc.W_dec[0, 2, 1], cc.W_dec[1, 2, 0] = 0.6, 0.6    # equal norms -> 0.5
        cc.W_dec[0, 3, 0], cc.W_dec[1, 3, 1] = 3.0, 1.0    # 1 / (3 + 1)
    rel = relative_decoder_norm(cc)                        # latent 4: no decoder -> NaN
    torch.testing.assert_close(rel[:4], torch.tensor([0.0, 1.0, 0.5, 0.25], dtype=F64))
    assert math.isnan(float(rel[4]))
    assert latent_labels(rel).tolist() == [EXCLUSIVE_0, EXCLUSIVE_1, SHARED, SHARED, NO_DECODER]
    assert latent_labels(rel, low=0.3).tolist()[3] == EXCLUSIVE_0
    assert classify(rel) == {"shared": 2, "exclusive_0": 1, "exclusive_1": 1, "no_decoder": 1}
    assert classify(rel, mask=torch.tensor([True, True, False, False, False]))["shared"] == 0
    with pytest.raises(ValueError, match="low < high"):
        latent_labels(rel, low=0.6, high=0.4)
    with pytest.raises(ValueError, match="S=3"):
        relative_decoder_norm(Crosscoder(3, 3, 5, 1))


def test_planted_relative_norms_and_counts(planted):
    cc, U, kind, x, match = planted
    rel = relative_decoder_norm(cc)[match]
    assert bool((rel[kind == 0] < 0.1).all()) and bool((rel[kind == 1] > 0.9).all()), rel
    shared = rel[kind == 2]
    assert float(((shared - 0.5).abs() < 0.1).float().mean()) >= 0.8, shared
    # the latents matched to planted directions classify exactly as planted
    assert classify(relative_decoder_norm(cc), mask=torch.zeros(cc.n, dtype=torch.bool).index_fill(0, match, True)) \
        == {"shared": N_SHARED, "exclusive_0": N_EX0, "exclusive_1": N_EX1, "no_decoder": 0}
    # over every latent that fires, the exclusive counts are near the planted ones (extra latents absorb noise and
    # the Top-K surplus: they are the "shared" remainder)
    with torch.no_grad():
        alive = (cc.encode_dense(x) > 0).any(0)
    counts = classify(relative_decoder_norm(cc), mask=alive)
    assert abs(counts["exclusive_0"] - N_EX0) <= 2 and abs(counts["exclusive_1"] - N_EX1) <= 2, counts
    assert counts["shared"] >= N_SHARED - 2, counts


# ---- Latent Scaling ----------------------------------------------------------------------------------------------


def test_beta_least_squares_known_answer():
    g = torch.Generator().manual_seed(0)
    d = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]], dtype=F64)   # m = 2 directions (not unit)
    f = torch.rand(50, 2, generator=g, dtype=F64) * (torch.rand(50, 2, generator=g) < 0.5)
    noise = torch.randn(50, 2, 3, generator=g, dtype=F64)
    noise[..., 1], noise[1:, 1, 0] = 0.0, 0.0                         # orthogonal to d_0, zero for latent 1
    noise[0, 1, 0] = 0.0
    y = torch.stack([3.0 * f[:, 0, None] * d[0], -0.5 * f[:, 1, None] * d[1]], 1) + noise
    torch.testing.assert_close(beta_least_squares(f, y, d), torch.tensor([3.0, -0.5], dtype=F64))
    assert math.isnan(float(beta_least_squares(torch.zeros(4, 1, dtype=F64), torch.ones(4, 1, 3, dtype=F64),
                                               d[:1])[0]))


def test_latent_scaling_equals_brute_force(planted):
    cc, U, kind, x, match = planted
    latents = match[[0, N_SHARED, N_SHARED + N_EX0]]
    ls = latent_scaling(cc, x.split(1000), latents)
    with torch.no_grad():
        code = cc.encode_dense(x)
        x_hat = cc(x)
    for row, j in enumerate(latents.tolist()):
        s_star = int(cc.W_dec.detach().norm(dim=2)[:, j].argmax())
        d_j = cc.W_dec.detach()[s_star, j]
        f = code[:, j]
        for s in range(2):
            y_err = x[:, s] - x_hat[:, s] + f[:, None] * cc.W_dec.detach()[s, j]
            y_rec = x_hat[:, s] - cc.b_dec.detach()[s]
            for y, beta in ((y_err, ls.beta_error), (y_rec, ls.beta_recon)):
                want = (f * (y @ d_j)).sum() / (f.pow(2).sum() * d_j.pow(2).sum())
                torch.testing.assert_close(beta[row, s], want, rtol=1e-4, atol=1e-5)
        assert int(ls.source[row]) == s_star and int(ls.fired[row]) == int((f > 0).sum())


def test_latent_scaling_flags_a_latent_that_only_looks_exclusive(planted):
    cc, U, kind, x, match = planted
    exclusive_1 = match[kind == 1]
    faked = match[kind == 2][:4]             # shared directions ...
    cc = copy.deepcopy(cc)
    with torch.no_grad():
        cc.W_dec[0, faked] = 0.0             # ... whose source-0 decoder rows shrank to 0 (complete shrinkage)
    rel = relative_decoder_norm(cc)
    assert bool((rel[faked] == 1.0).all()) and bool((rel[exclusive_1] > 0.9).all())  # all look exclusive to 1
    ls = latent_scaling(cc, x, torch.cat([exclusive_1, faked]))
    n1 = exclusive_1.numel()
    assert bool((ls.source == 1).all())
    # own source: each latent explains its own activations with β ≈ 1
    assert bool(((ls.beta_error[:, 1] - 1).abs() < 0.2).all()), ls.beta_error
    # truly exclusive: source 0 holds none of it; faked: source 0's error still holds all of it (ν^ε ≈ 1)
    # (|ν| up to ~0.1 for the exclusive ones: random planted directions overlap by ~1/√d, co-firing ones leak)
    assert bool((ls.nu_error[:n1].abs() < 0.2).all()) and bool((ls.nu_recon[:n1].abs() < 0.2).all()), ls
    assert bool(((ls.nu_error[n1:] - 1).abs() < 0.2).all()), ls.nu_error
    assert ls.flagged().tolist() == [False] * n1 + [True] * faked.numel()


def test_latent_scaling_bad_input(planted):
    cc, U, kind, x, match = planted
    with pytest.raises(ValueError, match="latents"):
        latent_scaling(cc, x, torch.tensor([cc.n]))
    with pytest.raises(ValueError, match="source"):
        latent_scaling(cc, x, torch.tensor([0]), source=2)
    with pytest.raises(ValueError, match=r"\[B, S=2"):
        latent_scaling(cc, x[:, 0], torch.tensor([0]))
    ls = latent_scaling(cc, x[:0], torch.tensor([0, 1]))   # no tokens: NaN, nothing flagged
    assert bool(torch.isnan(ls.beta_error).all()) and not bool(ls.flagged().any())


# ---- nulls and checks for "exclusive" -------------------------------------------------------------------------------


def test_firing_counts_and_specificity_known_answer(planted):
    cc, U, kind, x, match = planted
    counts, tokens = firing_counts(cc, list(x.split(1000)))
    assert tokens == x.shape[0]
    dense = cc.eval().encode_dense(x)
    assert counts.tolist() == (dense > 0).sum(0).tolist()
    assert cc.training is False
    a, b = torch.tensor([9, 0, 4]), torch.tensor([4, 0, 9])
    spec = specificity(a, 19, b, 9)          # rates (9.5/20, 0.5/20, 4.5/20) over (4.5/10, 0.5/10, 9.5/10)
    want = torch.tensor([9.5 / 20 / (4.5 / 10), 0.5, 4.5 / 20 / (9.5 / 10)], dtype=F64).log()
    torch.testing.assert_close(spec, want)
    with pytest.raises(ValueError, match="tokens on both"):
        specificity(a, 0, b, 9)


def test_source_partners_and_replication_known_answer():
    a = Crosscoder(2, 3, 4, 1, dtype=F64)
    with torch.no_grad():
        a.W_dec.zero_()
        a.W_dec[1, :3] = torch.eye(3, dtype=F64)             # latents 0-2: e0, e1, e2 in source 1
        a.W_dec[0, 3, 0] = 1.0
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.W_dec[1] = a.W_dec[1, [2, 0, 1, 3]]                # b's latent j = a's latent perm[j]
        b.W_dec[1, 0] = torch.tensor([0.6, 0.0, 0.8], dtype=F64)  # a's latent 2 (e2) -> cos 0.8, latent 0 -> 0.6
    partner, cos = source_partners(a, b, torch.tensor([0, 1, 2]), 1)
    assert partner.tolist() == [1, 2, 0]
    torch.testing.assert_close(cos, torch.tensor([1.0, 1.0, 0.8], dtype=F64))
    ex_a = torch.tensor([True, True, True, False])
    ex_b = torch.tensor([True, False, True, False])          # b's latent 2 (= e1) and 0 (≈ e2) exclusive
    eligible = torch.tensor([True, True, True, True])
    rep = exclusive_replication(a, ex_a, b, ex_b, eligible, 1, min_cos=0.7)
    # found: all 3 (cos 1, 1, 0.8); replicated: partners 1 (no), 2 (yes), 0 (yes)
    assert rep["exclusive"] == 3 and rep["found"] == 3 and rep["replicated"] == 2
    assert rep["q"] == 0.5 and rep["chance_expected"] == 1.5
    assert rep["p_value"] == pytest.approx(float(binom.sf(1, 3, 0.5)))
    assert exclusive_replication(a, ex_a, b, ex_b, eligible, 1, min_cos=0.9)["found"] == 2
    none = exclusive_replication(a, torch.zeros(4, dtype=torch.bool), b, ex_b, eligible, 1)
    assert none["found"] == 0 and math.isnan(none["p_value"])
    with pytest.raises(ValueError, match="source"):
        source_partners(a, b, torch.tensor([0]), 2)


def test_planted_exclusive_latents_replicate_across_init_seeds(planted):
    cc, U, kind, x, match = planted
    other, *_ = train_planted("topk", steps=400, seed=0, init_seed=1)
    alive = [firing_counts(c, x)[0] >= 20 for c in (cc, other)]
    for label, source, planted_count in ((EXCLUSIVE_1, 1, N_EX1), (EXCLUSIVE_0, 0, N_EX0)):
        ex = [(latent_labels(relative_decoder_norm(c)) == label) & a for c, a in zip((cc, other), alive)]
        rep = exclusive_replication(cc, ex[0], other, ex[1], alive[1], source)
        assert rep["exclusive"] >= planted_count and rep["replicated"] >= planted_count, rep
        assert rep["p_value"] < 1e-3 and rep["replicated"] > 3 * rep["chance_expected"], rep
