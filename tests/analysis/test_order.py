"""dlmscope.analysis.order: the statistics on hand-built traces with known answers, replay against a direct forward,
the SAE-guided order's commit counts, Dream's confidence at matched commits, the correlation with zero-variance
groups out and its sign-agnostic verdict, and bad input."""
from __future__ import annotations

import math

import pytest
import torch

from dlmscope.analysis.order import (DreamConfidence, FeatureTrace, LogitsTap, SAEStabilityGuide, conjecture_verdict,
                                     group_correlation, jaccard, order_sensitive_features, order_statistics, replay,
                                     top_latents)
from dlmscope.models.sampler_rules import dream_tokens
from dlmscope.sae.topk import TopKSAE
from dlmscope.models.sampler_rules import dream_counts as _dream_counts, step_counts as _step_counts
from dlmscope.models.sampling import dream_fill, llada_fill, llada_generate

LAYERS = (2, 5)


@pytest.fixture(scope="module")
def saes(dlm):
    torch.manual_seed(0)
    return {L: TopKSAE(dlm.d_model, 96, 6) for L in LAYERS}


def _trace(ids, masked, tokens=None):
    """A one-layer, one-row trace from ``ids`` ``[S+1, G, K]`` and ``masked`` ``[S+1, G]``."""
    ids = torch.tensor(ids, dtype=torch.int32)[None, :, None]                 # [1, S+1, 1, G, K]
    masked = torch.tensor(masked)[:, None]
    values = torch.ones(ids.shape, dtype=torch.float16)
    tokens = torch.zeros(masked.shape, dtype=torch.long) if tokens is None else torch.tensor(tokens)[:, None]
    return FeatureTrace((3,), ids, values, masked, tokens)


def test_jaccard():
    a = torch.tensor([[1, 2, 3], [1, 2, -1], [-1, -1, -1]])
    b = torch.tensor([[3, 2, 1], [2, 5, -1], [-1, -1, -1]])
    assert jaccard(a, b).tolist() == pytest.approx([1.0, 1 / 3, 1.0])


def test_statistics_on_a_hand_built_history():
    # position 0 never changes its latents; position 1 changes them at every state
    # states:        0 (start)          1                  2                  3
    ids = [[[5, 7], [1, 2]], [[7, 5], [3, 4]], [[5, 7], [3, 9]], [[5, 7], [8, 2]]]
    masked = [[True, True], [True, True], [False, True], [False, False]]
    st = order_statistics(_trace(ids, masked))
    # position 0: pre-decode transition 0→1 (same set, top-1 5→7 changes), commit at step 1, post 2→3
    assert st.pre_stability[0, 0, 0] == 1.0 and st.post_drift[0, 0, 0] == 0.0
    assert st.lock_ratio[0, 0, 0] == 0.0 and st.top1_flips[0, 0, 0] == 0.0
    assert st.commit_step[0].tolist() == [1, 2]
    # position 1: pre transitions 0→1 (J 0) and 1→2 (J 1/3); committed at step 2; no post transition
    assert st.pre_stability[0, 0, 1] == pytest.approx((0 + 1 / 3) / 2)
    assert math.isnan(st.post_drift[0, 0, 1]) and st.lock_ratio[0, 0, 1] == pytest.approx(0.5)
    # masked-position stability per step: step 0 averages both positions, step 1 only position 1
    assert st.step_stability[0].tolist()[:2] == pytest.approx([0.5, 1 / 3])
    assert math.isnan(st.step_stability[0, 2])
    d = st.as_dict()
    assert d["layers"] == [3] and d["per_position"]["pre_stability"][0][0] == 1.0


def test_revisions_and_drift_after_commit():
    ids = [[[1, 2]], [[1, 2]], [[1, 3]], [[4, 5]]]
    masked = [[True], [False], [False], [False]]
    tokens = [[0], [7], [7], [9]]                                    # revised once after the commit
    st = order_statistics(_trace(ids, masked, tokens))
    assert st.revisions[0, 0, 0] == 1 and st.top1_flips[0, 0, 0] == 1
    assert st.post_drift[0, 0, 0] == pytest.approx(((1 - 1 / 3) + 1) / 2)
    assert math.isnan(st.pre_stability[0, 0, 0])                       # no pre-decode transition


def test_a_feature_present_under_one_order_only_scores_highest():
    masked = [[True, True], [False, True], [False, False]]
    ref = _trace([[[1, 2], [1, 3]], [[1, 2], [1, 3]], [[1, 2], [1, 3]]], masked)
    other = _trace([[[1, 2], [1, 3]], [[1, 9], [1, 3]], [[1, 9], [1, 9]]], masked)
    top = order_sensitive_features(ref, other, 16, top=3)[3]
    assert [f for f, _ in top[:3]] == [9, 2, 3] or [f for f, _ in top[:2]] == [9, 2]
    assert top[0] == (9, 3.0)                                          # absent from ref, in 3 (state, position)s
    with pytest.raises(ValueError, match="same prompts and steps"):
        order_sensitive_features(ref, _trace([[[1, 2], [1, 3]]] * 4, masked + [[False, False]]), 16)


def test_replay_equals_a_direct_forward_at_every_state(dlm, saes):
    tok = dlm.tokenizer
    prompts = [[tok.bos_token_id] + tok("the capital of japan is", add_special_tokens=False)["input_ids"],
               [tok.bos_token_id] + tok("two plus", add_special_tokens=False)["input_ids"]]
    gen = llada_generate(dlm, prompts, gen_length=4, steps=4, history=True)
    trace = replay(dlm, gen, saes, top_k=4, batch_rows=3)               # batches cut across states and rows
    S1, B, G = trace.masked.shape
    assert (S1, B, G) == (5, 2, 4) and trace.ids.shape == (2, 5, 2, 4, 4) and trace.ids.dtype == torch.int32
    assert trace.bytes_per_cell == 24 and trace.masked[0].all() and not trace.masked[-1].any()
    for s in range(S1):
        for b in range(B):
            n = int(gen.attention_mask[b].sum())
            hs = dlm.forward_until(gen.history[s, b:b + 1, :n], LAYERS)
            for li, L in enumerate(LAYERS):
                h = hs[L][0, gen.gen_positions[b]]
                ids, vals = top_latents(saes[L], h, 4)
                assert torch.equal(trace.ids[li, s, b], ids)
                torch.testing.assert_close(trace.values[li, s, b].float(), vals, rtol=2e-3, atol=2e-3)


def test_sae_guided_order_commits_the_scheduled_counts(dlm, saes):
    tok = dlm.tokenizer
    words = "five minus five is [MASK] , then [MASK] minus zero is [MASK] ."
    canvas = [[tok.bos_token_id] + tok(words, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]] * 2
    guide = SAEStabilityGuide(saes[5], 5)
    out = llada_fill(dlm, canvas, steps=3, guide=guide, history=True)
    assert out.committed.sum(2).T.tolist() == [_step_counts(3, 3)] * 2
    out = dream_fill(dlm, canvas, steps=2, alg="entropy", guide=guide, history=True)
    assert out.committed.sum(2).T.tolist() == [_dream_counts(3, 2, 1e-3)] * 2
    # stable positions rank first, confidence breaks ties; nothing is stable at the first step
    g = SAEStabilityGuide(saes[5], 5)
    with g.attach(dlm):
        ids = torch.tensor(canvas)
        dlm.logits(ids)
        pos = (ids == dlm.mask_token_id).nonzero()[:, 1].view(2, 3)
        masked = torch.ones(2, 3, dtype=torch.bool)
        conf = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.3, 0.4]])
        assert torch.equal(g.rank(conf, pos, masked), conf)
        dlm.logits(ids)                                                    # the same canvas: every set is stable
        assert (g.rank(conf, pos, masked) > 1.0).all()


def test_bad_input_names_the_problem(dlm, saes):
    tok = dlm.tokenizer
    prompt = [[tok.bos_token_id] + tok("two plus", add_special_tokens=False)["input_ids"]]
    gen = llada_generate(dlm, prompt, gen_length=2, steps=2)
    with pytest.raises(ValueError, match="history=True"):
        replay(dlm, gen, saes)
    done = llada_generate(dlm, prompt, gen_length=2, steps=2, history=True)
    done.history = done.history[-1:].repeat(3, 1, 1)                     # a history whose start has no masks
    with pytest.raises(ValueError, match="no masked"):
        replay(dlm, done, saes)
    hist = llada_generate(dlm, prompt, gen_length=2, steps=2, history=True)
    with pytest.raises(ValueError, match="hidden size"):
        replay(dlm, hist, {2: TopKSAE(dlm.d_model + 1, 32, 4)})
    with pytest.raises(ValueError, match="top_k"):
        replay(dlm, hist, saes, top_k=7)
    trace = replay(dlm, hist, saes)
    with pytest.raises(ValueError, match="was not replayed"):
        trace.layer_index(3)
    with pytest.raises(ValueError, match="hidden size"):
        with SAEStabilityGuide(TopKSAE(dlm.d_model + 1, 32, 4), 2).attach(dlm):
            pass
    with pytest.raises(ValueError, match="guide"):
        llada_generate(dlm, prompt, gen_length=2, steps=2, remasking="random", guide=SAEStabilityGuide(saes[2], 2))


def test_zero_variance_groups_are_left_out_of_r():
    # group a: r = 2 / √5 by hand (x centred −1.5 −.5 .5 1.5, y centred −.5 −.5 .5 .5); group b: every task right
    x = [1, 2, 3, 4, 10, -10, 5]
    y = [0, 0, 1, 1, 1, 1, 1]
    groups = ["a"] * 4 + ["b"] * 3
    c = group_correlation(x, y, groups)
    assert c["mean"] == pytest.approx(2 / math.sqrt(5)) and c["n"] == 4 and c["excluded_groups"] == {"b": 3}
    assert c["denominator"] == "over 4 tasks of 7; out for zero outcome variance: b (3 tasks)"
    # kept in, group b adds x variance and no covariance: r shrinks to 2 / √(5 + Σ(x_b − x̄_b)²)
    ss_b = sum((v - 5 / 3) ** 2 for v in (10, -10, 5))
    xc = [v - 2.5 for v in x[:4]] + [v - 5 / 3 for v in x[4:]]
    yc = [v - 0.5 for v in y[:4]] + [0.0] * 3
    diluted = sum(a * b for a, b in zip(xc, yc)) / math.sqrt(sum(a * a for a in xc) * sum(b * b for b in yc))
    assert diluted == pytest.approx(2 / math.sqrt(5 + ss_b)) and diluted < c["mean"] - 0.5
    # a task with no statistic (NaN / None) is dropped before the variance check: group c keeps one value
    c2 = group_correlation(x + [None, 3], y + [0, 1], groups + ["c", "c"], n_total=20, units="order-sensitive tasks")
    assert c2["excluded_groups"] == {"b": 3, "c": 1} and c2["denominator"].startswith("over 4 order-sensitive tasks "
                                                                                        "of 20")
    # pooled (not centred) over two groups that vary: plain Pearson over the kept tasks
    xp, yp = [1, 2, 3, 4, 5, 7, 6, 9], [0, 1, 0, 1, 1, 0, 1, 1]
    pooled = group_correlation(xp, yp, ["a"] * 4 + ["b"] * 4, within=False)
    assert pooled["mean"] == pytest.approx(float(torch.corrcoef(torch.tensor([xp, yp], dtype=torch.float64))[0, 1]))
    assert not pooled["within_groups"] and pooled["excluded_groups"] == {}


def test_a_robust_negative_correlation_is_an_association():
    x = [float(i) for i in range(40)]
    groups = ["a"] * 20 + ["b"] * 20
    y = [1.0 if i % 20 < 10 else 0.0 for i in range(40)]          # stable tasks go wrong, within each group
    neg = group_correlation(x, y, groups)
    assert neg["sign"] == "negative" and neg["verdict"] == "association" and neg["high"] < 0
    assert neg["fisher_z"] < -3
    null = group_correlation([1.0, 2.0] * 20, [0.0, 0.0, 1.0, 1.0] * 10, groups)   # r = 0 exactly
    assert null["mean"] == pytest.approx(0.0, abs=1e-12) and null["verdict"] == "none"
    assert conjecture_verdict({"o1": neg, "o2": neg})["verdict"] == "association"
    assert conjecture_verdict({"o1": neg, "o2": neg})["sign"] == "negative"
    half = conjecture_verdict({"o1": neg, "o2": null})
    assert half["verdict"] == "partly" and half["negative"] == ["o1"] and "1 of 2 orders" in half["text"]
    pos = group_correlation(x, [1 - v for v in y], groups)
    mixed = conjecture_verdict({"o1": neg, "o2": pos, "o3": null})
    assert mixed["verdict"] == "association" and mixed["sign"] == "mixed"
    assert conjecture_verdict({"o1": null})["verdict"] == "not reproduced"


def test_dream_confidence_at_matched_commits(dlm, saes):
    tok = dlm.tokenizer
    words = "five minus five is [MASK] , then [MASK] minus zero is [MASK] ."
    canvas = [[tok.bos_token_id] + tok(words, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]] * 2
    # Dream's own schedule at 3 steps for 3 answers: nothing at the first step, two at the last
    dream = dream_fill(dlm, canvas, steps=3, alg="entropy", history=True)
    assert dream.committed.sum(2)[:, 0].tolist() == [0, 1, 2]
    # ... so the SAE guide sees an unchanged canvas at the second step (every set stable) and changes nothing
    guided = dream_fill(dlm, canvas, steps=3, alg="entropy", guide=SAEStabilityGuide(saes[5], 5), history=True)
    assert torch.equal(guided.committed, dream.committed) and torch.equal(guided.sequences, dream.sequences)
    # in LLaDA's loop ranked by Dream's entropy: one answer per step, each the most confident masked position
    tap = LogitsTap(dlm)
    out = llada_fill(tap, canvas, steps=3, guide=DreamConfidence(tap, "entropy"), history=True)
    assert out.committed.sum(2)[:, 0].tolist() == [1, 1, 1]
    for s in range(3):
        logits = dlm.logits(out.history[s], out.attention_mask)
        gl = logits.gather(1, out.gen_positions[..., None].expand(-1, -1, logits.shape[-1])).float()
        _, conf = dream_tokens(gl, "entropy", 0.0, None, None, None)
        masked = out.history[s].gather(1, out.gen_positions) == dlm.mask_token_id
        best = torch.where(masked, conf, torch.full_like(conf, -torch.inf)).argmax(1)
        assert torch.equal(out.committed[s].gather(1, out.gen_positions).float().argmax(1), best)
    assert tap.last is None                                                # released after the run
    # re-ranked by the SAE guide after: the same counts, and the first step is Dream's choice (nothing is stable yet)
    both = llada_fill(tap, canvas, steps=3, guide=DreamConfidence(tap, "entropy", then=SAEStabilityGuide(saes[5], 5)),
                      history=True)
    assert both.committed.sum(2)[:, 0].tolist() == [1, 1, 1] and torch.equal(both.committed[0], out.committed[0])
    with pytest.raises(ValueError, match="did you mean 'entropy'"):
        DreamConfidence(tap, "entropi")
    with pytest.raises(RuntimeError, match="LogitsTap"):
        DreamConfidence(tap, "entropy").rank(torch.zeros(2, 3), out.gen_positions, torch.ones(2, 3, dtype=torch.bool))
