"""Latent sharding in one process: shard bounds, shard init, input validation, the 1 x 1 grid, sharded checkpoints.

The multi-process runs (R = 2, 4 and a 2 x 2 grid against one process) are in test_latent_parallel_dist.py.
"""
from __future__ import annotations

import pytest
import torch

from dlmscope.train import sharded_checkpoint as sc
from dlmscope.train.latent_parallel import INIT_BLOCK, LatentShard, ProcessGrid, make_grid, shard_bounds
from dlmscope.train.latent_trainer import LatentParallelTrainer, gather_saes
from dlmscope.sae.topk import TopKSAE
from dlmscope.train.trainer import Trainer
from tests.helpers.latent_worker import data_stream, make_config, make_log, make_saes
from tests.helpers.train_worker import final_tensors


def test_shard_bounds_split_unevenly_front_first():
    assert shard_bounds(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert shard_bounds(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert shard_bounds(5, 5) == [(i, i + 1) for i in range(5)]
    with pytest.raises(ValueError, match=r"n=3 latents over R=4"):
        shard_bounds(3, 4)
    with pytest.raises(ValueError, match="positive int"):
        shard_bounds(3, 0)


def test_make_grid_alone_and_bad_sizes():
    grid = make_grid(1)
    assert (grid.data_size, grid.latent_size, grid.world) == (1, 1, 1) and grid.latent_group is None
    with pytest.raises(ValueError, match="does not divide the world size 1"):
        make_grid(2)


def test_shard_init_is_the_same_sae_for_any_number_of_shards():
    d, n = 3, INIT_BLOCK + 37  # shards that cross an init block boundary
    whole = LatentShard.init(d, n, 4, 0, n, seed=5)
    for R in (2, 3):
        parts = [LatentShard.init(d, n, 4, lo, hi, seed=5) for lo, hi in shard_bounds(n, R)]
        assert torch.equal(torch.cat([p.W_dec for p in parts]), whole.W_dec)
        assert torch.equal(torch.cat([p.W_enc for p in parts]), whole.W_enc)
    assert torch.allclose(whole.W_dec.norm(dim=1), torch.ones(n))


def test_shard_validates_shapes_and_bounds():
    sae = TopKSAE(4, 10, 2)
    with pytest.raises(ValueError, match=r"W_enc must be \[3, 4\]"):
        LatentShard(sae.cfg, 0, 3, {"W_enc": sae.W_enc[:4], "b_enc": sae.b_enc[:3], "W_dec": sae.W_dec[:3],
                                    "b_dec": sae.b_dec})
    with pytest.raises(ValueError, match="0 <= lo < hi <= n=10"):
        LatentShard.from_sae(sae, 5, 11)
    grid = ProcessGrid(1, 1)
    with pytest.raises(ValueError, match=r"must hold latents \[0, 10\] of n=10, but its shard holds \[0, 5\)"):
        LatentParallelTrainer([LatentShard.from_sae(sae, 0, 5)], grid)
    with pytest.raises(TypeError, match="LatentShard"):
        LatentParallelTrainer([sae], grid)
    with pytest.raises(TypeError, match="ProcessGrid"):
        LatentParallelTrainer([LatentShard.from_sae(sae, 0, 10)], None)


def _one_process_run(tmp_path=None):
    grid = ProcessGrid(1, 1)
    shards = [LatentShard.from_sae(s, 0, s.n) for s in make_saes()]
    cfg = make_config(checkpoint_dir=str(tmp_path) if tmp_path else None, checkpoint_every=5 if tmp_path else None)
    trainer = LatentParallelTrainer(shards, grid, cfg, log=make_log())
    trainer.fit(data_stream(0, 1))
    return trainer, gather_saes(trainer.saes, grid)


def test_one_by_one_grid_equals_the_trainer():
    """The sharded forward (candidates, merge, owned decode) on one shard is the ordinary step."""
    trainer, saes = _one_process_run()
    reference = Trainer(make_saes(), make_config(), log=make_log())
    expected = final_tensors(reference.fit(data_stream(0, 1)))
    got = final_tensors(saes)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0, msg=name)
    assert [r["sae"][0]["dead"] for r in trainer.history] == [r["sae"][0]["dead"] for r in reference.history]
    assert any(r["sae"][0]["auxk"] > 0 for r in trainer.history)


def test_sharded_checkpoint_round_trip_and_resume_checks(tmp_path):
    trainer, saes = _one_process_run(tmp_path)
    final = sc.latest(tmp_path)
    assert [p.name for p in sc.list_complete(tmp_path)] == [final.name]  # older steps pruned
    got = final_tensors(sc.load_saes(final))
    for name, value in final_tensors(saes).items():
        assert torch.equal(got[name], value), name
    # resuming needs the grid it was written on
    meta = sc.read_meta(final)
    assert meta["grid"] == {"data": 1, "latent": 1} and meta["shards"] == [sc.shard_name(0, 1)]
    other = LatentParallelTrainer([LatentShard.from_sae(s, 0, s.n) for s in make_saes()], ProcessGrid(1, 1),
                                  make_config())
    bad = dict(meta, grid={"data": 2, "latent": 1})
    sc.atomic.write_json(final / "meta.json", bad)
    with pytest.raises(ValueError, match=r"written on a grid \{'data': 2, 'latent': 1\}"):
        other.load_checkpoint(final)
    with pytest.raises(ValueError, match="there is no shard 3"):
        sc.read_shard(final, 3)


def test_a_plain_trainer_checkpoint_is_not_taken_for_a_sharded_one(tmp_path):
    trainer = Trainer(make_saes(), make_config(steps=2, checkpoint_dir=str(tmp_path)), log=make_log())
    trainer.fit(data_stream(0, 1, 2))
    assert sc.latest(tmp_path) is None
    with pytest.raises(ValueError, match="not a sharded checkpoint manifest"):
        sc.read_meta(trainer.last_checkpoint)


def test_resuming_a_finished_run_keeps_its_checkpoint_complete(tmp_path, monkeypatch):
    """A finished run resumed re-saves its last step: that save is skipped, never a rewrite that would leave no
    complete checkpoint while it runs (here: a shard write that would fail is never reached)."""
    _one_process_run(tmp_path)
    final = sc.latest(tmp_path)
    before = (final / "meta.json").read_bytes()

    def no_write(*args, **kwargs):
        raise AssertionError("the committed step was rewritten")

    monkeypatch.setattr(sc, "save_shard", no_write)
    trainer = LatentParallelTrainer([LatentShard.from_sae(s, 0, s.n) for s in make_saes()], ProcessGrid(1, 1),
                                    make_config(checkpoint_dir=str(tmp_path), checkpoint_every=5), log=make_log())
    trainer.fit(data_stream(0, 1), resume=True)
    assert [p.name for p in sc.list_complete(tmp_path)] == [final.name]
    assert (final / "meta.json").read_bytes() == before


def test_a_failed_shard_write_raises_and_leaves_the_last_checkpoint(tmp_path, monkeypatch):
    _one_process_run(tmp_path)
    final = sc.latest(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(sc, "save_shard", disk_full)
    trainer = LatentParallelTrainer([LatentShard.from_sae(s, 0, s.n) for s in make_saes()], ProcessGrid(1, 1),
                                    make_config(checkpoint_dir=str(tmp_path / "other"), checkpoint_every=5),
                                    log=make_log())
    with pytest.raises(OSError, match="no space left"):
        trainer.fit(data_stream(0, 1))
    assert sc.latest(tmp_path) == final
