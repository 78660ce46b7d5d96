"""Replay of a decoding history through SAEs at several layers: :func:`dlmscope.analysis.order.replay` (every recorded
state of every row batched, one truncated forward per batch for all layers) against the plain way, one forward
per (step, layer) — the paper's replay runs a full forward per step and hooks each layer.

Variants: ``batched`` (``replay``), ``per_step`` (one truncated forward per state, all layers hooked),
``per_step_layer`` (one truncated forward per state and layer). Each round replays the same history: the world
DLM filling DLMSCOPE_ORDER_TASKS (default 8) three-step chains (5 answers) in 5 steps, SAEs (n = 512,
k = 8) at blocks 2, 4 and 6. The ratio to ``batched`` is the speed-up, measured in the same run. The per-step
variants: baselines.per_step_replay.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import baselines
from dlmscope.demo import load_world_model
from dlmscope.analysis.order import replay
from dlmscope.sae.topk import TopKSAE
from dlmscope.models.sampling import llada_fill
from dlmscope.world import ASSETS_DIR
from dlmscope.world.tasks import load_tasks

TASKS = int(os.environ.get("DLMSCOPE_ORDER_TASKS", "8"))
LAYERS = (2, 4, 6)


@pytest.fixture(scope="module")
def setup():
    dlm = load_world_model("dlm")
    tasks, _ = load_tasks(Path(ASSETS_DIR) / "tasks.jsonl")
    chains = [t for t in tasks if t.kind == "chain3"][:TASKS]
    canvas = [t.encode(dlm.tokenizer)[0] for t in chains]
    gen = llada_fill(dlm, canvas, steps=5, history=True)
    torch.manual_seed(0)
    saes = {L: TopKSAE(dlm.d_model, 512, 8) for L in LAYERS}
    return dlm, gen, saes


@pytest.mark.parametrize("mode", ["batched", "per_step", "per_step_layer"])
def test_replay(benchmark, setup, mode):
    dlm, gen, saes = setup
    S1, B, _ = gen.history.shape
    benchmark.group = f"replay world-dlm states={S1} rows={B} layers={len(LAYERS)}"
    benchmark.extra_info.update(mode=mode, states=S1, rows=B, layers=len(LAYERS))
    if mode == "batched":
        run = lambda: replay(dlm, gen, saes, top_k=8)  # noqa: E731   (the default: 64 rows per forward)
    else:
        run = lambda: baselines.per_step_replay(dlm, gen, saes, per_layer=mode == "per_step_layer")  # noqa: E731
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
