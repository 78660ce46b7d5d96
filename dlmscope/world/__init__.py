"""The embedded world: a planted-concept corpus (:mod:`.corpus`, :mod:`.samples`, :mod:`.templates`,
:mod:`.tasks`), a word-level HF tokenizer (:mod:`.tokenizer`), tiny trained models (:mod:`.train_models`,
:mod:`.objectives`, :mod:`.evaluation`, :mod:`.quality`; rebuilt by :mod:`.build`), and how the jobs run on it (:mod:`.recipe`: its LM batches and SAE
recipe).

``python -m dlmscope.world.build`` regenerates ``dlmscope/world/assets/`` deterministically.
"""
from .corpus import (CONCEPTS, CONCEPT_GROUPS, KINDS, Sample, Task, concept_id_table, concept_of, corpus_stats,
                     decoding_tasks, encode_prompted, generate, is_heldout, pack, split, token_rows, vocabulary)
from .recipe import LM_BATCH, SAE_K, SAE_LATENTS, SAE_TRAIN, SEQ_LEN, world_batches
from .tokenizer import SPECIAL_TOKENS, build_tokenizer, load_tokenizer, save_tokenizer

import os as _os

#: Where the committed world assets live.
ASSETS_DIR = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "assets")
TOKENIZER_DIR = _os.path.join(ASSETS_DIR, "tokenizer")


def asset(*parts: str) -> str:
    """The path of a committed world asset (``asset("models", "dlm")``, ``asset("tasks.jsonl")``); a clear error
    where it is missing: the assets ship with a clone of the repository, not with the wheel."""
    path = _os.path.join(ASSETS_DIR, *parts)
    if not _os.path.exists(path):
        raise FileNotFoundError(f"embedded-world asset {path} is missing: the world's assets (37 MB) ship with a clone "
                                "of the repository, not with the wheel; run from a clone, or regenerate them with "
                                "`python -m dlmscope.world.build`")
    return path


__all__ = ["CONCEPTS", "CONCEPT_GROUPS", "KINDS", "Sample", "Task", "concept_id_table", "concept_of", "is_heldout",
           "corpus_stats", "decoding_tasks", "encode_prompted", "generate", "pack", "split", "token_rows", "vocabulary",
           "SPECIAL_TOKENS", "build_tokenizer", "load_tokenizer", "save_tokenizer", "ASSETS_DIR", "TOKENIZER_DIR",
           "asset", "world_batches", "SEQ_LEN", "LM_BATCH", "SAE_LATENTS", "SAE_K", "SAE_TRAIN"]
