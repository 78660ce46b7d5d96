"""Subprocess entry for the torchrun test of a mixed-architecture run (not a test module itself).

    python -m torch.distributed.run --nproc-per-node 2 -m tests.helpers.arch_worker --out DIR

Each rank trains :func:`make_saes` (Top-K, BatchTopK, JumpReLU, Matryoshka) on its share of the global batches of
:mod:`tests.helpers.train_worker` and writes every SAE's state to ``DIR/rank{r}.safetensors``, so the test can check
that the ranks agree and compare with one process on the global batches.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from dlmscope.sae import BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE, TopKSAE
from dlmscope.train.trainer import Trainer
from tests.helpers.train_worker import D, N, global_stream, make_config, make_log, rank_stream


def make_saes() -> list[TopKSAE]:
    g = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    return [TopKSAE(D, N, 3, generator=g(1)), BatchTopKSAE(D, N, 3, threshold_beta=0.9, generator=g(2)),
            JumpReLUSAE(D, N, 4, init_threshold=0.3, eps=0.2, generator=g(3)),
            MatryoshkaSAE(D, N, 3, prefixes=[12, N], threshold_beta=0.9, generator=g(4))]


def final_tensors(saes: list[TopKSAE]) -> dict[str, torch.Tensor]:
    """Every SAE's state (parameters and threshold) and the BatchTopK family's update count, by ``{i}.{name}``."""
    out = {f"{i}.{name}": t.detach().clone().contiguous()
           for i, s in enumerate(saes) for name, t in s.state()[1].items()}
    out.update({f"{i}.threshold_updates": s.threshold_updates.clone() for i, s in enumerate(saes)
                if isinstance(s, BatchTopKSAE)})
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    trainer = Trainer(make_saes(), make_config(), log=make_log())
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    saes = trainer.fit(rank_stream(rank, world) if world > 1 else global_stream())
    save_file(final_tensors(saes), str(Path(args.out) / f"rank{rank}.safetensors"))
    print(f"done rank={rank} step={trainer.step}", flush=True)
    import dlmscope.util.distributed as dd
    dd.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
