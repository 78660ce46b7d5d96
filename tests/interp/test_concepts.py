"""Planted-concept scoring: counts and F1 against a brute-force loop, and the trained demo SAE's concepts."""
from __future__ import annotations

import pytest
import torch

from dlmscope.interp.baselines import concept_baselines
from dlmscope.interp.concepts import (concept_counts, concept_f1, labelled_activations, labelled_activations_by_layer,
                                      score_concepts)
from dlmscope.demo import DemoConfig, load_world_model, train_layer_saes
from dlmscope.sae.topk import TopKSAE
from dlmscope.world import CONCEPTS, concept_id_table, world_batches

#: The bar the trained demo SAE must pass: median over the 10 planted concepts of the best latent's F1, the latent
#: chosen on one half of the held-out text and scored on the other (as the demo does). Measured on the 8-block
#: world: 0.884 for the demo's Unmask-SAE (layer 1, k = 8, seed 0); three untrained SAEs with its b_dec and scale
#: score 0.59–0.61 (an uncentred one, b_dec = 0: 0.513) and the best single residual dimension 0.654 (the residual
#: stream already clusters by concept). On the previous 4-block world, three init seeds gave
#: 0.59–0.75 (in-sample choice), so the bar leaves room for seed-to-seed spread, not for a broken trainer.
MEDIAN_F1_BAR = 0.65
#: ... and it must beat the top of the matched untrained SAEs' spread by this much.
RANDOM_MARGIN = 0.1


def brute_force_f1(values, indices, labels, n_lat, n_con):
    """F1[j, c] by explicit loops over tokens (the definition in dlmscope.interp.concepts)."""
    tp = [[0] * n_con for _ in range(n_lat)]
    fires = [0] * n_lat
    count = [0] * n_con
    for row in range(values.shape[0]):
        lab = int(labels[row])
        if lab >= 0:
            count[lab] += 1
        for v, j in zip(values[row].tolist(), indices[row].tolist()):
            if v > 0:
                fires[j] += 1
                if lab >= 0:
                    tp[j][lab] += 1
    f1 = torch.zeros(n_lat, n_con, dtype=torch.float64)
    for j in range(n_lat):
        for c in range(n_con):
            denom = fires[j] + count[c]
            f1[j, c] = 2 * tp[j][c] / denom if denom else 0.0
    return torch.tensor(tp), torch.tensor(fires), torch.tensor(count), f1


@pytest.mark.parametrize("seed", range(4))
def test_counts_and_f1_match_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n_tok, k, n_lat, n_con = 200, 3, 17, 5
    values = torch.rand(n_tok, k, generator=g) - 0.3          # some non-positive values: not firing
    indices = torch.stack([torch.randperm(n_lat, generator=g)[:k] for _ in range(n_tok)])
    labels = torch.randint(-1, n_con, (n_tok,), generator=g)
    tp, fires, count = concept_counts(values, indices, labels, n_lat, n_con)
    tp_ref, fires_ref, count_ref, f1_ref = brute_force_f1(values, indices, labels, n_lat, n_con)
    assert torch.equal(tp, tp_ref) and torch.equal(fires, fires_ref) and torch.equal(count, count_ref)
    scores = concept_f1(tp, fires, count, [f"c{i}" for i in range(n_con)])
    torch.testing.assert_close(scores.f1_matrix, f1_ref, rtol=0, atol=1e-12)
    # choosing the latent on other tokens: the score is that latent's F1 here, never above the in-sample best
    other = concept_counts(values.flip(0), indices, labels, n_lat, n_con)
    held = concept_f1(tp, fires, count, [f"c{i}" for i in range(n_con)], select=other)
    _, _, _, f1_other = brute_force_f1(values.flip(0), indices, labels, n_lat, n_con)
    for c in range(n_con):
        assert held.best_latent[c] == int(f1_other[:, c].argmax())
        assert held.f1[c] == pytest.approx(float(f1_ref[held.best_latent[c], c])) and held.f1[c] <= scores.f1[c]
    for c in range(n_con):
        j = scores.best_latent[c]
        assert scores.f1[c] == pytest.approx(float(f1_ref[:, c].max()))
        assert scores.f1[c] == pytest.approx(float(f1_ref[j, c]))
        p, r = scores.precision[c], scores.recall[c]
        assert scores.f1[c] == pytest.approx(2 * p * r / (p + r) if p + r else 0.0)


def test_a_perfect_detector_scores_one_and_unlabelled_tokens_cost_precision():
    # latent c fires exactly on the tokens of concept c; latent 3 fires everywhere
    labels = torch.tensor([0, 1, 2, 0, -1, 1, 2, -1])
    indices = torch.stack([torch.tensor([max(int(lab), 0) if lab >= 0 else 4, 3]) for lab in labels])
    values = torch.ones(len(labels), 2)
    values[labels < 0, 0] = 0.0  # unlabelled tokens: only latent 3 fires
    scores = concept_f1(*concept_counts(values, indices, labels, 5, 3), ["a", "b", "c"])
    assert scores.f1 == [1.0, 1.0, 1.0] and scores.best_latent == [0, 1, 2]
    assert scores.median_f1 == 1.0
    # the always-on latent: recall 1, precision 2/8 for each concept -> F1 = 0.4
    assert scores.f1_matrix[3].tolist() == pytest.approx([0.4, 0.4, 0.4])


def test_bad_inputs_are_named():
    v, i = torch.ones(4, 2), torch.zeros(4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"labels must be \[N\]"):
        concept_counts(v, i, torch.zeros(3, dtype=torch.long), 5, 2)
    with pytest.raises(ValueError, match=r"labels must lie in -1\.\.1"):
        concept_counts(v, i, torch.full((4,), 2), 5, 2)
    with pytest.raises(ValueError, match="both be"):
        concept_counts(v, i[:, :1], torch.zeros(4, dtype=torch.long), 5, 2)
    sae = TopKSAE(8, 16, 2)
    with pytest.raises(ValueError, match=r"activations must be \[N, d\]"):
        score_concepts(sae, torch.randn(5, 8), torch.zeros(4, dtype=torch.long), ["a"])


# ------------------------------------------------------------------------------ the trained demo SAE
@pytest.fixture(scope="module")
def demo_unmask_sae():
    """The demo's Unmask-SAE sweep at layer 1, trained exactly as `make demo` trains it (one layer only)."""
    cfg = DemoConfig()
    dlm = load_world_model("dlm")
    train_batches, held_batches = world_batches(dlm.tokenizer, cfg.sentences, cfg.seq_len, cfg.lm_batch, cfg.seed)
    saes = train_layer_saes(dlm, train_batches, "unmask", cfg, layers=[1])[1]
    sae = next(s for s in saes if s.k == cfg.k_ref)
    return dlm, sae, held_batches, cfg


def test_demo_sae_latents_recover_planted_concepts(demo_unmask_sae):
    dlm, sae, held_batches, cfg = demo_unmask_sae
    names, table = concept_id_table(dlm.tokenizer)
    assert names == list(CONCEPTS)
    batches = held_batches[: cfg.concept_batches]
    choose = labelled_activations(dlm, batches[0::2], 1, table, "clean")  # as the demo: choose on one half,
    acts, labels = labelled_activations(dlm, batches[1::2], 1, table, "clean")  # score on the other
    assert acts.shape == (sum(b.numel() for b in batches[1::2]), dlm.d_model)
    scores = score_concepts(sae, acts, labels, names, select_on=choose)
    assert all(s > 50 for s in scores.support), scores.support  # every concept occurs in the held-out text
    print({n: round(f, 3) for n, f in zip(names, scores.f1)})
    assert scores.median_f1 >= MEDIAN_F1_BAR, scores.as_dict()
    # untrained SAEs with the trained b_dec and scale are far below: the score measures training, not chance
    base = concept_baselines(sae, acts, labels, names, count=3, seed=0, select_on=choose)
    chance, best_dim = base["random_sae"]["median_f1"], base["best_dimension"]["median_f1"]
    print("trained", scores.median_f1, "matched random SAEs", chance, "best dimension", best_dim)
    assert chance["high"] < scores.median_f1 - RANDOM_MARGIN
    # the best latents are distinct for most concepts (not one catch-all latent)
    assert len(set(scores.best_latent)) >= 7


def test_masked_view_labels_the_hidden_token():
    dlm = load_world_model("dlm")
    names, table = concept_id_table(dlm.tokenizer)
    cfg = DemoConfig()
    train_batches, _ = world_batches(dlm.tokenizer, 400, cfg.seq_len, cfg.lm_batch, cfg.seed)
    batch = train_batches[0][:4]
    acts, labels = labelled_activations(dlm, [batch], 2, table, "masked", t=0.4, seed=3)
    from dlmscope.data.noise import corrupt

    gen = torch.Generator().manual_seed(3)
    torch.rand((), generator=gen)  # harvest draws t first (a fixed t still consumes one draw)
    _, masked = corrupt(batch, None, dlm.mask_token_id, 0.4, gen)
    assert acts.shape[0] == int(masked.sum()) == labels.shape[0]
    assert torch.equal(labels, table[batch][masked])
    with pytest.raises(ValueError, match="view must be"):
        labelled_activations(dlm, [batch], 2, table, "noisy")


def test_labelled_activations_by_layer_equal_one_call_per_layer():
    dlm = load_world_model("dlm")
    _, table = concept_id_table(dlm.tokenizer)
    cfg = DemoConfig()
    train_batches, _ = world_batches(dlm.tokenizer, 400, cfg.seq_len, cfg.lm_batch, cfg.seed)
    batches = [train_batches[0][:3], train_batches[1][:2]]
    for view in ("clean", "masked"):
        both = labelled_activations_by_layer(dlm, batches, [5, 1], table, view, t=0.4, seed=3)
        assert sorted(both) == [1, 5]
        for layer in (1, 5):
            acts, labels = labelled_activations(dlm, batches, layer, table, view, t=0.4, seed=3)
            torch.testing.assert_close(both[layer][0], acts, rtol=1e-5, atol=1e-5)
            assert torch.equal(both[layer][1], labels)
    with pytest.raises(ValueError, match="at least one layer"):
        labelled_activations_by_layer(dlm, batches, [], table)
