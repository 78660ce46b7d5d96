"""Multi-layer activation chunks, the seeded shuffle buffer that turns them into training batches, and the
views a trainer or an evaluation takes of such a stream (one layer; everything concatenated).

A *chunk* is ``dict[layer, Tensor[n, d]]``: the kept activations of one LM batch at every hooked layer, row ``i``
of every layer coming from the same token position. :func:`shuffle_batches` buffers chunks up to
``buffer_tokens`` rows, permutes them with one seeded permutation shared by all layers, and hands out
``{layer: [batch_size, d]}`` batches. The output depends only on the concatenated row sequence, not on how it
was chunked, so a live harvest and a replay from the disk cache give identical batches.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["shuffle_batches", "check_batching", "LayerStream", "SizedLayerStream", "collect", "chunk_len", "slice_chunk"]

Chunk = dict[int, Tensor]


def chunk_len(chunk: Chunk) -> int:
    """Rows in ``chunk`` (the same for every layer)."""
    return int(next(iter(chunk.values())).shape[0])


def slice_chunk(chunk: Chunk, start: int, stop: int) -> Chunk:
    """Rows ``start:stop`` of every layer."""
    return {k: v[start:stop] for k, v in chunk.items()}


def check_batching(batch_size: Any, buffer_tokens: Any) -> None:
    """ValueError unless ``batch_size`` is a positive int and ``buffer_tokens`` an int ``>= batch_size``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(buffer_tokens, bool) or not isinstance(buffer_tokens, int) or buffer_tokens < batch_size:
        raise ValueError(f"buffer_tokens must be an int >= batch_size ({batch_size}), got {buffer_tokens!r}")


def shuffle_batches(
    chunks: Iterable[Chunk],
    batch_size: int,
    buffer_tokens: int,
    *,
    seed: int = 0,
    drop_last: bool = True,
) -> Iterator[Chunk]:
    """Shuffle-buffer a sequence of ``{layer: [n_i, d]}`` chunks into ``{layer: [batch_size, d]}`` batches.

    The buffer fills to ``buffer_tokens`` rows, is permuted (seeded, one permutation shared by all layers) and
    yields batches until fewer than ``buffer_tokens // 2`` rows remain (never fewer than one full batch), then
    refills; the left-over rows are shuffled again with the new ones. At the end the rest is drained; the last
    partial batch is yielded only when ``drop_last=False``. Every row is yielded at most once per pass.
    """
    check_batching(batch_size, buffer_tokens)
    gen = torch.Generator().manual_seed(int(seed))
    # refill below half full, keeping at least a batch; below buffer_tokens so a full buffer always yields
    low_water = min(max(buffer_tokens // 2, batch_size), buffer_tokens - 1)
    src = iter(chunks)
    carry: Chunk | None = None
    rest: Chunk | None = None
    exhausted = False
    while True:
        parts = [rest] if rest is not None else []
        n = chunk_len(rest) if rest is not None else 0
        while n < buffer_tokens and not exhausted:
            if carry is None:
                carry = next(src, None)
                if carry is None:
                    exhausted = True
                    break
            m = chunk_len(carry)
            take = min(m, buffer_tokens - n)
            if take > 0:
                parts.append(slice_chunk(carry, 0, take) if take < m else carry)
                n += take
            carry = slice_chunk(carry, take, m) if take < m else None
        if n == 0:
            return
        keys = list(parts[0].keys())
        buf = {k: torch.cat([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in keys}
        perm = torch.randperm(n, generator=gen)
        perm = perm.to(buf[keys[0]].device, non_blocking=True)
        buf = {k: v.index_select(0, perm) for k, v in buf.items()}
        pos = 0
        stop_at = 0 if exhausted else low_water
        while n - pos >= batch_size and n - pos > stop_at:
            yield slice_chunk(buf, pos, pos + batch_size)
            pos += batch_size
        if exhausted:
            if n - pos > 0 and not drop_last:
                yield slice_chunk(buf, pos, n)
            return
        rest = slice_chunk(buf, pos, n) if pos < n else None


class LayerStream:
    """The ``[B, d]`` batches of one layer of a multi-layer stream (what ``Trainer.fit`` takes).

    ``parent`` has ``_iter_layers(layers) -> Iterator[Chunk]``.
    """

    def __init__(self, parent, layer: int):
        self.parent = parent
        self.layer = int(layer)

    def __iter__(self) -> Iterator[Tensor]:
        for batch in self.parent._iter_layers([self.layer]):
            yield batch[self.layer]


class SizedLayerStream(LayerStream):
    """A :class:`LayerStream` whose parent knows its number of batches (a cached stream): ``len()`` works."""

    def __len__(self) -> int:
        return len(self.parent)


def collect(stream: Iterable[Chunk]) -> Chunk:
    """One pass of a multi-layer stream concatenated: ``{layer: [N, d]}`` (e.g. held-out data that several
    SAEs are evaluated on, harvested once instead of once per SAE)."""
    parts: dict[int, list[Tensor]] = {}
    for batch in stream:
        for layer, x in batch.items():
            parts.setdefault(layer, []).append(x)
    if not parts:
        raise ValueError("collect: the stream yielded no batches")
    return {layer: torch.cat(xs) for layer, xs in parts.items()}
