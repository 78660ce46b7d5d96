"""dlmscope.analysis.order: the statistics on hand-built traces with known answers, replay against a direct forward,
the SAE-guided order's commit counts, and bad input."""
from __future__ import annotations

import math

import pytest
import torch

from dlmscope.analysis.order import (FeatureTrace, SAEStabilityGuide, jaccard, order_sensitive_features,
                                     order_statistics, replay, top_latents)
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
