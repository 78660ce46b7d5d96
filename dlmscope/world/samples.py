"""Sample generation: the four sample kinds drawn from the tables in :mod:`.templates`.

:func:`generate` draws each sample's kind from a mix, then one maker per kind fills a template or a fact with
``random.Random`` draws; every draw goes through that one generator, so ``(n, seed)`` fixes the corpus.
:func:`vocabulary` lists every word the makers can emit (the tokenizer's inventory).
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Sequence

from .templates import (ANIMAL_FOOD_FACTS, ANIMALS, ANIMALS_PLURAL, CAPITALS, CITIES, COLOUR_FACTS, COLOURS, CONCEPTS,
                        COUNTRIES, DAYS, FACTS, FAMILY_FACTS, FOODS, MAX_NUMBER, NAMES, NUMBER_DIGITS,
                        NUMBER_WORDS, OPPOSITES, PLAIN_TEMPLATES, SLOTS, concept_of)

#: The sample kinds, in the order :func:`generate` weighs them.
KINDS = ("plain", "fact", "arith", "qa")
#: Default mix of the pre-training corpus (the base DLM and the AR twin see a little Q&A, as real
#: pre-training corpora do; the instruct twin is fine-tuned on ``generate(..., mix={"qa": 1.0})``).
DEFAULT_MIX = {"plain": 0.40, "fact": 0.25, "arith": 0.25, "qa": 0.10}
#: The DLM's annealing mix: the kinds with multi-cue answers (Q&A, chains) weighted up.
ANNEAL_MIX = {"plain": 0.25, "fact": 0.15, "arith": 0.30, "qa": 0.30}


# --------------------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """One sentence (or Q&A item). ``labels[i]`` is ``concept_of(words[i])``."""

    text: str
    words: tuple[str, ...]
    labels: tuple[str | None, ...]
    kind: str
    #: word span [start, end) of the (last) answer for fact / arith / qa samples, else None
    answer: tuple[int, int] | None = None
    #: qa only: number of prompt words (through "answer :"), which the instruct twin never masks
    prompt_len: int | None = None
    #: which template produced it (for statistics / debugging)
    template: str = ""


def _sample(words: Sequence[str], kind: str, answer=None, prompt_len=None, template="") -> Sample:
    words = tuple(words)
    return Sample(text=" ".join(words), words=words, labels=tuple(concept_of(w) for w in words), kind=kind,
                  answer=answer, prompt_len=prompt_len, template=template)


def number_word(i: int, digits: bool) -> str:
    """The number ``i`` as a digit string ("7") or a word ("seven")."""
    return NUMBER_DIGITS[i] if digits else NUMBER_WORDS[i]


def _fill(template: str, rng: random.Random) -> list[str]:
    bound: dict[str, str] = {}
    out: list[str] = []
    for tok in template.split():
        if tok.startswith("{") and tok.endswith("}"):
            name = tok[1:-1]
            slot, _, key = name.partition("#")
            if key and name in bound:
                value = bound[name]
            else:
                value = rng.choice(SLOTS[slot])
                if key:
                    bound[name] = value
            out.extend(value.split())
        else:
            out.append(tok)
    return out


def _plain(rng: random.Random) -> Sample:
    i = rng.randrange(len(PLAIN_TEMPLATES))
    return _sample(_fill(PLAIN_TEMPLATES[i], rng), "plain", template=f"plain{i}")


# --- facts ----------------------------------------------------------------------------------------------

def _fact(rng: random.Random) -> Sample:
    rel, prefix, ans, end = rng.choice(FACTS)
    phrasing = rng.random()
    if rel == "capital" and phrasing < 0.3:       # "paris is the capital of france ." (answer: france)
        country, city = prefix[3], ans[0]
        words = [city, "is", "the", "capital", "of", country, "."]
        return _sample(words, "fact", answer=(5, 6), template="fact_capital_inv")
    if rel == "capital" and phrasing < 0.5:
        country, city = prefix[3], ans[0]
        words = ["everyone", "knows", "that", "the", "capital", "of", country, "is", city, "."]
        return _sample(words, "fact", answer=(8, 9), template="fact_capital_knows")
    if rel == "colour" and phrasing < 0.4:        # "the sky is blue ."
        words = ["the", prefix[4], "is", ans[0], "."]
        return _sample(words, "fact", answer=(3, 4), template="fact_colour_short")
    words = prefix + ans + [end]
    return _sample(words, "fact", answer=(len(prefix), len(prefix) + len(ans)), template=f"fact_{rel}")


# --- arithmetic -----------------------------------------------------------------------------------------

def rand_op(rng: random.Random, a: int | None = None) -> tuple[int, str, int, int]:
    """A random (a, op, b, result) with every number in [0, MAX_NUMBER]; ``a`` may be fixed."""
    while True:
        op = rng.choice(("plus", "plus", "minus", "minus", "times"))
        x = rng.randint(0, MAX_NUMBER) if a is None else a
        if op == "plus":
            b = rng.randint(0, MAX_NUMBER - x)
            return x, op, b, x + b
        if op == "minus":
            b = rng.randint(0, x)
            return x, op, b, x - b
        if x == 0 or x > MAX_NUMBER // 2:
            if a is None:
                continue
            op = "plus"
            b = rng.randint(0, MAX_NUMBER - x)
            return x, op, b, x + b
        b = rng.randint(0, MAX_NUMBER // x)
        return x, op, b, x * b


def arith_value(a: int, op: str, b: int) -> int:
    """The value of ``a op b`` (op in plus / minus / times)."""
    return {"plus": a + b, "minus": a - b, "times": a * b}[op]


#: How many numbers a counting sample lists.
COUNT_LENGTH = 5


def chain_words(rng: random.Random, steps: int, digits: bool = False) -> list[str]:
    """``a op b is c , then c op d is e .`` (``steps`` operations, each starting from the last result); the
    connector tells a left-to-right reader that the chain goes on."""
    a, op, b, c = rand_op(rng)
    words = [number_word(a, digits), op, number_word(b, digits), "is", number_word(c, digits)]
    for _ in range(steps - 1):
        _, op2, d, e = rand_op(rng, a=c)
        words += [",", "then", number_word(c, digits), op2, number_word(d, digits), "is", number_word(e, digits)]
        c = e
    return words + ["."]


def _arith(rng: random.Random) -> Sample:
    digits = rng.random() < 0.35
    r = rng.random()
    if r < 0.6:
        a, op, b, c = rand_op(rng)
        words = [number_word(a, digits), op, number_word(b, digits), "is", number_word(c, digits), "."]
        return _sample(words, "arith", answer=(4, 5), template="arith_digits" if digits else "arith")
    if r < 0.8:  # chain: the second step starts from the first step's result
        words = chain_words(rng, 2, digits)
        return _sample(words, "arith", answer=(len(words) - 2, len(words) - 1), template="arith_chain")
    n = COUNT_LENGTH  # counting: a fixed length, so a left-to-right reader knows where it ends
    start = rng.randint(0, MAX_NUMBER + 1 - n)
    words = ["counting", ":"] + [number_word(start + i, digits) for i in range(n)] + ["."]
    return _sample(words, "arith", answer=(1 + n, 2 + n), template="arith_count")


# --- Q&A ------------------------------------------------------------------------------------------------

def _qa_closed(rng: random.Random) -> tuple[list[str], list[str], str]:
    r = rng.randrange(7)
    if r == 0:
        country, city = rng.choice(CAPITALS)
        return f"what is the capital of {country} ?".split(), [city], "qa_capital"
    if r == 1:
        obj, col = rng.choice(COLOUR_FACTS)
        return f"what colour is the {obj} ?".split(), [col], "qa_colour"
    if r == 2:
        a, op, b, c = rand_op(rng)
        digits = rng.random() < 0.35
        question = ["what", "is", number_word(a, digits), op, number_word(b, digits), "?"]
        return question, [number_word(c, digits)], "qa_arith"
    if r == 3:
        i = rng.randrange(7)
        return f"what day comes after {DAYS[i]} ?".split(), [DAYS[(i + 1) % 7]], "qa_day"
    if r == 4:
        p, n = rng.choice(OPPOSITES)
        if rng.random() < 0.5:
            p, n = n, p
        return f"what is the opposite of {p} ?".split(), [n], "qa_opposite"
    if r == 5:
        (a, b), ans = rng.choice(FAMILY_FACTS)
        return f"who is the {a} of my {b} ?".split(), ["my", ans], "qa_family"
    a, f = rng.choice(ANIMAL_FOOD_FACTS)
    return f"what does the {a} give us ?".split(), [f], "qa_animal_food"


def _qa_context(rng: random.Random) -> tuple[list[str], list[str], str]:
    r = rng.randrange(5)
    n1, n2 = rng.sample(NAMES, 2)
    if r == 0:
        col, ani = rng.choice(COLOURS), rng.choice(ANIMALS)
        ctx = f"{n1} has a {col} {ani} .".split()
        return ctx + f"question : what colour is the {ani} of {n1} ?".split(), [col], "qa_ctx_colour"
    if r == 1:
        (c1, c2), (a1, a2) = rng.sample(COLOURS, 2), rng.sample(ANIMALS, 2)
        ctx = f"{n1} has a {c1} {a1} and {n2} has a {c2} {a2} .".split()
        if rng.random() < 0.5:
            n1, a1, c1 = n2, a2, c2
        return ctx + f"question : what colour is the {a1} of {n1} ?".split(), [c1], "qa_ctx_two"
    if r == 2:
        place = rng.choice(COUNTRIES + CITIES)
        ctx = f"{n1} lives in {place} .".split()
        return ctx + f"question : where does {n1} live ?".split(), [place], "qa_ctx_place"
    if r == 3:
        food = rng.choice(FOODS)
        ctx = f"{n1} likes {food} .".split()
        return ctx + f"question : what does {n1} like ?".split(), [food], "qa_ctx_food"
    i = rng.randrange(len(ANIMALS))
    n = rng.randint(2, MAX_NUMBER)
    ctx = f"{n1} has {NUMBER_WORDS[n]} {ANIMALS_PLURAL[i]} .".split()
    return ctx + f"question : how many {ANIMALS_PLURAL[i]} does {n1} have ?".split(), [NUMBER_WORDS[n]], "qa_ctx_count"


def qa_sample(rng: random.Random) -> Sample:
    """A ``qa`` sample: a closed question or a context sentence and a question, then ``answer :`` and the answer."""
    if rng.random() < 0.5:
        q, ans, tmpl = _qa_closed(rng)
        prompt = ["question", ":"] + q + ["answer", ":"]
    else:
        q, ans, tmpl = _qa_context(rng)
        prompt = q + ["answer", ":"]
    return _sample(prompt + ans, "qa", answer=(len(prompt), len(prompt) + len(ans)), prompt_len=len(prompt),
                   template=tmpl)


def is_heldout(text: str, heldout_frac: float = 0.05, seed: int = 0) -> bool:
    """Whether ``text`` is on the held-out side of the corpus's split (:func:`.corpus.split`): a stable hash of
    the text and the seed, so identical texts always land on the same side."""
    h = hashlib.blake2b(f"{seed}\x00{text}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64 < heldout_frac


_MAKERS = {"plain": _plain, "fact": _fact, "arith": _arith, "qa": qa_sample}


def generate(n_sentences: int, seed: int = 0, mix: dict[str, float] | None = None) -> list[Sample]:
    """``n_sentences`` samples drawn with ``random.Random(seed)``; ``mix`` weights the kinds
    (default :data:`DEFAULT_MIX`; e.g. ``{"qa": 1.0}`` for the instruct slice)."""
    mix = dict(DEFAULT_MIX if mix is None else mix)
    bad = set(mix) - set(KINDS)
    if bad:
        raise ValueError(f"unknown sample kind(s) {sorted(bad)}; expected some of {KINDS}")
    if n_sentences < 0:
        raise ValueError("n_sentences must be >= 0")
    kinds = [k for k in KINDS if mix.get(k, 0) > 0]
    if not kinds:
        raise ValueError("mix has no positive weight")
    weights = [mix[k] for k in kinds]
    rng = random.Random(seed)
    out = []
    for _ in range(n_sentences):
        kind = rng.choices(kinds, weights)[0]
        out.append(_MAKERS[kind](rng))
    return out


# --------------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------------

def vocabulary() -> list[str]:
    """Every word the generator can emit (sorted); the tokenizer covers all of them."""
    words: set[str] = {w for ws in CONCEPTS.values() for w in ws}
    for lst in SLOTS.values():
        for v in lst:
            words.update(v.split())
    for t in PLAIN_TEMPLATES:
        words.update(w for w in t.split() if not w.startswith("{"))
    for _, prefix, ans, end in FACTS:
        words.update(prefix + ans + [end])
    words.update(["everyone", "knows", "that", "counting", ":", "question", "answer", "?", ".", "what",
                  "colour", "is", "the", "capital", "of", "day", "comes", "after", "opposite", "who", "my",
                  "does", "give", "us", "has", "a", "and", "lives", "in", "where", "live", "likes", "like",
                  "how", "many", "have", ",", "then", "plus", "minus", "times", "sky", "sea"])
    words.update(o for o, _ in COLOUR_FACTS)
    return sorted(words)
