"""Subprocess entry for the distributed-harvest test (not a test module itself).

    python -m torch.distributed.run --nproc-per-node 2 -m tests.helpers.harvest_worker --model DIR --out final.safetensors

Each rank harvests its round-robin slice of :func:`token_batches` (21 LM batches: rank 0 gets 11, rank 1 10, so
rank 1 runs out first) from the tiny LLaDA-format model at ``--model`` and trains the SAEs of :func:`make_saes`
with the DDP trainer on its own activations. Rank 0 writes the final SAEs and prints ``done step=...``.
"""
from __future__ import annotations

import argparse
import sys

import torch
from safetensors.torch import save_file

from dlmscope.util import distributed as D
from dlmscope import models
from dlmscope.data.ranks import rank_stream
from dlmscope.sae.topk import TopKSAE
from dlmscope.train.trainer import LogConfig, Trainer, TrainConfig
from tests.helpers.train_worker import final_tensors

LAYER, N_LM_BATCHES = 1, 21
STREAM = dict(batch_size=24, buffer_tokens=96, dtype=torch.float32)


def token_batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(3, 49, (4, 12), generator=gen) for _ in range(N_LM_BATCHES)]


def make_saes(d: int) -> list[TopKSAE]:
    return [TopKSAE(d, 40, k, generator=torch.Generator().manual_seed(300 + k)) for k in (2, 5)]


def make_config() -> TrainConfig:
    return TrainConfig(steps=40, lr=1e-2, warmup_steps=2, decay_fraction=0.3, dead_tokens=48, norm_batches=2)


def layer_stream(adapter, rank: int, world: int):
    return rank_stream(adapter, token_batches(), [LAYER], "mask", rank=rank, world=world, seed=3,
                       **STREAM).for_layer(LAYER)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    D.maybe_init()
    adapter = models.load(args.model)
    trainer = Trainer(make_saes(adapter.d_model), make_config(), log=LogConfig(log_every=0, progress=False))
    saes = trainer.fit(layer_stream(adapter, D.rank(), D.world_size()))
    if D.is_main():
        save_file(final_tensors(saes), args.out)
        print(f"done step={trainer.step} tokens={trainer.tokens_seen}", flush=True)
    D.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
