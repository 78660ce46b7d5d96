"""The statistics pass of :mod:`dlmscope.interp.features` (vectorised top-N / importance stores, one merge per batch)
against a plain loop (a heap per latent, a window built for every firing), on the same precomputed
activations of the world DLM (pytest-benchmark).

Both keep, per latent, the 12 top windows of ±10 tokens and the firing counts; the plain loop keeps no
importance samples or histogram, so it does less. Throughput = firings (latent activations > 0) per second;
the ratio of the medians is the speed-up, in the same run. DLMSCOPE_INTERP_BATCHES sets the size (default 8
batches of 32 × 64 tokens; n = 512, k = 8 at block 4).
"""
from __future__ import annotations

import heapq
import os

import pytest
import torch

from dlmscope.demo import load_world_model
from dlmscope.interp.features import collect, model_batches
from dlmscope.sae.topk import TopKSAE
from dlmscope.data.text import world_batches

BATCHES = int(os.environ.get("DLMSCOPE_INTERP_BATCHES", "8"))
TOP, HALF = 12, 10


@pytest.fixture(scope="module")
def setup():
    dlm = load_world_model("dlm")
    torch.manual_seed(0)
    sae = TopKSAE(dlm.d_model, 512, 8)
    _, held = world_batches(dlm.tokenizer, 40_000, 64, 32, 0)
    batches = list(model_batches(dlm, 4, held[:BATCHES]))                 # the model forward is not timed
    with torch.no_grad():
        firings = sum(int(((sae.encode(h)[0] > 0) & k[..., None]).sum()) for h, _, k, _ in batches)
    return sae, batches, firings


def _plain(sae, batches):
    heaps = [[] for _ in range(sae.n)]
    fired = [0] * sae.n
    counter = 0
    for acts, ids, keep, _ in batches:
        with torch.no_grad():
            values, indices = sae.encode(acts)
        values, indices, ids_l = values.tolist(), indices.tolist(), ids.tolist()
        keep_l = keep.tolist()
        for b, row in enumerate(values):
            for t, (vals, lats) in enumerate(zip(row, indices[b])):
                if not keep_l[b][t]:
                    continue
                for v, f in zip(vals, lats):
                    if v <= 0:
                        continue
                    fired[f] += 1
                    counter += 1
                    window = ids_l[b][max(0, t - HALF):t + HALF + 1]
                    item = (v, counter, window)
                    if len(heaps[f]) < TOP:
                        heapq.heappush(heaps[f], item)
                    elif v > heaps[f][0][0]:
                        heapq.heapreplace(heaps[f], item)
    return heaps, fired


@pytest.mark.parametrize("impl", ["dlmscope", "plain_loop"])
def test_interp_statistics_pass(benchmark, setup, impl):
    sae, batches, firings = setup
    benchmark.group = f"interp statistics world-dlm block 4 batches={len(batches)} firings={firings}"
    benchmark.extra_info.update(impl=impl, firings=firings)
    if impl == "dlmscope":
        run = lambda: collect(sae, batches, top_n=TOP, importance_n=7, window=HALF)  # noqa: E731
    else:
        run = lambda: _plain(sae, batches)  # noqa: E731
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
