"""The statistics pass of :mod:`dlmscope.interp.features` (vectorised top-N / importance stores, one merge per batch)
against a plain loop (a heap per latent, a window built for every firing), on the same precomputed
activations of the world DLM (pytest-benchmark; the plain loop: baselines.plain_feature_stats).

Both keep, per latent, the 12 top windows of ±10 tokens and the firing counts; the plain loop keeps no
importance samples or histogram, so it does less. Throughput = firings (latent activations > 0) per second;
the ratio of the medians is the speed-up, in the same run. DLMSCOPE_INTERP_BATCHES sets the size (default 8
batches of 32 × 64 tokens; n = 512, k = 8 at block 4).
"""
from __future__ import annotations

import os

import pytest
import torch

import baselines
from dlmscope.demo import load_world_model
from dlmscope.interp.features import collect, model_batches
from dlmscope.sae.topk import TopKSAE
from dlmscope.world import LM_BATCH, SEQ_LEN, world_batches

BATCHES = int(os.environ.get("DLMSCOPE_INTERP_BATCHES", "8"))
TOP, HALF = 12, 10


@pytest.fixture(scope="module")
def setup():
    dlm = load_world_model("dlm")
    torch.manual_seed(0)
    sae = TopKSAE(dlm.d_model, 512, 8)
    _, held = world_batches(dlm.tokenizer, 40_000, SEQ_LEN, LM_BATCH, 0)
    batches = list(model_batches(dlm, 4, held[:BATCHES]))                 # the model forward is not timed
    with torch.no_grad():
        firings = sum(int(((sae.encode(h)[0] > 0) & k[..., None]).sum()) for h, _, k, _ in batches)
    return sae, batches, firings


@pytest.mark.parametrize("impl", ["dlmscope", "plain_loop"])
def test_interp_statistics_pass(benchmark, setup, impl):
    sae, batches, firings = setup
    benchmark.group = f"interp statistics world-dlm block 4 batches={len(batches)} firings={firings}"
    benchmark.extra_info.update(impl=impl, firings=firings)
    if impl == "dlmscope":
        run = lambda: collect(sae, batches, top_n=TOP, importance_n=7, window=HALF)  # noqa: E731
    else:
        run = lambda: baselines.plain_feature_stats(sae, batches, TOP, HALF)  # noqa: E731
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
