"""The embedded world's word-level tokenizer (Hugging Face ``tokenizers`` WordLevel model).

Lowercase normaliser, whitespace + punctuation pre-tokenizer, one id per corpus word. Special tokens
(fixed ids): ``[PAD]`` 0, ``[UNK]`` 1, ``[BOS]`` 2, ``[EOS]`` 3, ``[MASK]`` 4; then the words in sorted order.
``tok(text)`` adds ``[BOS] … [EOS]`` (``add_special_tokens=False`` gives the bare words). Saved in HF format
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``) so that
``transformers.AutoTokenizer.from_pretrained(dir)`` loads it with ``mask_token_id`` set.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from . import corpus as _corpus

PAD, UNK, BOS, EOS, MASK = "[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, MASK]
#: The longest sequence the tiny models are meant for (recorded as ``model_max_length``).
MODEL_MAX_LENGTH = 128

_SPECIAL_KW = {"pad_token": PAD, "unk_token": UNK, "bos_token": BOS, "eos_token": EOS, "mask_token": MASK}


def _words_of(samples: Iterable) -> set[str]:
    words: set[str] = set()
    for s in samples:
        ws = getattr(s, "words", None)
        if ws is None:  # plain strings are accepted too
            ws = str(s).split()
        words.update(w.lower() for w in ws)
    return words


def build_tokenizer(samples: Iterable | None = None, include_inventory: bool = True):
    """A ``PreTrainedTokenizerFast`` whose vocabulary is the special tokens followed by the sorted union of
    the words in ``samples`` (Sample objects or strings) and — unless ``include_inventory=False`` — the
    generator's whole inventory (:func:`.corpus.vocabulary`), so held-out text never hits ``[UNK]`` and the
    ids do not depend on how many samples were drawn."""
    from transformers import PreTrainedTokenizerFast

    words = _words_of(samples or [])
    if include_inventory:
        words.update(_corpus.vocabulary())
    words -= set(SPECIAL_TOKENS)
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in sorted(words):
        vocab[w] = len(vocab)

    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with single spaces
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    tk.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tk, model_max_length=MODEL_MAX_LENGTH,
                                   padding_side="right", **_SPECIAL_KW)


def save_tokenizer(tok, directory: str | os.PathLike) -> list[str]:
    """Write ``tok`` in HF format to ``directory``; returns the file names written."""
    os.makedirs(directory, exist_ok=True)
    tok.save_pretrained(str(directory))
    # transformers 5 may not write special_tokens_map.json any more; older loaders and other tools read it.
    stm = os.path.join(directory, "special_tokens_map.json")
    with open(stm, "w") as f:
        json.dump(dict(_SPECIAL_KW), f, indent=2, sort_keys=True)
        f.write("\n")
    cfg_path = os.path.join(directory, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(_SPECIAL_KW)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["model_max_length"] = MODEL_MAX_LENGTH
    cfg["padding_side"] = "right"
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return sorted(os.listdir(directory))


def load_tokenizer(directory: str | os.PathLike):
    """Load a tokenizer written by :func:`save_tokenizer` (via ``AutoTokenizer``)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory))
    if tok.mask_token_id is None:
        raise ValueError(f"tokenizer in {directory} has no mask token")
    return tok
