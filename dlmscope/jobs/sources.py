"""Where a job's text comes from: the embedded world's corpus (``"world"``) or a source of :mod:`dlmscope.data.text`.

The library reads text files and datasets only; the world is one more source here, in the jobs layer, the one
that may use it. The CLI's ``--corpus`` goes through :func:`token_batches`.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from torch import Tensor

from dlmscope.data.text import SOURCE_KINDS, require_tokenizer, text_batches
from dlmscope.world import world_batches

__all__ = ["WORLD", "SOURCES", "token_batches", "source_identity"]

#: the source name of the embedded world's corpus
WORLD = "world"
#: every source :func:`token_batches` reads, as error messages name them
SOURCES = f"{WORLD!r} (the embedded world's corpus), {SOURCE_KINDS}"


def token_batches(source: str | os.PathLike, tokenizer, *, seq_len: int, lm_batch: int, text_field: str = "text",
                  split: str = "train", heldout_every: int = 10, world_sentences: int = 20_000, seed: int = 0
                  ) -> tuple[Iterable[Tensor], Iterable[Tensor]]:
    """``(train, heldout)`` re-iterables of ``[lm_batch, seq_len]`` token batches of ``source``: for ``"world"``
    the world's own split of ``world_sentences`` sentences drawn with ``seed``
    (:func:`dlmscope.world.world_batches`), else :func:`dlmscope.data.text.text_batches` (``text_field``,
    ``split`` and ``heldout_every`` apply there)."""
    require_tokenizer(tokenizer)
    if os.fspath(source) == WORLD:
        return world_batches(tokenizer, world_sentences, seq_len, lm_batch, seed)
    if not Path(source).exists():
        raise ValueError(f"text source {os.fspath(source)!r} does not exist (expected {SOURCES})")
    return text_batches(source, tokenizer, seq_len=seq_len, lm_batch=lm_batch, text_field=text_field, split=split,
                        heldout_every=heldout_every)


def source_identity(source: str | os.PathLike, *, seq_len: int, lm_batch: int, text_field: str = "text",
                    split: str = "train", heldout_every: int = 10, world_sentences: int = 20_000, seed: int = 0
                    ) -> dict:
    """What :func:`token_batches` with these arguments reads and how it packs it, as JSON (an activation cache
    records it, see :class:`~dlmscope.data.activations.ActivationStream`'s ``text_source``). Only the arguments
    that source uses: ``world_sentences`` and ``seed`` for the world, ``text_field``, ``split`` and
    ``heldout_every`` for the others, whose path is resolved (a file's size recorded too, a cheap stand-in for
    its content)."""
    if os.fspath(source) == WORLD:
        text = {"corpus": WORLD, "sentences": world_sentences, "seed": seed}
    else:
        path = Path(source).resolve()
        text = {"corpus": str(path), "text_field": text_field, "split": split, "heldout_every": heldout_every}
        if path.is_file():
            text["bytes"] = path.stat().st_size
    return {**text, "seq_len": seq_len, "lm_batch": lm_batch}
