"""The embedded world: a planted-concept corpus, a word-level HF tokenizer and (later) tiny trained models.

``python -m dlmscope.world.build`` regenerates ``dlmscope/world/assets/`` deterministically.
"""
from .corpus import (CONCEPTS, CONCEPT_GROUPS, KINDS, Sample, Task, concept_id_table, concept_of, corpus_stats,
                     decoding_tasks, encode_prompted, generate, is_heldout, pack, split, token_rows, vocabulary)
from .tokenizer import SPECIAL_TOKENS, build_tokenizer, load_tokenizer, save_tokenizer

import os as _os

#: Where the committed world assets live.
ASSETS_DIR = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "assets")
TOKENIZER_DIR = _os.path.join(ASSETS_DIR, "tokenizer")

__all__ = ["CONCEPTS", "CONCEPT_GROUPS", "KINDS", "Sample", "Task", "concept_id_table", "concept_of", "is_heldout",
           "corpus_stats", "decoding_tasks", "encode_prompted", "generate", "pack", "split", "token_rows", "vocabulary",
           "SPECIAL_TOKENS", "build_tokenizer", "load_tokenizer", "save_tokenizer", "ASSETS_DIR", "TOKENIZER_DIR"]
