"""dlmscope.world.quality: the fill-in scorers, checked with logit functions whose answers are known."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dlmscope.world import corpus as C
from dlmscope.world.quality import exact_match, fill_left_to_right, fill_masked, task_quality
from dlmscope.world.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def tasks():
    return C.decoding_tasks(70, seed=4)


class Knower:
    """Logits that put the right token at every position (``p_right`` there, the rest spread), looked up
    from the solutions; ``shift=1`` scores token ``i + 1`` at ``i`` (an AR model). Records its inputs."""

    def __init__(self, tasks, tok, shift=0, confidence=None, wrong_at=None):
        self.solutions = {}
        for t in tasks:
            inp, tgt, _ = t.encode(tok)
            self.solutions[tuple(inp)] = tgt
        self.vocab, self.shift, self.calls = len(tok), shift, []
        self.confidence = confidence or (lambda pos: 0.9)
        self.wrong_at = wrong_at
        self.mask_id = tok.mask_token_id

    def __call__(self, input_ids, attention_mask):
        self.calls.append(input_ids.clone())
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.vocab)
        for r in range(B):
            n = int(attention_mask[r].sum())
            key = self._original(input_ids[r, :n].tolist())
            tgt = self.solutions[key]
            for p in range(n - self.shift):
                want = tgt[p + self.shift]
                if self.wrong_at is not None and p + self.shift == self.wrong_at:
                    want = (want + 1) % self.vocab
                c = self.confidence(p + self.shift)
                logits[r, p, want] = torch.logit(torch.tensor(c)) + 5.0
        return SimpleNamespace(logits=logits)

    def _original(self, ids):
        for key in self.solutions:
            if len(key) == len(ids) and all(k == i or k == self.mask_id for k, i in zip(key, ids)):
                return key
        raise AssertionError("unknown input")


def test_a_model_that_knows_every_answer_scores_one(tasks, tok):
    scored = [t for t in tasks if t.kind in C.SCORED_KINDS]
    for fill, shift in ((fill_masked, 0), (fill_left_to_right, 1)):
        pred = fill(Knower(scored, tok, shift=shift), scored, tok, batch=16)
        assert all(exact_match(scored, pred, tok))
        assert [len(p) for p in pred] == [len(t.answer_positions) for t in scored]


def test_one_wrong_answer_fails_the_task(tok):
    task = C.Task("arith", ("two", "plus", "two", "is", "four", "."), (4,))
    pred = fill_masked(Knower([task], tok, wrong_at=5), [task], tok)
    assert exact_match([task], pred, tok) == [False]


def test_masked_fill_commits_most_confident_first(tok):
    task = next(t for t in C.decoding_tasks(30, seed=1) if t.kind == "count" and len(t.answer_positions) >= 3)
    positions = [p + 1 for p in task.answer_positions]
    # the last position is the surest, then the first, ...: commit order follows confidence, not position
    rank = {p: c for p, c in zip(positions, torch.linspace(0.5, 0.8, len(positions)).tolist()[::-1])}
    rank[positions[-1]] = 0.95
    model = Knower([task], tok, confidence=lambda p: rank.get(p, 0.99))
    fill_masked(model, [task], tok)
    assert len(model.calls) == len(positions)          # one commit per forward
    order = []
    for before, after in zip(model.calls, model.calls[1:]):
        order += [int(i) for i in torch.nonzero((before[0] == tok.mask_token_id) & (after[0] != tok.mask_token_id))]
    expected = sorted(positions, key=lambda p: -rank[p])
    assert order == expected[:len(order)]


def test_left_to_right_fill_sees_only_its_own_answers(tok):
    task = next(t for t in C.decoding_tasks(30, seed=2) if t.kind == "arith_chain")
    model = Knower([task], tok, shift=1)
    fill_left_to_right(model, [task], tok)
    first, second = (p + 1 for p in task.answer_positions[:2])
    # when the second answer is predicted, the first is filled in and the later ones are still masked
    assert model.calls[1][0, first] != tok.mask_token_id and model.calls[1][0, second] == tok.mask_token_id


def test_task_quality_splits_and_skips_neutral(tasks, tok):
    scored = [t for t in tasks if t.kind in C.SCORED_KINDS]
    held = [C.task_heldout(t, 0.05, 0) for t in tasks]
    q = task_quality(Knower(scored, tok), tasks, held, tok, causal=False)
    assert "neutral" not in q["in_distribution"] and "neutral" not in q["heldout"]
    assert "chain3" in q["heldout"] and "chain3" not in q["in_distribution"]
    n = sum(c["n"] for s in q.values() for c in s.values())
    assert n == len(scored)
    assert all(c["exact_match"] == 1.0 for s in q.values() for c in s.values())
