"""dlmscope.interp.features: the streaming top-N store against brute force on a stream far larger than the store,
windows, the report on the world models, and bad input."""
from __future__ import annotations

import json

import pytest
import torch

from dlmscope.demo import load_world_model
from dlmscope.interp.features import HIST_EDGES, activation_stats, collect, feature_report, logit_effects
from dlmscope.sae.topk import TopKSAE
from dlmscope.world import world_batches


def _stream(batches: int, B=4, T=24, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        acts = torch.randn(B, T, d, generator=gen)
        ids = torch.randint(10, 500, (B, T), generator=gen)
        keep = torch.ones(B, T, dtype=torch.bool)
        keep[:, 0] = False                                        # a special position: zeroed, never a window
        yield acts, ids, keep, None


@pytest.fixture(scope="module")
def small_sae():
    torch.manual_seed(0)
    return TopKSAE(16, 32, 4)


def test_streaming_store_equals_brute_force_on_a_long_stream(small_sae):
    sae, N = small_sae, 5
    stats = collect(sae, _stream(300), top_n=N, importance_n=3, random_n=16, window=3)
    # brute force over the same stream: every (latent, value) with value > 0 at a kept position
    vals, lats, fired = [], [], torch.zeros(sae.n, dtype=torch.long)
    for acts, ids, keep, _ in _stream(300):
        v, i = sae.encode(acts)
        v = v * keep[..., None]
        on = v > 0
        vals.append(v[on])
        lats.append(i[on])
    vals, lats = torch.cat(vals), torch.cat(lats)
    fired = torch.bincount(lats, minlength=sae.n)
    assert torch.equal(stats.fired, fired) and stats.positions == 300 * 4 * 23
    for f in range(sae.n):
        want = vals[lats == f].sort(descending=True).values[:N]
        got = stats.top.keys[f][: want.numel()]
        torch.testing.assert_close(got, want)
        for (toks, wvals, _, centre), key in zip(stats.top.entries(f), got):  # the centre carries the key
            assert 4 <= len(toks) <= 7 and wvals[centre] == pytest.approx(float(key), rel=2e-3)
    # memory stays bounded: the stores have their fixed shapes, whatever the stream length
    assert stats.top.tokens.shape == (sae.n, N, 7) and stats.importance.keys.shape == (sae.n, 6)
    assert stats.random_windows.shape == (16, 7)
    assert int(stats.histogram.sum()) == int(fired.sum()) and stats.histogram.shape[1] == len(HIST_EDGES) - 1
    torch.testing.assert_close(stats.max_act, torch.zeros(sae.n).scatter_reduce(0, lats, vals, "amax"))
    cached = activation_stats(sae, (a[k] for a, _, k, _ in _stream(300)))
    assert torch.equal(cached["fired"], fired) and torch.equal(cached["histogram"], stats.histogram)


def test_windows_hold_the_context_and_the_latents_activation(small_sae):
    sae = small_sae
    acts = torch.zeros(1, 9, 16)
    acts[0, 1] = sae.W_dec[7].detach() * 5 + sae.b_dec.detach()   # latent 7 fires strongly at position 1 only
    ids = torch.arange(100, 109)[None]
    stats = collect(sae, [(acts, ids, torch.ones(1, 9, dtype=torch.bool), None)], top_n=2, window=3)
    toks, vals, hidden, centre = stats.top.entries(7)[0]
    assert toks == [100, 101, 102, 103, 104] and centre == 1 and hidden == -1     # clipped at the row start
    assert vals[centre] == pytest.approx(float(stats.top.keys[7, 0]), rel=1e-2) and vals[centre] > 1


def test_feature_report_on_the_world_dlm_and_ar(dlm):
    torch.manual_seed(1)
    sae = TopKSAE(dlm.d_model, 64, 4)
    _, held = world_batches(dlm.tokenizer, 4000, 64, 16, 0)
    r = feature_report(dlm, sae, 2, held[:3], sample=5, top_n=4, importance_n=2, masked_t=0.3, min_fired=1)
    assert r["is_diffusion"] and len(r["latents"]) == 5 and r["tokens_seen"] > 0 and len(r["random_windows"]) > 10
    entry = next(iter(r["latents"].values()))
    assert len(entry["top"]) <= 4 and len(entry["importance"]) <= 2 and "masked" in entry
    for w in entry["top"]:
        assert len(w["tokens"]) == len(w["values"]) and 0 <= w["centre"] < len(w["tokens"])
        assert "[BOS]" != w["tokens"][w["centre"]]                     # special positions never centre a window
    for w in entry["masked"]["top"]:
        assert w["tokens"][w["centre"]] == "[MASK]" and "hidden" in w
    f = entry["latent"]
    manual = torch.nn.functional.normalize(sae.W_dec[f].detach(), dim=0) @ dlm.model.get_output_embeddings().weight.T
    assert entry["logits"]["promoted"][0][0] == dlm.tokenizer.convert_ids_to_tokens(int(manual.argmax()))
    alone = logit_effects(dlm, sae, [f])[f]
    assert [t for t, _ in alone["promoted"]] == [t for t, _ in entry["logits"]["promoted"]]
    assert [v for _, v in alone["suppressed"]] == pytest.approx([v for _, v in entry["logits"]["suppressed"]], rel=1e-5)
    json.dumps(r)
    ar = load_world_model("ar")
    r_ar = feature_report(ar, sae, 2, held[:2], latents=[3, 5], top_n=2, importance_n=1, masked_t=0.3)
    assert not r_ar["is_diffusion"] and sorted(r_ar["latents"]) == ["3", "5"]
    assert "masked" not in r_ar["latents"]["3"]


def test_bad_input(dlm):
    _, held = world_batches(dlm.tokenizer, 2000, 64, 16, 0)
    with pytest.raises(ValueError, match="out of range"):
        feature_report(dlm, TopKSAE(dlm.d_model, 16, 2), 1, held[:1], latents=[16])
    with pytest.raises(ValueError, match="hidden size"):
        feature_report(dlm, TopKSAE(dlm.d_model + 2, 16, 2), 1, held[:1])
    with pytest.raises(ValueError, match="layer"):
        feature_report(dlm, TopKSAE(dlm.d_model, 16, 2), dlm.num_layers, held[:1])


def test_activation_stats_reads_an_activation_cache(dlm, tmp_path):
    from dlmscope.data.activations import ActivationStream

    torch.manual_seed(2)
    sae = TopKSAE(dlm.d_model, 32, 4)
    _, held = world_batches(dlm.tokenizer, 2000, 64, 16, 0)
    stream = ActivationStream(dlm, held[:2], [2], "clean", batch_size=256, buffer_tokens=1024,
                              cache_dir=tmp_path / "cache")
    live = activation_stats(sae, stream.for_layer(2))                          # the first pass writes the cache
    assert (tmp_path / "cache" / "index.json").exists()
    cached = activation_stats(sae, stream.for_layer(2))                        # later passes read it
    assert torch.equal(live["fired"], cached["fired"]) and live["positions"] == cached["positions"] > 0
