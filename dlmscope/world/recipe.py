"""How the jobs run on the embedded world: LM batches of its corpus and the SAE recipe for its tiny models.

One definition that the demo, the jobs and the scripts share: :func:`world_batches` packs the corpus into
``(train, heldout)`` LM batches; :data:`SEQ_LEN` and :data:`LM_BATCH` are the batch shape the world's jobs use;
:data:`SAE_LATENTS`, :data:`SAE_K` and :data:`SAE_TRAIN` are the SAE recipe of the demo's SAEs (``SAE_TRAIN`` holds
keyword arguments of :class:`dlmscope.train.trainer.TrainConfig`, as plain values: the world imports no trainer).

    train, held = world_batches(tokenizer, 20_000, SEQ_LEN, LM_BATCH, seed=0)
    cfg = TrainConfig(**SAE_TRAIN)
"""
from __future__ import annotations

from types import MappingProxyType

from torch import Tensor

from .corpus import token_rows

__all__ = ["SEQ_LEN", "LM_BATCH", "SAE_LATENTS", "SAE_K", "SAE_TRAIN", "world_batches"]

#: tokens per context and contexts per model forward of the world's LM batches
SEQ_LEN, LM_BATCH = 64, 32
#: dictionary size and active latents of the world's SAEs
SAE_LATENTS, SAE_K = 512, 8
#: the TrainConfig fields of the world's SAE recipe that differ from the paper's defaults (read-only)
SAE_TRAIN = MappingProxyType({"lr": 1e-3, "warmup_steps": 20, "dead_tokens": 100_000, "norm_batches": 10})


def world_batches(tokenizer, n_sentences: int, seq_len: int, lm_batch: int, seed: int = 0
                  ) -> tuple[list[Tensor], list[Tensor]]:
    """``(train, heldout)`` LM batches ``[lm_batch, seq_len]`` (the last of each may be smaller) of
    ``n_sentences`` of the world's corpus drawn with ``seed``, split by the corpus's own train/held-out rule."""
    train, held = token_rows(tokenizer, n_sentences, seq_len, seed)
    return list(train.split(lm_batch)), list(held.split(lm_batch))
