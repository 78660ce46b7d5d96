"""End-to-end harvest + train throughput on the embedded DLM: dlmscope vs plain PyTorch (pytest-benchmark).

Variants (harvest_train.py and baselines.run_plain; ``report.py pipeline`` runs the same pipelines once at full size
and writes the table of docs/benchmarks.md):
  dlmscope           ActivationStream (one truncated forward for both layers, disk cache) → Trainer per layer
  plain              the paper's way: per layer a full forward with a hook, dense plain-PyTorch Top-K training
  plain_one_forward  plain, but one full forward with hooks on both layers feeds both layers' SAEs
Each round harvests layers 1 and 3 of the embedded LLaDA-format DLM (mask policy) and trains k = 8, 16, 32
(n=1024, B=1024) per layer on ``TOKENS`` kept tokens per layer; tokens/s = TOKENS·layers / median round time.

Small by default (8 batches per layer, a few seconds per round); DLMSCOPE_PIPELINE_TOKENS sets the kept tokens per
layer (a multiple of 1024), DLMSCOPE_PIPELINE_ROUNDS the rounds; DLMSCOPE_BENCH_QUICK=1 uses 2 batches.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

import pytest

import dlmscope
import harvest_train as P

QUICK = os.environ.get("DLMSCOPE_BENCH_QUICK") == "1"
TOKENS = int(os.environ.get("DLMSCOPE_PIPELINE_TOKENS", str((2 if QUICK else 8) * 1024)))
ROUNDS = int(os.environ.get("DLMSCOPE_PIPELINE_ROUNDS", "2"))


@pytest.fixture(scope="module")
def pipeline_data():
    s = dataclasses.replace(P.Settings(), tokens=TOKENS, sentences=max(20_000, TOKENS // 2))
    s.check()
    adapter = P.load_adapter()
    return adapter, P.token_batches(adapter, s), s


@pytest.mark.parametrize("variant", P.VARIANTS)
def test_pipeline_throughput(benchmark, pipeline_data, variant):
    adapter, batches, s = pipeline_data
    benchmark.group = f"pipeline world-dlm layers={list(s.layers)} n={s.n} ks={list(s.ks)} B={s.batch_size}"
    benchmark.extra_info.update(variant=variant, tokens_per_round=s.tokens * len(s.layers),
                                tokens_per_layer=s.tokens, layers=list(s.layers), n=s.n, ks=list(s.ks),
                                B=s.batch_size, backends=dlmscope.available_backends())
    workdirs = []

    def setup():  # fresh SAEs and an empty cache dir every round: each round harvests from the model
        workdirs.append(tempfile.mkdtemp(prefix=f"dlmscope-bench-pipeline-{variant}-"))
        return (adapter, batches, s, P.make_saes(adapter, s), workdirs[-1]), {}

    try:
        benchmark.pedantic(P.RUNNERS[variant], setup=setup, rounds=ROUNDS, warmup_rounds=1)
    finally:
        for path in workdirs:
            shutil.rmtree(path, ignore_errors=True)
