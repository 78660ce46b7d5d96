"""dlmscope.models.hooks on toy modules: tensor and tuple outputs, the three hook kinds, removal on exit and on error."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dlmscope.models import hooks


class TupleBlock(nn.Module):
    """A block whose output is ``(hidden, extra)``, as older / remote decoder layers return."""

    def forward(self, x):
        return 2 * x, "extra"


class Embedder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids):
        return self.emb(input_ids)


def test_block_output_and_replace_output_keep_the_container():
    h, new = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)
    assert hooks.block_output(h) is h and hooks.block_output((h, 1)) is h and hooks.block_output([h, 1]) is h
    assert hooks.replace_output(h, new) is new
    assert hooks.replace_output((h, 1, 2), new) == (new, 1, 2)
    out = [h, 1]
    assert hooks.replace_output(out, new) == [new, 1] and out[0] is h  # the original is not modified


@pytest.mark.parametrize("block", [nn.Identity(), TupleBlock()], ids=["tensor", "tuple"])
def test_capture_replace_and_intervene(block):
    x = torch.randn(2, 3, 4)
    clean = hooks.block_output(block(x))
    seen = []
    with hooks.capture(block, seen.append):
        out = block(x)
    assert torch.equal(hooks.block_output(out), clean) and torch.equal(seen[0], clean)
    with hooks.replace(block, lambda h: -h):
        out = block(x)
    assert torch.equal(hooks.block_output(out), -clean) and type(out) is type(block(x))
    with hooks.intervene(block, lambda h: torch.ones_like(h, dtype=torch.float64)):
        out = block(x)
    assert hooks.block_output(out).dtype == clean.dtype and torch.equal(hooks.block_output(out), clean + 1)
    with hooks.intervene(block, lambda h: None):  # None: the output is left as it is
        assert torch.equal(hooks.block_output(block(x)), clean)
    assert not block._forward_hooks


def test_replace_keeps_gradients_and_intervene_does_not():
    block, x = nn.Linear(4, 4), torch.randn(3, 4)
    with hooks.replace(block, lambda h: 3 * h):
        assert block(x).requires_grad
    with hooks.intervene(block, lambda h: torch.ones_like(h)):
        assert not block(x).requires_grad


def test_hooks_are_removed_on_error_and_not_registered_before_entry():
    block = nn.Identity()
    ctx = hooks.replace(block, lambda h: h)
    assert not block._forward_hooks  # created, not entered
    with pytest.raises(RuntimeError, match="boom"):
        with ctx:
            assert len(block._forward_hooks) == 1
            raise RuntimeError("boom")
    assert not block._forward_hooks

    def stop(h):
        raise KeyError("stop")

    with pytest.raises(KeyError):
        with hooks.capture(block, stop):
            block(torch.zeros(1))
    assert not block._forward_hooks


def test_record_input_ids():
    model = Embedder()
    ids = torch.tensor([[1, 2, 3]])
    with hooks.record_input_ids(model) as seen:
        assert seen.ids is None
        model(ids)
        assert seen.ids is ids
        model.emb(input=ids[:, :2])  # ids passed by keyword
        assert torch.equal(seen.ids, ids[:, :2])
    assert not model.emb._forward_pre_hooks


class Counting(nn.Module):
    """A block that counts its real forwards and writes into its input in place."""

    def __init__(self, tuple_out: bool = False):
        super().__init__()
        self.calls, self.tuple_out = 0, tuple_out

    def forward(self, x):
        self.calls += 1
        out = x + 1
        return (out, "extra") if self.tuple_out else out


def test_replay_outputs_skips_the_recorded_blocks_and_hands_out_copies():
    first, second, third = Counting(), Counting(tuple_out=True), Counting()

    def model(x):
        h = first(x)
        h = second(h)[0]
        h.mul_(1.0)  # an in-place write into a replayed output must not reach the next replay
        return third(h)

    x = torch.zeros(2, 3)
    with hooks.record_outputs([first, second]) as recorded:
        ref = model(x)
    assert [len(r) for r in recorded] == [1, 1] and recorded[1][0][1] == "extra"
    for _ in range(2):
        with hooks.replay_outputs([first, second], recorded):
            got = model(torch.full((2, 3), 99.0))  # the replayed blocks ignore their input
        assert torch.equal(got, ref)
    assert (first.calls, second.calls, third.calls) == (1, 1, 3)
    assert "forward" not in first.__dict__ and "forward" not in second.__dict__  # restored on exit
    model(x)
    assert first.calls == 2
    with pytest.raises(RuntimeError, match="more often"):
        with hooks.replay_outputs([first, second], recorded):
            model(x)
            model(x)
    assert "forward" not in first.__dict__
    with pytest.raises(ValueError, match="recorded output lists"):
        with hooks.replay_outputs([first], recorded):
            pass
