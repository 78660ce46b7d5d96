"""Subprocess entry for the trainer's resume and torchrun tests (not a test module itself).

    python -m tests.helpers.train_worker --out final.safetensors [--ckpt DIR] [--resume] [--kill-at N] [--lr LR]
    python -m torch.distributed.run --nproc-per-node 2 -m tests.helpers.train_worker --out final.safetensors

The problem (SAEs, stream, config) is defined here once so the tests can build the same run in-process. Under
torchrun rank r's stream yields its share of every global batch (rank 0 gets the first ceil(B/2) rows); the
last global batch is uneven and rank 1's stream has one extra batch at the end, which must not hang training.
``--kill-at N`` SIGKILLs this process when the stream is asked for batch N (after a checkpoint was written).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

import torch
from safetensors.torch import save_file

from dlmscope.sae.topk import TopKSAE
from dlmscope.train.trainer import LogConfig, Trainer, TrainConfig

D, N, KS = 16, 48, (3, 6)
GLOBAL_BATCH, LAST_BATCH, N_BATCHES = 64, 37, 13


def make_saes() -> list[TopKSAE]:
    return [TopKSAE(D, N, k, generator=torch.Generator().manual_seed(100 + k)) for k in KS]


def make_config(**overrides) -> TrainConfig:
    base = dict(steps=N_BATCHES, lr=1e-2, warmup_steps=2, decay_fraction=0.3, auxk_alpha=1 / 32, dead_tokens=64,
                norm_batches=3, seed=0)
    base.update(overrides)
    return TrainConfig(**base)


def make_log() -> LogConfig:
    return LogConfig(log_every=4, progress=False)


def global_batch(i: int) -> torch.Tensor:
    """Deterministic global batch i: sparse non-negative codes on a fixed dictionary, plus an offset."""
    g = torch.Generator().manual_seed(1000 + i)
    dictionary = torch.randn(24, D, generator=torch.Generator().manual_seed(7))
    dictionary = torch.nn.functional.normalize(dictionary, dim=1)
    rows = LAST_BATCH if i == N_BATCHES - 1 else GLOBAL_BATCH
    codes = (torch.rand(rows, 24, generator=g) < 0.12) * (torch.rand(rows, 24, generator=g) + 0.5)
    return codes @ dictionary * 4 + 1.0 + 0.05 * torch.randn(rows, D, generator=g)


def global_stream(n_batches: int = N_BATCHES, kill_at: int | None = None):
    for i in range(n_batches):
        if kill_at is not None and i == kill_at:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        yield global_batch(i)


def rank_stream(rank: int, world: int):
    """This rank's share of every global batch; rank 1 has one extra batch at the end."""
    assert world == 2
    for i in range(N_BATCHES + (1 if rank == 1 else 0)):
        x = global_batch(i % N_BATCHES)
        half = (x.shape[0] + 1) // 2
        yield x[:half] if rank == 0 else x[half:]


def final_tensors(saes: list[TopKSAE]) -> dict[str, torch.Tensor]:
    return {f"{i}.{p}": getattr(s, p).detach().clone().contiguous()
            for i, s in enumerate(saes) for p in ("W_enc", "b_enc", "W_dec", "b_dec")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--steps", type=int, default=N_BATCHES)
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: make_config's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lr = {} if args.lr is None else {"lr": args.lr}
    cfg = make_config(steps=args.steps, checkpoint_dir=args.ckpt, **lr,
                      checkpoint_every=args.checkpoint_every if args.ckpt else None)
    trainer = Trainer(make_saes(), cfg, log=make_log())
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        stream = rank_stream(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    else:
        stream = global_stream(kill_at=args.kill_at)
    saes = trainer.fit(stream, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        save_file(final_tensors(saes), args.out)
        print(f"done step={trainer.step} tokens={trainer.tokens_seen}", flush=True)
    import dlmscope.util.distributed as dd
    dd.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
