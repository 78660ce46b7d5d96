"""dlmscope.models.sampling: LLaDA's and Dream's samplers and the AR baseline, on the embedded world's models and on
a model that is certain of a known target."""
from __future__ import annotations

import pytest
import torch

from dlmscope.demo import load_world_model
from dlmscope.models import Adapter
from dlmscope.models.sampler_rules import dream_counts as _dream_counts, step_counts as _step_counts
from dlmscope.models.sampling import ar_generate, dream_generate, llada_generate


@pytest.fixture(scope="module")
def ar():
    return load_world_model("ar")


def _ids(adapter, text):
    """A prompt: ``[BOS]`` and the words, no ``[EOS]`` (the tokenizer's template appends one)."""
    tok = adapter.tokenizer
    return [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]


class Certain(Adapter):
    """The world DLM's weights, but logits that are certain of ``target[b, i]`` at every position, with a
    confidence that falls with the position (so confidence order = left to right unless ``reverse``)."""

    def __init__(self, base: Adapter, target: torch.Tensor, reverse=False, shift=0):
        super().__init__(base.model, base.tokenizer, family="llada", mask_token_id=base.mask_token_id,
                         is_diffusion=True, logit_shift=shift, source="certain")
        self.target, self.reverse = target, reverse

    def logits(self, input_ids, attention_mask=None):
        B, T = input_ids.shape
        V = self.vocab_size
        pos = torch.arange(T, dtype=torch.float32)
        strength = 10.0 + (pos if self.reverse else -pos) * 0.1
        out = torch.zeros(B, T, V)
        out.scatter_(2, self.target[:, :T, None], strength.expand(B, T)[..., None])
        return out


def _target(dlm, prompts, gen):
    P = max(len(p) for p in prompts)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(10, dlm.vocab_size, (len(prompts), P + gen), generator=g)
    for b, p in enumerate(prompts):
        t[b, :len(p)] = torch.tensor(p)
    return t


PROMPTS = [[1, 50, 60], [1, 70, 80, 90, 100]]


@pytest.mark.parametrize("block_length", [None, 4, 2])
def test_llada_certain_model_reproduces_its_target(dlm, block_length):
    G = 8
    target = _target(dlm, PROMPTS, G)
    out = llada_generate(Certain(dlm, target), PROMPTS, gen_length=G, steps=8, block_length=block_length,
                         history=True)
    for b, p in enumerate(PROMPTS):
        assert out.sequences[b, :len(p) + G].tolist() == target[b, :len(p) + G].tolist()
    assert out.history.shape == (9, 2, 5 + G) and out.committed.shape == (8, 2, 5 + G)


def test_llada_schedule_blocks_and_history(dlm):
    G, steps, block = 12, 6, 4       # 3 blocks of 4 positions, 2 steps each: 2 + 2 commits per block
    target = _target(dlm, PROMPTS, G)
    out = llada_generate(Certain(dlm, target, reverse=True), PROMPTS, gen_length=G, steps=steps,
                         block_length=block, history=True)
    counts = _step_counts(block, steps // (G // block))
    for b, p in enumerate(PROMPTS):
        gen = torch.arange(len(p), len(p) + G)
        done_at = torch.full((G,), -1)
        for s in range(steps):
            changed = out.history[s + 1, b] != out.history[s, b]
            assert torch.equal(changed, out.committed[s, b])              # history replays
            assert int(out.committed[s, b].sum()) == counts[s % len(counts)]
            done_at[out.committed[s, b][gen]] = s
        assert (done_at >= 0).all()
        blocks = torch.arange(G) // block
        # strictly in block order: every position of block j is done before any of block j + 1
        for j in range(G // block - 1):
            assert done_at[blocks == j].max() < done_at[blocks == j + 1].min()
        # within a block the most confident (here: the rightmost) goes first
        assert done_at[block - 1] <= done_at[0]
    # prompt and pads never change
    assert (out.history[:, 0, 3 + G:] == out.history[0, 0, 3 + G:]).all()
    assert (out.history[:, :, :3] == out.history[0, :, :3]).all()


def test_step_counts_follow_llada():
    assert _step_counts(10, 4) == [3, 3, 2, 2] and sum(_step_counts(7, 7)) == 7
    c = _dream_counts(16, 5, 1e-3)
    assert sum(c) == 16 and len(c) == 5


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy", "origin"])
def test_dream_certain_model_reproduces_its_target(dlm, alg):
    G = 6
    target = _target(dlm, PROMPTS, G)
    out = dream_generate(Certain(dlm, target), PROMPTS, max_new_tokens=G, steps=4, alg=alg, history=True, seed=1)
    for b, p in enumerate(PROMPTS):
        assert out.sequences[b, :len(p) + G].tolist() == target[b, :len(p) + G].tolist()
    for s in range(4):
        assert torch.equal(out.history[s + 1] != out.history[s], out.committed[s])
    if alg != "origin":
        assert out.committed.sum((1, 2)).tolist() == [2 * n for n in _dream_counts(G, 4, 1e-3)]


def test_batched_prompts_equal_one_at_a_time(dlm):
    prompts = [_ids(dlm, "the capital of france is"), _ids(dlm, "two plus two is"),
               _ids(dlm, "anna wrote a story about")]
    for fn, kw in ((llada_generate, dict(gen_length=4, steps=4, block_length=2)),
                   (dream_generate, dict(max_new_tokens=4, steps=4, alg="entropy"))):
        batched = fn(dlm, prompts, **kw)
        for b, p in enumerate(prompts):
            single = fn(dlm, [p], **kw)
            assert batched.generated(4)[b].tolist() == single.generated(4)[0].tolist(), (fn.__name__, b)


def test_temperature_sampling_is_deterministic_for_a_seed(dlm):
    p = [_ids(dlm, "my mother has a")]
    a = llada_generate(dlm, p, gen_length=6, steps=6, temperature=1.0, seed=3).sequences
    b = llada_generate(dlm, p, gen_length=6, steps=6, temperature=1.0, seed=3).sequences
    c = [llada_generate(dlm, p, gen_length=6, steps=6, temperature=1.0, seed=s).sequences for s in range(4, 9)]
    assert torch.equal(a, b) and any(not torch.equal(a, x) for x in c)
    d = dream_generate(dlm, p, max_new_tokens=6, steps=6, temperature=1.0, top_p=0.9, seed=3).sequences
    assert torch.equal(d, dream_generate(dlm, p, max_new_tokens=6, steps=6, temperature=1.0, top_p=0.9,
                                         seed=3).sequences)


def test_callback_sees_each_step_and_cannot_change_the_run(dlm):
    p = [_ids(dlm, "the day after monday is")]
    ref = llada_generate(dlm, p, gen_length=4, steps=4).sequences
    seen = []

    def meddle(state):
        seen.append((state.step, int(state.masked.sum()), int(state.commit.sum()), state.logits.shape))
        state.ids.fill_(0)
        state.logits.fill_(0)

    out = llada_generate(dlm, p, gen_length=4, steps=4, callback=meddle).sequences
    assert torch.equal(out, ref)
    assert [s for s, *_ in seen] == [0, 1, 2, 3] and [m for _, m, _, _ in seen] == [4, 3, 2, 1]
    assert all(c == 1 for _, _, c, _ in seen)


def test_world_dlm_answers_with_the_llada_sampler(dlm):
    out = llada_generate(dlm, [_ids(dlm, "the capital of france is")], gen_length=2, steps=2)
    assert dlm.tokenizer.convert_ids_to_tokens(out.generated(2)[0].tolist())[0] == "paris"


def test_ar_generate_greedy_and_left_aligned(ar):
    prompts = [_ids(ar, "the capital of france is"), _ids(ar, "two plus two is")]
    out = ar_generate(ar, prompts, max_new_tokens=2)
    words = [ar.tokenizer.convert_ids_to_tokens(out.generated(2)[b].tolist()) for b in range(2)]
    assert words[0][0] == "paris" and words[1][0] == "four"
    for b, p in enumerate(prompts):
        assert out.sequences[b, :len(p)].tolist() == p
        single = ar_generate(ar, [p], max_new_tokens=2)
        assert single.generated(2)[0].tolist() == out.generated(2)[b].tolist()
    steps = []
    ar_generate(ar, prompts[:1], max_new_tokens=3, callback=lambda s: steps.append((s.step, s.logits.shape)))
    assert [s for s, _ in steps] == [0, 1, 2] and steps[0][1] == (1, ar.vocab_size)


def test_bad_arguments_name_the_problem(dlm, ar):
    p = [_ids(dlm, "two plus two is")]
    with pytest.raises(ValueError, match="gen_length=6 is not a multiple of block_length=4"):
        llada_generate(dlm, p, gen_length=6, steps=6, block_length=4)
    with pytest.raises(ValueError, match="steps=3 is not divisible by the number of blocks"):
        llada_generate(dlm, p, gen_length=4, steps=3, block_length=2)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        llada_generate(dlm, p, gen_length=4, steps=0)
    with pytest.raises(ValueError, match="did you mean 'low_confidence'"):
        llada_generate(dlm, p, gen_length=4, steps=4, remasking="low_confidense")
    with pytest.raises(ValueError, match="did you mean 'maskgit_plus'"):
        dream_generate(dlm, p, max_new_tokens=4, steps=4, alg="maskgit")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        llada_generate(dlm, p, gen_length=dlm.config.max_position_embeddings, steps=1)
    with pytest.raises(ValueError, match="no mask token"):
        llada_generate(ar, p, gen_length=4, steps=4)
    with pytest.raises(ValueError, match="diffusion LM"):
        ar_generate(dlm, p, max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one token"):
        llada_generate(dlm, [[]], gen_length=4, steps=4)


def test_dream_format_model_with_its_logit_shift(tmp_path):
    """A tiny Dream-format checkpoint (shifted logits, no tokenizer): the committed token is the argmax of the
    aligned logits the callback sees, and batched prompts of different lengths equal one at a time."""
    from dlmscope import models
    from tests.helpers.tiny_checkpoints import DREAM_MASK, dream_config, dream_tensors, write_dir

    dream = models.load(write_dir(tmp_path / "dream", dream_config(), dream_tensors()))
    assert dream.logit_shift == 1 and dream.tokenizer is None
    prompts = [[1, 5, 9], [1, 7, 8, 11, 12]]
    seen = []

    def check(state):
        pos = torch.nonzero(state.commit)
        for b, t in pos.tolist():
            seen.append((b, t, int(state.logits[b, t].argmax())))

    out = dream_generate(dream, prompts, max_new_tokens=4, steps=4, alg="maskgit_plus", callback=check,
                         history=True)
    for b, t, tok in seen:
        assert out.sequences[b, t] == tok
    assert (out.sequences != DREAM_MASK).all()
    for fn, kw in ((dream_generate, dict(max_new_tokens=4, steps=2, alg="topk_margin")),
                   (llada_generate, dict(gen_length=4, steps=4, block_length=2))):
        batched = fn(dream, prompts, **kw)
        for b, p in enumerate(prompts):
            assert batched.generated(4)[b].tolist() == fn(dream, [p], **kw).generated(4)[0].tolist()


# ------------------------------------------------------------------------------------------------ fill
def _canvas(dlm, target, holes):
    """``target`` rows with ``[MASK]`` at ``holes[b]``."""
    rows = []
    for b, h in enumerate(holes):
        r = target[b].tolist()
        for i in h:
            r[i] = dlm.mask_token_id
        rows.append(r)
    return rows


@pytest.mark.parametrize("sampler", ["llada", "dream"])
def test_fill_writes_only_the_masks_and_reproduces_a_certain_target(dlm, sampler):
    from dlmscope.models.sampling import dream_fill, llada_fill

    target = _target(dlm, [[1]], 7).repeat(2, 1)                    # [BOS] + 7 tokens, no [MASK] among them
    holes = [[2, 5, 6], [1, 3, 7]]                                  # masks anywhere, the same count per row
    certain = Certain(dlm, target)
    canvas = _canvas(dlm, target, holes)
    if sampler == "llada":
        out = llada_fill(certain, canvas, steps=3, history=True)
        counts = _step_counts(3, 3)
    else:
        out = dream_fill(certain, canvas, steps=3, alg="maskgit_plus", history=True)
        counts = _dream_counts(3, 3, 1e-3)
    assert torch.equal(out.sequences, target)
    assert out.gen_positions.tolist() == holes and out.prompt_lengths.tolist() == [2, 1]
    assert torch.equal(out.generated(), torch.stack([target[b, holes[b]] for b in range(2)]))
    assert out.committed.sum(2).T.tolist() == [counts, counts]
    # confidence falls with the position: each row is filled left to right
    order = out.committed.float().argmax(0)                         # [B, T]: the step that wrote each position
    for b, h in enumerate(holes):
        assert order[b, h].tolist() == sorted(order[b, h].tolist())


def test_dream_even_schedule_commits_one_answer_per_step(dlm):
    """Dream's own counts floor the first of G steps to 0 for G masks; ``schedule="even"`` commits one per step,
    the most confident first, and still fills the target."""
    from dlmscope.models.sampling import dream_fill

    target = _target(dlm, [[1]], 7).repeat(2, 1)
    holes = [[2, 5, 6], [1, 3, 7]]
    certain = Certain(dlm, target)
    own = dream_fill(certain, _canvas(dlm, target, holes), steps=3, alg="entropy", history=True)
    even = dream_fill(certain, _canvas(dlm, target, holes), steps=3, alg="entropy", history=True, schedule="even")
    assert own.committed.sum(2)[:, 0].tolist() == _dream_counts(3, 3, 1e-3) and _dream_counts(3, 3, 1e-3)[0] == 0
    assert even.committed.sum(2)[:, 0].tolist() == [1, 1, 1]
    assert torch.equal(even.sequences, target)
    with pytest.raises(ValueError, match="schedule"):
        dream_fill(certain, _canvas(dlm, target, holes), steps=3, alg="origin", schedule="even")
    with pytest.raises(ValueError, match="schedule"):
        dream_fill(certain, _canvas(dlm, target, holes), steps=3, alg="entropy", schedule="uneven")


def test_fill_rejects_rows_with_different_mask_counts(dlm):
    from dlmscope.models.sampling import llada_fill

    target = _target(dlm, [[1]], 5).repeat(2, 1)
    with pytest.raises(ValueError, match="same number"):
        llada_fill(dlm, _canvas(dlm, target, [[2, 3], [4]]), steps=2)
    with pytest.raises(ValueError, match="same number"):
        llada_fill(dlm, target.tolist(), steps=2)
