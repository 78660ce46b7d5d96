"""Harvesting: mask policies, truncated forward, shuffle buffer, disk cache, bad inputs.

Tiny random models (tests/helpers/tiny_models.py) are written in the LLaDA / Dream / AR checkpoint formats and
loaded through the real ``dlmscope.models.load``.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from dlmscope.data.cache import CachedActivationStream, load_cache_index
from dlmscope.data.activations import ActivationStream, harvest
from dlmscope.data.noise import corrupt
from dlmscope.data.shuffle import shuffle_batches

from tests.helpers.tiny_models import (  # noqa: F401  (fixtures: single_thread is autouse; llada, ar are module-scoped)
    D, LAYERS, MASK, ar, llada, single_thread, token_batch,
)


# -------------------------------------------------------------------------------------------- policies
def test_corrupt_never_masks_position0_or_pad():
    ids, am = token_batch(batch=4, seq=40)
    g = torch.Generator().manual_seed(0)
    noisy, masked = corrupt(ids, am, MASK, 0.99, g)
    assert not masked[:, 0].any()
    assert not masked[am == 0].any()
    assert (noisy[masked] == MASK).all() and torch.equal(noisy[~masked], ids[~masked])
    assert masked[am.bool()].float().mean() > 0.8  # t = 0.99: almost every eligible position masked


def _positions_of(llada, ids, am, policy, seed=0):
    """Run harvest and identify, from the kept rows, which (b, i) positions they came from."""
    g = torch.Generator().manual_seed(seed)
    out, info = harvest(llada, ids, [0, 1], policy, attention_mask=am, generator=g, return_info=True)
    full = llada.forward_until(info["noisy_ids"], [0, 1], attention_mask=am)
    return out, info, full


@pytest.mark.parametrize("policy", ["mask", "unmask", "all", "clean"])
def test_policies_keep_the_right_positions(llada, policy):
    ids, am = token_batch(batch=3, seq=16)
    out, info, full = _positions_of(llada, ids, am, policy)
    valid = am.bool()
    masked = info["masked"]
    if policy == "clean":
        assert masked is None and info["t"] == 0.0 and torch.equal(info["noisy_ids"], ids)
        expect = valid
    else:
        assert 0.05 <= info["t"] <= 0.5
        assert not masked[:, 0].any() and not masked[~valid].any()
        assert masked.any()
        expect = {"mask": valid & masked, "unmask": valid & ~masked, "all": valid}[policy]
    assert torch.equal(info["keep"], expect)
    if policy == "unmask":
        assert expect[:, 0].all()  # position 0 is kept by the unmask policy
    if policy == "mask":
        assert (info["noisy_ids"][expect] == MASK).all()
    assert not info["keep"][~valid].any()  # pad never kept
    for layer in (0, 1):
        assert out[layer].shape == (int(expect.sum()), D)
        torch.testing.assert_close(out[layer], full[layer][expect], rtol=0, atol=0)


def test_truncation_runs_only_up_to_deepest_layer(llada):
    ran = []
    handles = [blk.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, blk in enumerate(llada.blocks)]
    handles.append(llada.model.model.norm.register_forward_hook(lambda *a: ran.append("norm")))
    handles.append(llada.model.lm_head.register_forward_hook(lambda *a: ran.append("head")))
    try:
        ids, am = token_batch()
        out = harvest(llada, ids, [1, 0], "all", attention_mask=am, generator=torch.Generator().manual_seed(0))
    finally:
        for h in handles:
            h.remove()
    assert sorted(out) == [0, 1]
    assert ran == [0, 1]  # block 2, the final norm and the LM head never ran


def test_bad_inputs(llada, ar):
    ids, am = token_batch()
    with pytest.raises(ValueError, match="unknown mask policy 'maks'.*did you mean 'mask'"):
        ActivationStream(llada, [ids], [0], "maks")
    with pytest.raises(ValueError, match="out of range"):
        ActivationStream(llada, [ids], [0, LAYERS], "mask")
    with pytest.raises(ValueError, match="out of range"):
        harvest(llada, ids, [-1], "mask")
    with pytest.raises(ValueError, match="no mask token|autoregressive"):
        ActivationStream(ar, [ids], [0], "unmask")
    with pytest.raises(ValueError, match="no mask token|autoregressive"):
        harvest(ar, ids, [0], "all")
    with pytest.raises(ValueError, match="t_min"):
        ActivationStream(llada, [ids], [0], "mask", t_min=0.6, t_max=0.5)
    with pytest.raises(ValueError, match="buffer_tokens"):
        ActivationStream(llada, [ids], [0], "mask", batch_size=8, buffer_tokens=4)
    with pytest.raises(ValueError, match="not hooked"):
        ActivationStream(llada, [ids], [0], "mask").for_layer(1)
    with pytest.raises(ValueError, match="token batches"):
        list(ActivationStream(llada, ["text"], [0], "clean", batch_size=4, buffer_tokens=8))
    # the AR baseline harvests with the clean policy
    out = harvest(ar, ids, [1], "clean", attention_mask=am)
    assert out[1].shape == (int(am.sum()), D)


# --------------------------------------------------------------------------------------- shuffle buffer
def _numbered_chunks(sizes, layers=(0, 3)):
    """Chunks whose rows carry their global index (layer L row = index * 10 + L) in every column."""
    start = 0
    for m in sizes:
        idx = torch.arange(start, start + m, dtype=torch.float32)
        yield {L: (idx * 10 + L).unsqueeze(1).repeat(1, 4) for L in layers}
        start += m


@pytest.mark.parametrize("batch, buffer", [(16, 16), (16, 17), (16, 31), (16, 32)])
def test_shuffle_buffer_terminates_for_any_buffer_of_at_least_one_batch(batch, buffer):
    """A buffer of exactly one batch (the smallest allowed) still yields: every row once, then it stops."""
    batches = list(shuffle_batches(_numbered_chunks([7, 30, 13, 50]), batch, buffer, seed=1, drop_last=False))
    seen = sorted((torch.cat([b[0][:, 0] for b in batches]) / 10).round().long().tolist())
    assert seen == list(range(100))
    assert all(b[0].shape[0] == batch for b in batches[:-1])


@pytest.mark.parametrize("drop_last", [True, False])
def test_shuffle_buffer_exact_batches_every_token_once(drop_last):
    sizes = [7, 30, 1, 0, 13, 50, 9]  # 110 tokens
    batches = list(shuffle_batches(_numbered_chunks(sizes), 16, 40, seed=3, drop_last=drop_last))
    n_full = 110 // 16
    assert all(b[0].shape == (16, 4) for b in batches[:n_full])
    assert len(batches) == n_full + (0 if drop_last else 1)
    if not drop_last:
        assert batches[-1][0].shape == (110 - 16 * n_full, 4)
    ids0 = torch.cat([b[0][:, 0] for b in batches]) / 10
    ids3 = (torch.cat([b[3][:, 0] for b in batches]) - 3) / 10
    assert torch.equal(ids0, ids3)  # the layers stay aligned (one permutation)
    seen = sorted(ids0.round().long().tolist())
    if drop_last:
        assert len(set(seen)) == len(seen) == 16 * n_full
    else:
        assert seen == list(range(110))
    assert ids0.tolist() != sorted(ids0.tolist())  # actually shuffled
    # the output depends only on the row sequence, not on the chunking, and is seeded
    again = list(shuffle_batches(_numbered_chunks([110]), 16, 40, seed=3, drop_last=drop_last))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    other = list(shuffle_batches(_numbered_chunks(sizes), 16, 40, seed=4, drop_last=drop_last))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(batches, other))


def test_stream_epoch_and_trainer_view(llada):
    data = [token_batch(seed=s, batch=4, seq=16) for s in range(4)]
    total = sum(int(am.sum()) for _, am in data)
    stream = ActivationStream(llada, data, [0, 2], "clean", batch_size=8, buffer_tokens=32, seed=0, drop_last=False)
    batches = list(stream)
    assert sum(b[0].shape[0] for b in batches) == total
    assert all(b[2].shape == (8, D) for b in batches[:-1])
    # every token exactly once: compare with the unshuffled harvest as sets of rows
    rows = torch.cat([b[0] for b in batches])
    ref = torch.cat([llada.forward_until(ids, [0], attention_mask=am)[0][am.bool()] for ids, am in data])
    key = lambda t: sorted(map(tuple, t.round(decimals=4).tolist()))  # noqa: E731
    assert key(rows) == key(ref)
    # one layer as a [B, d] stream; replaying is deterministic
    view = list(stream.for_layer(2))
    assert all(torch.equal(a, b[2]) for a, b in zip(view, batches))
    assert len(view) == len(batches)


def test_stream_max_tokens_and_mask_policy(llada):
    data = [token_batch(seed=s, batch=4, seq=16) for s in range(3)]
    stream = ActivationStream(llada, data, [1], "mask", batch_size=4, buffer_tokens=16, seed=5, max_tokens=10,
                              drop_last=False)
    assert sum(b[1].shape[0] for b in stream) == 10


# ------------------------------------------------------------------------------------------- disk cache
def test_cache_round_trip_equals_live_stream(llada, tmp_path, monkeypatch):
    data = [token_batch(seed=s, batch=3, seq=16) for s in range(4)]
    kw = dict(batch_size=8, buffer_tokens=24, seed=11)
    live = list(ActivationStream(llada, data, [0, 2], "unmask", **kw))
    cache = tmp_path / "cache"
    cached_run = ActivationStream(llada, data, [0, 2], "unmask", cache_dir=cache, shard_tokens=10, **kw)
    first = list(cached_run)  # harvests and writes the cache
    index = load_cache_index(cache)
    assert index["layers"] == [0, 2] and index["d"] == D and index["meta"]["policy"] == "unmask"
    assert len(index["shards"]) > 1 and all(s["tokens"] <= 10 for s in index["shards"])
    assert not [f for f in os.listdir(cache) if ".tmp" in f]
    # a second run needs no model: reading the cache replays the live stream exactly
    monkeypatch.setattr(llada, "forward_until", lambda *a, **k: pytest.fail("model ran despite the cache"))
    second = list(cached_run)
    from_disk = ActivationStream.from_cache(cache, **kw)
    assert isinstance(from_disk, CachedActivationStream)
    replay = list(from_disk)
    assert len(live) == len(first) == len(second) == len(replay) == len(from_disk)
    for a, b, c, e in zip(live, first, second, replay):
        for L in (0, 2):
            assert torch.equal(a[L], b[L]) and torch.equal(a[L], c[L]) and torch.equal(a[L], e[L])
    layer_view = list(from_disk.for_layer(2))
    assert len(layer_view) == len(from_disk)
    assert all(torch.equal(x, b[2]) for x, b in zip(layer_view, live))
    with pytest.raises(ValueError, match="layers"):
        ActivationStream.from_cache(cache, layers=[1], **kw)
    with pytest.raises(ValueError, match="policy"):
        list(ActivationStream(llada, data, [0], "mask", cache_dir=cache, **kw))
    with pytest.raises(ValueError, match="seed"):
        list(ActivationStream(llada, data, [0], "unmask", cache_dir=cache, **(kw | {"seed": 12})))


def test_incomplete_cache_is_rebuilt(llada, tmp_path):
    data = [token_batch(seed=s, batch=3, seq=16) for s in range(2)]
    cache = tmp_path / "c"
    stream = ActivationStream(llada, data, [1], "all", batch_size=4, buffer_tokens=8, cache_dir=cache)
    it = iter(stream)
    next(it)  # interrupted after one batch: no index
    del it
    with pytest.raises(FileNotFoundError, match="no complete activation cache"):
        load_cache_index(cache)
    built = stream.build_cache()
    assert built.total_tokens == sum(int(am.sum()) for _, am in data)
    assert json.loads((cache / "index.json").read_text())["total_tokens"] == built.total_tokens


def test_stream_feeds_the_trainer(llada, tmp_path):
    """One harvest (cached) feeds one Trainer per layer; a cached stream knows its length."""
    from dlmscope.sae.topk import TopKSAE
    from dlmscope.train.trainer import TrainConfig, Trainer
    from dlmscope.train.log import LogConfig

    data = [token_batch(seed=s, batch=4, seq=16) for s in range(3)]
    stream = ActivationStream(llada, data, [0, 2], "mask", batch_size=8, buffer_tokens=32, cache_dir=tmp_path / "c")
    cached = stream.build_cache()
    for layer in (0, 2):
        sae = TopKSAE(D, 16, 4, generator=torch.Generator().manual_seed(layer))
        cfg = TrainConfig(warmup_steps=1, norm_batches=1, seed=0)
        Trainer([sae], cfg, log=LogConfig(log_every=0, progress=False)).fit(cached.for_layer(layer))  # steps = len(stream)
        assert sae.cfg.meta["trained_steps"] == len(cached) > 0
