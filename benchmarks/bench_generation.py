"""Generation throughput on the embedded DLM: LLaDA's sampler batched vs one prompt at a time, with and
without the steering hook (pytest-benchmark).

Variants: ``batched`` (all prompts in one canvas) and ``single`` (a loop over prompts), each ``plain`` or
``steered`` (``dlmscope.analysis.steering.steer`` at block 4, the SAE encode in the hook at every step). tokens/s =
prompts · gen_length / median round time; the hook's overhead is the steered / plain time ratio in the same run.
DLMSCOPE_SAMPLING_PROMPTS / _GEN set the size (default 16 prompts, 16 tokens, 16 steps, 2 blocks).
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

from dlmscope.demo import load_world_model
from dlmscope.sae.topk import TopKSAE
from dlmscope.models.sampling import llada_generate
from dlmscope.analysis.steering import steer
from dlmscope.world import corpus as C

PROMPTS = int(os.environ.get("DLMSCOPE_SAMPLING_PROMPTS", "16"))
GEN = int(os.environ.get("DLMSCOPE_SAMPLING_GEN", "16"))
LAYER = 4


@pytest.fixture(scope="module")
def setup():
    dlm = load_world_model("dlm")
    tok = dlm.tokenizer
    tasks = [t for t in C.decoding_tasks(7 * PROMPTS, seed=2) if t.kind == "neutral"][:PROMPTS]
    prompts = [[tok.bos_token_id] + tok.convert_tokens_to_ids(list(t.words[:t.answer_positions[0]])) for t in tasks]
    torch.manual_seed(0)
    sae = TopKSAE(dlm.d_model, 4096, 32)
    return dlm, prompts, sae


@pytest.mark.parametrize("hook", ["plain", "steered"])
@pytest.mark.parametrize("mode", ["batched", "single"])
def test_sampling_throughput(benchmark, setup, mode, hook):
    dlm, prompts, sae = setup
    benchmark.group = f"llada_generate world-dlm prompts={len(prompts)} gen={GEN} steps={GEN} blocks=2"
    benchmark.extra_info.update(mode=mode, hook=hook, tokens=len(prompts) * GEN, sae_n=sae.n, sae_k=sae.k)
    kw = dict(gen_length=GEN, steps=GEN, block_length=GEN // 2)

    def run():
        ctx = steer(dlm, LAYER, sae, [1, 2], 2.0) if hook == "steered" else contextlib.nullcontext()
        with ctx:
            if mode == "batched":
                llada_generate(dlm, prompts, **kw)
            else:
                for p in prompts:
                    llada_generate(dlm, [p], **kw)

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
