"""One harvest-and-train path (dlmscope.jobs.train): what the CLI, the demo and the benchmark share."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from dlmscope.data.activations import ActivationStream
from dlmscope.jobs.train import SweepSpec, heldout_activations, make_saes, train_sweep
from dlmscope.train.trainer import TrainConfig, Trainer
from dlmscope.train.log import LogConfig

from tests.helpers.tiny_models import make_llada, single_thread  # noqa: F401  (single_thread is autouse)

QUIET = LogConfig(log_every=0, progress=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    adapter = make_llada(tmp_path_factory.mktemp("llada"))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, 49, (8, 12), generator=gen) for _ in range(60)]
    spec = SweepSpec(layers=(0, 2), ks=(2, 4), n_latents=48, policy="mask", tokens=640, batch_size=64,
                     buffer_tokens=256, seed=5)
    return adapter, batches, spec


def _same(a, b) -> bool:
    return all(torch.equal(getattr(a, p), getattr(b, p)) for p in ("W_enc", "b_enc", "W_dec", "b_dec"))


def test_cached_sweep_equals_training_each_layer_from_its_own_harvest(setup, tmp_path):
    adapter, batches, spec = setup
    train = TrainConfig(warmup_steps=2, norm_batches=2)
    got = train_sweep(adapter, batches, spec, train, cache_dir=tmp_path / "cache", log=QUIET)
    assert sorted(got) == [0, 2] and [s.k for s in got[0]] == [2, 4]
    for layer in spec.layers:  # by hand: a live single-layer stream per layer, the same seeds
        stream = ActivationStream(adapter, batches, [layer], "mask", batch_size=64, buffer_tokens=256, seed=5,
                                  max_tokens=640, dtype=torch.float32)
        saes = make_saes(adapter.d_model, spec, layer)
        Trainer(saes, dataclasses.replace(train, total_tokens=640, seed=5), log=QUIET).fit(stream.for_layer(layer))
        assert all(_same(a, b) for a, b in zip(got[layer], saes))
        assert all(s.cfg.meta["trained_tokens"] == 640 and s.cfg.meta["layer"] == layer for s in got[layer])


def test_init_depends_only_on_seed_and_layer(setup):
    adapter, _, spec = setup
    a = make_saes(adapter.d_model, spec, 2)
    b = make_saes(adapter.d_model, dataclasses.replace(spec, layers=(2,)), 2)
    assert all(_same(x, y) for x, y in zip(a, b))
    c = make_saes(adapter.d_model, spec, 0)
    assert not torch.equal(a[0].W_dec, c[0].W_dec)


def test_checkpoints_per_layer_and_exact_resume(setup, tmp_path):
    adapter, batches, spec = setup
    spec = dataclasses.replace(spec, layers=(1,))
    train = TrainConfig(warmup_steps=2, norm_batches=2, checkpoint_every=3)
    first = train_sweep(adapter, batches, spec, train, checkpoint_root=tmp_path, log=QUIET)
    assert (tmp_path / "layer_1" / "checkpoints").is_dir()
    again = train_sweep(adapter, batches, spec, train, checkpoint_root=tmp_path, resume=True, log=QUIET)
    assert all(_same(a, b) for a, b in zip(first[1], again[1]))


def test_heldout_is_a_different_corruption_of_the_same_policy(setup):
    adapter, batches, spec = setup
    held = heldout_activations(adapter, batches, spec, tokens=300)
    assert sorted(held) == [0, 2] and held[0].shape == (300, adapter.d_model) and held[0].dtype == torch.float32
    train_rows = next(iter(ActivationStream(adapter, batches, [0], "mask", batch_size=300, buffer_tokens=300,
                                            seed=5, max_tokens=300, drop_last=False)))[0]
    assert not torch.equal(torch.sort(held[0], 0).values, torch.sort(train_rows, 0).values)


def test_bad_specs_name_the_problem(setup):
    adapter, batches, spec = setup
    with pytest.raises(ValueError, match="cache_dir"):
        train_sweep(adapter, batches, spec, log=QUIET)
    with pytest.raises(ValueError, match="leave TrainConfig.steps"):
        train_sweep(adapter, batches, spec, TrainConfig(steps=3), cache_dir="unused", log=QUIET)
    with pytest.raises(ValueError, match="every k must lie in"):
        SweepSpec(layers=(0,), ks=(64,), n_latents=48)
    with pytest.raises(ValueError, match="unknown mask policy"):
        SweepSpec(layers=(0,), ks=(2,), n_latents=48, policy="masked")
    with pytest.raises(ValueError, match="layer"):
        train_sweep(adapter, batches, dataclasses.replace(spec, layers=(7,)), log=QUIET)
