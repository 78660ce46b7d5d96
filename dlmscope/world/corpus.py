"""The planted-concept corpus: deterministic, templated English-like text with ground-truth concept labels.

Every word of the corpus comes from a closed inventory (:func:`vocabulary`, ≈ 500 words). Ten concepts
(:data:`CONCEPTS`) are small closed vocabularies, and every word belongs to **at most one** concept, so a
word's label is a function of the word (:func:`concept_of`) — that is the ground truth SAE latents are
scored against. Four kinds of sample:

``plain``  templated sentences with concept slots ("on monday anna fed the brown rabbit in oslo .")
``fact``   world facts with a known answer ("the capital of france is paris .", "the day after monday is
           tuesday .", "the opposite of happy is sad .")
``arith``  arithmetic ("three plus four is seven .", "9 minus 2 is 7 .", chains "two plus three is five .
           five plus one is six .", counting "counting : four five six seven .")
``qa``     the Q&A slice for the instruct twin ("question : what colour is the sky ? answer : blue", and
           reading-comprehension items whose answer is in a context sentence)

``fact``/``arith``/``qa`` samples carry ``answer`` = the word span ``(start, end)`` of their (last) answer;
``qa`` samples carry ``prompt_len`` = the number of words up to and including ``answer :`` (the prompt the
instruct twin never masks). :func:`decoding_tasks` builds scored fill-in tasks with known answer positions
(for steering and decoding-order experiments).

The generator is split by job: :mod:`.templates` holds the data (word inventories, concepts, facts,
templates), :mod:`.samples` draws samples from it (:func:`generate`, :func:`vocabulary`), :mod:`.tasks`
builds the decoding tasks, and this module splits, counts and packs the samples into token ids. Every
public name of those modules is importable from here.

Generation is pure Python (``random.Random(seed)``): the same ``(n, seed)`` gives the same corpus on any
machine. Texts are the words joined by single spaces, so a whitespace/punctuation word-level tokenizer maps
words to tokens one to one (token position = word position + 1 once ``[BOS]`` is prepended).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .samples import ANNEAL_MIX, COUNT_LENGTH, DEFAULT_MIX, KINDS, Sample, arith_value, chain_words, generate, is_heldout, vocabulary
from .tasks import (COMPOSITION_KINDS, NEUTRAL_TEMPLATES, SCORED_KINDS, TASK_KINDS, Task, decoding_tasks,
                    load_tasks, task_heldout, task_record)
from .templates import (ADVERBS, ANIMALS, ANIMALS_PLURAL, ANIMAL_FOOD_FACTS, CAPITALS, CITIES, COLOURS,
                        COLOUR_FACTS, CONCEPTS, CONCEPT_GROUPS, COUNTRIES, DAYS, DAY_PARTS, FACTS, FAMILY,
                        FAMILY_FACTS, FEEL_VERBS, FOODS, MAX_NUMBER, MONTHS, NAMES, NEGATIVE, NUMBER_DIGITS,
                        NUMBER_WORDS, OBJECTS, OPPOSITES, PLACES_GENERIC, PLAIN_TEMPLATES, POSITIVE, RELATIVE_DAYS,
                        SEASONS, SEASON_WEATHER, SLOTS, TIME, TOPICS, VERBS_ANIMAL, VERBS_FOOD, VERBS_MOVE, WEATHER,
                        WEATHER_ADJS, WEATHER_NOUNS, concept_of)

__all__ = ["ADVERBS", "ANIMAL_FOOD_FACTS", "ANIMALS", "ANIMALS_PLURAL", "arith_value", "CAPITALS", "CITIES",
           "COLOUR_FACTS", "COLOURS", "CONCEPT_GROUPS", "concept_id_table", "concept_of", "CONCEPTS",
           "corpus_stats", "COUNTRIES", "DAY_PARTS", "DAYS", "decoding_tasks", "DEFAULT_MIX", "encode_prompted",
           "FACTS", "FAMILY", "FAMILY_FACTS", "FEEL_VERBS", "FOODS", "generate", "is_heldout", "KINDS",
           "MAX_NUMBER", "MONTHS", "NAMES", "NEGATIVE", "NUMBER_DIGITS", "NUMBER_WORDS", "OBJECTS", "OPPOSITES",
           "pack", "PLACES_GENERIC", "PLAIN_TEMPLATES", "POSITIVE", "RELATIVE_DAYS", "Sample", "SEASON_WEATHER",
           "SEASONS", "SLOTS", "TOPICS", "ANNEAL_MIX", "COUNT_LENGTH", "chain_words", "NEUTRAL_TEMPLATES", "split", "Task", "TASK_KINDS", "SCORED_KINDS", "COMPOSITION_KINDS", "task_heldout", "task_record", "load_tasks", "TIME", "token_rows", "VERBS_ANIMAL", "VERBS_FOOD",
           "VERBS_MOVE", "vocabulary", "WEATHER", "WEATHER_ADJS", "WEATHER_NOUNS"]


# --------------------------------------------------------------------------------------------------------
# Split, statistics
# --------------------------------------------------------------------------------------------------------

def split(samples: Iterable[Sample], heldout_frac: float = 0.1, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """(train, held-out) by a stable hash of each text: identical texts land on the same side, so no
    held-out sentence occurs in training. Order within each side is preserved."""
    if not 0.0 <= heldout_frac <= 1.0:
        raise ValueError("heldout_frac must be in [0, 1]")
    train, held = [], []
    for s in samples:
        (held if is_heldout(s.text, heldout_frac, seed) else train).append(s)
    return train, held


def corpus_stats(samples: Sequence[Sample]) -> dict:
    """Counts per kind and per concept, word totals, distinct texts and the words used."""
    kinds: dict[str, int] = {}
    concepts = {c: 0 for c in CONCEPTS}
    used: set[str] = set()
    n_words = 0
    for s in samples:
        kinds[s.kind] = kinds.get(s.kind, 0) + 1
        n_words += len(s.words)
        used.update(s.words)
        for lab in s.labels:
            if lab is not None:
                concepts[lab] += 1
    n_labelled = sum(concepts.values())
    return {
        "n_samples": len(samples), "n_words": n_words, "mean_words": n_words / max(1, len(samples)),
        "distinct_texts": len({s.text for s in samples}), "kinds": kinds, "concept_counts": concepts,
        "labelled_fraction": n_labelled / max(1, n_words), "distinct_words": len(used),
    }


# --------------------------------------------------------------------------------------------------------
# Token ids: packing and answer masks
# --------------------------------------------------------------------------------------------------------

def _ids(tokenizer, words: Sequence[str]) -> list[int]:
    return tokenizer.convert_tokens_to_ids(list(words))


def pack(samples: Sequence[Sample], tokenizer, seq_len: int, mode: str = "concat", drop_last: bool = True):
    """Token ids ``[N, seq_len]`` (``torch.long``).

    ``concat``: ``[BOS] s1 [EOS] [BOS] s2 [EOS] …`` as one stream cut into rows of ``seq_len`` (a partial
    last row is dropped, or padded with ``[PAD]`` when ``drop_last=False``).
    ``pad``: one sample per row, ``[BOS] s [EOS]`` then ``[PAD]``; samples longer than ``seq_len`` raise.
    The attention mask is ``ids != tokenizer.pad_token_id``."""
    if seq_len < 2:
        raise ValueError("seq_len must be >= 2")
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    if mode == "concat":
        stream: list[int] = []
        for s in samples:
            stream.append(bos)
            stream.extend(_ids(tokenizer, s.words))
            stream.append(eos)
        n_full = len(stream) // seq_len
        rows = [stream[i * seq_len:(i + 1) * seq_len] for i in range(n_full)]
        rest = stream[n_full * seq_len:]
        if rest and not drop_last:
            rows.append(rest + [pad] * (seq_len - len(rest)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), seq_len)
    if mode == "pad":
        out = torch.full((len(samples), seq_len), pad, dtype=torch.long)
        for r, s in enumerate(samples):
            ids = [bos] + _ids(tokenizer, s.words) + [eos]
            if len(ids) > seq_len:
                raise ValueError(f"sample of {len(ids)} tokens does not fit seq_len={seq_len}: {s.text!r}")
            out[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out
    raise ValueError(f"unknown pack mode {mode!r}; expected 'concat' or 'pad'")


def token_rows(tokenizer, n_sentences: int, seq_len: int, seed: int = 0):
    """``(train_rows, heldout_rows)``: packed ``[N, seq_len]`` token ids of ``generate(n_sentences, seed)``, split
    by :func:`split` (one generation for both halves)."""
    train, held = split(generate(n_sentences, seed=seed))
    return pack(train, tokenizer, seq_len), pack(held, tokenizer, seq_len)


def concept_id_table(tokenizer) -> tuple[list[str], torch.Tensor]:
    """``(names, table)``: ``names`` = the concept names in :data:`CONCEPTS` order and ``table[token_id]`` =
    the index of that token's concept in ``names``, or -1 (special tokens, unlabelled words). ``table[ids]``
    labels a whole batch of token ids at once (ground truth for latent-vs-concept scoring)."""
    names = list(CONCEPTS)
    table = torch.full((len(tokenizer),), -1, dtype=torch.long)
    for tok_str, i in tokenizer.get_vocab().items():
        c = concept_of(tok_str)
        if c is not None:
            table[i] = names.index(c)
    return names, table


def encode_prompted(samples: Sequence[Sample], tokenizer, seq_len: int):
    """For instruct fine-tuning: ``(ids [N, seq_len], prompt_mask [N, seq_len] bool)``, one padded row per
    sample (as ``pack(mode="pad")``); ``prompt_mask`` is True on ``[BOS]`` and the prompt words (which are
    never masked), False on the answer, ``[EOS]`` and padding. Samples without ``prompt_len`` have only
    ``[BOS]`` as prompt."""
    ids = pack(samples, tokenizer, seq_len, mode="pad")
    prompt = torch.zeros_like(ids, dtype=torch.bool)
    for r, s in enumerate(samples):
        prompt[r, :1 + (s.prompt_len or 0)] = True
    return ids, prompt
