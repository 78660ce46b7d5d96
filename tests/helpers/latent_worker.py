"""Subprocess entry for the latent-parallel tests (not a test module itself).

    python -m torch.distributed.run --nproc-per-node 4 -m tests.helpers.latent_worker --latent 2 --out out.st

The problem: three SAEs of a k sweep with latent counts that split unevenly (46 -> 23,23 / 12,12,11,11; 21 ->
11,10 / 6,5,5,5; 9 -> 5,4 / 3,2,2,2 over 2 / 4 ranks; k=6 above a shard's size), AuxK active (dead_tokens=64),
on the global batches of :mod:`tests.helpers.train_worker` (the last one uneven, 37 rows). Data rank p of P gets
the p-th of ``P`` contiguous chunks of every global batch (``tensor_split``, the first chunks one row longer);
every latent rank of a data rank gets the same rows. ``--short-rank r --short-at m`` ends rank r's stream after m
batches (the others have more): every rank must stop at step m. ``--kill-at i`` SIGKILLs rank 1 when its stream
is asked for batch i. Rank 0 writes the gathered full SAEs to ``--out`` and prints ``done step=... auxk_steps=...``.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

import torch
from safetensors.torch import save_file

from dlmscope.util import distributed as D
from dlmscope.train.latent_parallel import LatentShard, make_grid, shard_bounds
from dlmscope.train.latent_trainer import LatentParallelTrainer, gather_saes
from dlmscope.sae.topk import TopKSAE
from dlmscope.train.trainer import LogConfig
from tests.helpers.train_worker import D as DIM, N_BATCHES, final_tensors, global_batch, make_config

SHAPES = ((46, 3), (21, 6), (9, 6))  # (n, k) per SAE


def make_saes(count: int = len(SHAPES)) -> list[TopKSAE]:
    return [TopKSAE(DIM, n, k, generator=torch.Generator().manual_seed(200 + n)) for n, k in SHAPES[:count]]


def make_log() -> LogConfig:
    return LogConfig(log_every=1, progress=False)


def data_stream(data_rank: int, data_size: int, n_batches: int = N_BATCHES, kill_at: int | None = None):
    for i in range(n_batches):
        if kill_at is not None and i == kill_at:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        yield global_batch(i).tensor_split(data_size)[data_rank]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latent", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--saes", type=int, default=len(SHAPES))
    parser.add_argument("--short-rank", type=int, default=None)
    parser.add_argument("--short-at", type=int, default=None)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--grad-clip", type=float, default=None, help="clip norm (default: the recipe's)")
    parser.add_argument("--wrong-shard-rank", type=int, default=None, help="this rank takes latent rank 0's shard")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    grid = make_grid(args.latent)
    wrong = D.rank() == args.wrong_shard_rank
    shards = [LatentShard.from_sae(s, *(shard_bounds(s.n, grid.latent_size)[0] if wrong else grid.bounds(s.n)))
              for s in make_saes(args.saes)]
    clip = {} if args.grad_clip is None else {"grad_clip": args.grad_clip}
    cfg = make_config(checkpoint_dir=args.ckpt, checkpoint_every=5 if args.ckpt else None, **clip)
    try:
        trainer = LatentParallelTrainer(shards, grid, cfg, log=make_log())
    except ValueError as exc:               # every rank must get here, none left waiting in a collective
        print(f"rank {D.rank()} refused: {exc}", flush=True)
        D.destroy()
        return 3
    rank = D.rank()
    n_batches = args.short_at if rank == args.short_rank else N_BATCHES
    kill_at = args.kill_at if rank == 1 else None
    trainer.fit(data_stream(grid.data_rank, grid.data_size, n_batches, kill_at), resume=args.resume)
    saes = gather_saes(trainer.saes, grid)
    if rank == 0:
        save_file(final_tensors(saes), args.out)
        auxk_steps = sum(1 for r in trainer.history if any(row["auxk"] > 0 for row in r["sae"]))
        print(f"done step={trainer.step} auxk_steps={auxk_steps} grid={grid.data_size}x{grid.latent_size}",
              flush=True)
    D.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
