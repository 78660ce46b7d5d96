"""Training throughput of the paper's k sweep: six Top-K SAEs on one activation stream.

Variants, timed in one run on the same batches:
  grouped   dlmscope Trainer, the six encoders as one grouped op (group_encoders=True)
  separate  dlmscope Trainer, one encoder op per SAE (group_encoders=False)
  dense     the same sweep in plain PyTorch as the paper's code does it: per SAE a dense Top-K step
            (B×n pre-activations, scatter + dense decode), gradient projection, clipping, Adam, renormalise
Each timed round trains ``STEPS`` steps; tokens/s = STEPS·B / median round time. ``report.py sweep`` turns the
pytest-benchmark JSON into ratios (grouped vs dense, grouped vs separate). The dense sweep: baselines.DenseSweep.

Shape: d=512, n=16384, ks = 50, 80, 160, 320, 520, 820, B=2048 (the paper's SAE batch), fp32, CPU.
Quick smoke test: DLMSCOPE_BENCH_QUICK=1 (d=64, n=1024, ks scaled down).
"""
from __future__ import annotations

import os

import pytest
import torch

import baselines
import dlmscope
from dlmscope.sae.topk import TopKSAE
from dlmscope.train.trainer import LogConfig, Trainer, TrainConfig

QUICK = os.environ.get("DLMSCOPE_BENCH_QUICK") == "1"
D, N, B = (64, 1024, 256) if QUICK else (512, 16384, 2048)
KS = [4, 6, 8, 16, 24, 40] if QUICK else [50, 80, 160, 320, 520, 820]
STEPS = int(os.environ.get("DLMSCOPE_SWEEP_STEPS", "3"))


def _batches(count: int, seed: int = 7) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(D, generator=g) * 2 + 0.25
    return [torch.randn(B, D, generator=g) * scale + 0.5 for _ in range(count)]


def _saes() -> list[TopKSAE]:
    return [TopKSAE(D, N, k, generator=torch.Generator().manual_seed(i)) for i, k in enumerate(KS)]


def _trainer_round(group: bool):
    batches = _batches(STEPS)
    cfg = TrainConfig(steps=STEPS, warmup_steps=1, norm_batches=1, group_encoders=group, seed=0)
    log = LogConfig(progress=False, log_every=0)

    def setup():
        return (Trainer(_saes(), cfg, log=log), batches), {}

    def run(trainer, stream):
        trainer.fit(stream)

    return setup, run


def _dense_round():
    batches = _batches(STEPS)

    def setup():
        return (baselines.DenseSweep(_saes(), lr=3e-4, grad_clip=1.0), batches), {}

    def run(sweep, stream):
        sweep.fit(stream)

    return setup, run


VARIANTS = {"grouped": lambda: _trainer_round(True), "separate": lambda: _trainer_round(False),
            "dense": _dense_round}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sweep_throughput(benchmark, variant):
    benchmark.group = f"sweep d={D} n={N} B={B} ks={KS}"
    benchmark.extra_info.update(variant=variant, tokens_per_round=STEPS * B, steps=STEPS, d=D, n=N, B=B, ks=KS,
                                backends=dlmscope.available_backends())
    setup, run = VARIANTS[variant]()
    torch.manual_seed(0)
    benchmark.pedantic(run, setup=setup, rounds=int(os.environ.get("DLMSCOPE_SWEEP_ROUNDS", "2")),
                       warmup_rounds=1)
