"""Distributed harvest: under torchrun each rank harvests its own slice of the text and trains on its own rows.

    train, _ = text_batches("corpus.jsonl", adapter.tokenizer, seq_len=2048, lm_batch=8)  # streamed, lazy
    stream = rank_stream(adapter, train, layers=[16], policy="mask", batch_size=2048, seed=0)  # this rank's slice
    Trainer(saes, cfg).fit(stream.for_layer(16))       # DDP: gradients all-reduced, activations never gathered

The split is over LM batches, round-robin: rank r of W keeps batches ``r, r + W, r + 2W, ...`` of the token
stream (:class:`RankSlice`; every rank reads the stream lazily and skips the others' batches, so a streamed
dataset needs no index and no pass over it). Each rank runs the truncated forward
(:func:`dlmscope.data.activations.harvest`, via an :class:`~dlmscope.data.activations.ActivationStream`) on its batches,
with its own seed (``seed + RANK_SEED_STRIDE * rank``) for the corruption and the shuffle. Step i of the DDP
trainer then trains on the union of every rank's i-th activation batch; :func:`global_batches` builds that same
sequence in one process (the ranks' streams side by side, concatenated in rank order), so a distributed run can
be checked against, and resumed as, one process on the same global batches. A rank whose slice runs out first
ends training on every rank (the trainer's per-step agreement).

Latent-parallel grids (:mod:`dlmscope.train.latent_trainer`): slice by the *data* rank (``rank=grid.data_rank,
world=grid.data_size``), so every rank of a latent group harvests and trains on the same rows.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from dlmscope.util import distributed as D
from .activations import ActivationStream

__all__ = ["RankSlice", "rank_stream", "global_batches", "RANK_SEED_STRIDE"]

#: a rank's stream seed is ``seed + RANK_SEED_STRIDE * rank`` (distinct corruption and shuffle per rank)
RANK_SEED_STRIDE = 7919


class RankSlice:
    """Items ``rank, rank + world, ...`` of ``items`` (re-iterable when ``items`` is; each pass re-reads it)."""

    def __init__(self, items: Iterable, rank: int, world: int):
        if isinstance(world, bool) or not isinstance(world, int) or world < 1:
            raise ValueError(f"world must be a positive int, got {world!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
            raise ValueError(f"rank must be an int in [0, world={world}), got {rank!r}")
        self.items, self.rank, self.world = items, rank, world

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.items), self.rank, None, self.world)


def rank_stream(adapter, token_batches: Iterable, layers, policy: str = "mask", *, rank: int | None = None,
                world: int | None = None, seed: int = 0, **stream_kwargs) -> ActivationStream:
    """This rank's :class:`~dlmscope.data.activations.ActivationStream` over its :class:`RankSlice` of
    ``token_batches`` (``rank`` / ``world`` default to the process group's). ``stream_kwargs`` go to the stream
    (``batch_size``, ``buffer_tokens``, ``max_tokens`` — per rank —, ``dtype``, ...). A ``cache_dir`` must be
    per rank."""
    rank = D.rank() if rank is None else rank
    world = D.world_size() if world is None else world
    return ActivationStream(adapter, RankSlice(token_batches, rank, world), layers, policy,
                            seed=seed + RANK_SEED_STRIDE * rank, **stream_kwargs)


def global_batches(streams: list[Iterable[Tensor]]) -> Iterator[Tensor]:
    """What one process trains on for ``streams`` (one per rank, in rank order): their i-th batches concatenated,
    until the first stream ends (where the distributed run stops too)."""
    for parts in zip(*streams):
        yield torch.cat(parts)
