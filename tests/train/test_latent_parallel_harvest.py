"""Distributed harvest (dlmscope.data.ranks): two gloo ranks each harvest their own slice of the text
with the truncated forward and train on their own activations (DDP, no activation gather), equal to one process
training on the same global batches; the rank slices are disjoint, cover the stream and stay lazy."""
from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import load_file

from dlmscope import models
from dlmscope.data.ranks import RankSlice, global_batches
from dlmscope.train.trainer import LogConfig, Trainer
from tests.helpers.harvest_worker import N_LM_BATCHES, layer_stream, make_config, make_saes, token_batches
from tests.helpers.train_worker import final_tensors
from tests.helpers.tiny_models import make_llada
from tests.helpers.torchrun import run_torchrun


def test_rank_slices_partition_the_stream_lazily():
    items = list(range(10))
    slices = [list(RankSlice(items, r, 3)) for r in range(3)]
    assert slices == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert list(RankSlice(items, 1, 3)) == slices[1]  # re-iterable
    endless = RankSlice(itertools.count(), 1, 4)  # a stream without an end is read only as far as needed
    assert list(itertools.islice(endless, 3)) == [1, 5, 9]
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, world=2\)"):
        RankSlice(items, 2, 2)
    with pytest.raises(ValueError, match="world must be a positive int"):
        RankSlice(items, 0, 0)


@pytest.mark.distributed
def test_two_ranks_harvesting_their_slices_equal_one_process(tmp_path):
    model_dir = tmp_path / "llada"
    make_llada(model_dir)
    out = tmp_path / "final.safetensors"
    proc = run_torchrun(2, "--out", str(out), "--model", str(model_dir), worker="tests.helpers.harvest_worker")
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"

    torch.set_num_threads(1)
    adapter = models.load(model_dir)
    streams = [layer_stream(adapter, r, 2) for r in range(2)]
    rows = [[b.shape[0] for b in s] for s in streams]
    assert len(rows[1]) < len(rows[0])  # rank 1's slice (10 of 21 LM batches) runs out first
    trainer = Trainer(make_saes(adapter.d_model), make_config(), log=LogConfig(log_every=0, progress=False))
    expected = final_tensors(trainer.fit(global_batches(streams)))
    assert trainer.step == len(rows[1]) and f"done step={trainer.step} tokens={trainer.tokens_seen}" in proc.stdout
    got = load_file(str(out))
    for name, value in expected.items():  # fp32 rounding of the gradient all-reduce: ~1e-6 after 10 Adam steps
        torch.testing.assert_close(got[name], value, atol=2e-6, rtol=0, msg=name)
    assert N_LM_BATCHES == len(token_batches())
