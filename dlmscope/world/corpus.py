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

Generation is pure Python (``random.Random(seed)``): the same ``(n, seed)`` gives the same corpus on any
machine. Texts are the words joined by single spaces, so a whitespace/punctuation word-level tokenizer maps
words to tokens one to one (token position = word position + 1 once ``[BOS]`` is prepended).
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Iterable, Sequence

# --------------------------------------------------------------------------------------------------------
# Closed vocabularies
# --------------------------------------------------------------------------------------------------------

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "pink", "grey"]

ANIMALS = ["dog", "cat", "horse", "bird", "cow", "pig", "sheep", "lion", "tiger", "mouse", "rabbit", "bear",
           "fox", "duck", "goat", "frog", "crow", "hen", "bee", "elephant", "monkey", "owl"]
_IRREGULAR_PLURAL = {"sheep": "sheep", "mouse": "mice", "fox": "foxes"}
ANIMALS_PLURAL = [_IRREGULAR_PLURAL.get(a, a + "s") for a in ANIMALS]

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty"]
NUMBER_DIGITS = [str(i) for i in range(21)]
MAX_NUMBER = 20

#: (country, capital) pairs; both words are "place".
CAPITALS = [("france", "paris"), ("germany", "berlin"), ("italy", "rome"), ("spain", "madrid"),
            ("japan", "tokyo"), ("china", "beijing"), ("egypt", "cairo"), ("russia", "moscow"),
            ("canada", "ottawa"), ("kenya", "nairobi"), ("peru", "lima"), ("greece", "athens"),
            ("norway", "oslo"), ("poland", "warsaw"), ("india", "delhi"), ("portugal", "lisbon"),
            ("austria", "vienna"), ("ireland", "dublin"), ("sweden", "stockholm"), ("england", "london")]
COUNTRIES = [c for c, _ in CAPITALS]
CITIES = [c for _, c in CAPITALS] + ["venice", "munich", "sydney", "chicago", "boston"]

POSITIVE = ["good", "happy", "great", "lovely", "wonderful", "nice", "kind", "beautiful", "excellent",
            "pleasant", "cheerful", "brilliant", "calm", "friendly"]
NEGATIVE = ["bad", "sad", "awful", "terrible", "horrible", "nasty", "cruel", "ugly", "unpleasant", "gloomy",
            "dreadful", "angry", "rude", "boring"]
#: (positive, negative) antonym pairs for the "opposite" facts.
OPPOSITES = [("good", "bad"), ("happy", "sad"), ("beautiful", "ugly"), ("kind", "cruel"),
             ("pleasant", "unpleasant"), ("cheerful", "gloomy"), ("friendly", "rude"), ("calm", "angry"),
             ("nice", "nasty"), ("wonderful", "terrible"), ("lovely", "horrible"), ("great", "awful")]

FAMILY = ["mother", "father", "sister", "brother", "aunt", "uncle", "grandmother", "grandfather", "son",
          "daughter", "cousin", "wife", "husband", "baby"]
#: ("the X of my Y", answer) family facts.
FAMILY_FACTS = [(("mother", "father"), "grandmother"), (("father", "father"), "grandfather"),
                (("mother", "mother"), "grandmother"), (("father", "mother"), "grandfather"),
                (("sister", "mother"), "aunt"), (("brother", "mother"), "uncle"),
                (("sister", "father"), "aunt"), (("brother", "father"), "uncle"),
                (("son", "aunt"), "cousin"), (("daughter", "uncle"), "cousin")]

FOODS = ["bread", "apple", "cheese", "rice", "soup", "cake", "pizza", "banana", "egg", "milk", "carrot",
         "honey", "pasta", "salad", "tomato", "lemon", "chocolate", "potato", "cherry", "grape"]

WEATHER_NOUNS = ["rain", "snow", "wind", "fog", "storm", "thunder", "sunshine", "hail"]
WEATHER_ADJS = ["rainy", "snowy", "windy", "foggy", "stormy", "sunny", "cloudy", "icy"]
WEATHER = WEATHER_NOUNS + WEATHER_ADJS

DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september",
          "october", "november", "december"]
SEASONS = ["spring", "summer", "autumn", "winter"]
DAY_PARTS = ["morning", "afternoon", "evening", "night"]
RELATIVE_DAYS = ["today", "yesterday", "tomorrow", "tonight"]
TIME = DAYS + MONTHS + SEASONS + DAY_PARTS + RELATIVE_DAYS

#: The planted concepts. Every word belongs to at most one of them.
CONCEPTS: dict[str, list[str]] = {
    "colour": COLOURS,
    "animal": ANIMALS + [p for p in ANIMALS_PLURAL if p not in ANIMALS],
    "number": NUMBER_WORDS + NUMBER_DIGITS,
    "place": COUNTRIES + CITIES,
    "positive": POSITIVE,
    "negative": NEGATIVE,
    "family": FAMILY,
    "food": FOODS,
    "weather": WEATHER,
    "time": TIME,
}
#: Concept groups (a group's words are the union of its members').
CONCEPT_GROUPS: dict[str, list[str]] = {"sentiment": ["positive", "negative"]}

_CONCEPT_OF: dict[str, str] = {}
for _c, _ws in CONCEPTS.items():
    for _w in _ws:
        if _w in _CONCEPT_OF:
            raise AssertionError(f"word {_w!r} is in two concepts: {_CONCEPT_OF[_w]}, {_c}")
        _CONCEPT_OF[_w] = _c


def concept_of(word: str) -> str | None:
    """The planted concept of ``word`` (case-insensitive), or None for an unlabelled word."""
    return _CONCEPT_OF.get(word.lower())


# Unlabelled filler vocabularies.
NAMES = ["anna", "ben", "clara", "david", "emma", "frank", "grace", "henry", "ivy", "jack", "kate", "leo",
         "mia", "noah", "olivia", "paul", "rose", "sam", "tom", "zoe"]
OBJECTS = ["house", "car", "box", "ball", "hat", "door", "boat", "kite", "chair", "book", "cup", "bag"]
PLACES_GENERIC = ["garden", "park", "kitchen", "forest", "village", "market", "school", "field", "river",
                  "farm"]
VERBS_ANIMAL = ["fed", "saw", "found", "liked", "chased", "painted", "followed", "photographed", "watched",
                "heard"]
VERBS_FOOD = ["ate", "cooked", "bought", "shared", "wanted", "made", "liked", "sold"]
VERBS_MOVE = ["walked", "ran", "travelled", "drove", "flew", "sailed"]
ADVERBS = ["very", "really", "quite", "so", "rather"]
FEEL_VERBS = ["felt", "was", "seemed", "looked"]

#: Fact objects with a canonical colour.
COLOUR_FACTS = [("sky", "blue"), ("sea", "blue"), ("grass", "green"), ("leaf", "green"), ("snow", "white"),
                ("milk", "white"), ("coal", "black"), ("crow", "black"), ("blood", "red"), ("tomato", "red"),
                ("cherry", "red"), ("banana", "yellow"), ("lemon", "yellow"), ("carrot", "orange"),
                ("chocolate", "brown"), ("pig", "pink"), ("elephant", "grey"), ("frog", "green"),
                ("grape", "purple")]
#: (animal, food it gives).
ANIMAL_FOOD_FACTS = [("cow", "milk"), ("bee", "honey"), ("hen", "egg"), ("goat", "cheese")]
#: (season, typical weather adjective).
SEASON_WEATHER = [("winter", "snowy"), ("summer", "sunny"), ("autumn", "windy"), ("spring", "rainy")]

KINDS = ("plain", "fact", "arith", "qa")
#: Default mix of the pre-training corpus (the base DLM and the AR twin see a little Q&A, as real
#: pre-training corpora do; the instruct twin is fine-tuned on ``generate(..., mix={"qa": 1.0})``).
DEFAULT_MIX = {"plain": 0.62, "fact": 0.15, "arith": 0.15, "qa": 0.08}


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


def _num(i: int, digits: bool) -> str:
    return NUMBER_DIGITS[i] if digits else NUMBER_WORDS[i]


# --- plain templates ------------------------------------------------------------------------------------
# A template is a space-separated string; "{slot}" draws a fresh filler, "{slot#k}" reuses binding k.

_SLOTS: dict[str, list[str]] = {
    "colour": COLOURS, "animal": ANIMALS, "animals": ANIMALS_PLURAL, "country": COUNTRIES, "city": CITIES,
    "place": COUNTRIES + CITIES, "pos": POSITIVE, "neg": NEGATIVE, "sent": POSITIVE + NEGATIVE,
    "family": FAMILY, "food": FOODS, "wnoun": WEATHER_NOUNS, "wadj": WEATHER_ADJS, "day": DAYS,
    "month": MONTHS, "season": SEASONS, "part": DAY_PARTS, "rel": RELATIVE_DAYS, "name": NAMES,
    "object": OBJECTS, "spot": PLACES_GENERIC, "vanimal": VERBS_ANIMAL, "vfood": VERBS_FOOD,
    "vmove": VERBS_MOVE, "adv": ADVERBS, "feel": FEEL_VERBS,
    "count": NUMBER_WORDS[2:], "countd": NUMBER_DIGITS[2:],
    "when": ["on " + d for d in DAYS] + ["in " + m for m in MONTHS] + ["in the " + p for p in DAY_PARTS[:3]]
    + ["at night"] + RELATIVE_DAYS + ["in " + s for s in SEASONS],
}

PLAIN_TEMPLATES = [
    "the {colour} {animal} ate the {food} in {place} .",
    "my {family} has a {colour} {animal} .",
    "my {family} has {count} {animals} and a {colour} {object} .",
    "{name} has {countd} {animals} in the {spot} .",
    "{when} it was {wadj} in {place} .",
    "{when} my {family} {vanimal} a {colour} {animal} .",
    "{name} {vanimal} the {animal} near the {spot} {when} .",
    "the weather in {place} is {wadj} {rel} .",
    "there was {wnoun} in {place} on {day} .",
    "my {family} thinks the {food} is {adv} {sent} .",
    "the {food} in {place} was {adv} {sent} .",
    "{name} {feel} {sent} because the {wnoun} came {when} .",
    "{name} {vfood} {food} with her {family} {when} .",
    "{name} {vfood} {food} with his {family} in {place} .",
    "the {animal} and the {animal} played in the {wnoun} .",
    "a {pos} {animal} lives in the {spot} near {place} .",
    "a {neg} {animal} broke the {colour} {object} .",
    "{name} {vmove} to {place} with a {colour} {object} {when} .",
    "{name} {vmove} from {place} to {place} in {month} .",
    "in {season} the {spot} in {place} is {adv} {pos} .",
    "my {family} painted the {object} {colour} and {colour} .",
    "{count} {colour} {animals} sat in the {wnoun} .",
    "{name} counted {count} {animals} and {count} {animals} .",
    "the {family} of {name} likes {food} and {food} .",
    "it is {wadj} {when} , so {name} stays in the {object} .",
    "{name} says the {wnoun} in {place} is {neg} .",
    "{name} says the {colour} {food} is {pos} .",
    "on a {wadj} {part} the {animal} ate some {food} .",
    "the {colour} {object} belongs to my {family} from {place} .",
    "{name} and her {family} had {food} for dinner {when} .",
    "what a {sent} {part} in {place} !",
    "the {animals} in {place} are {colour} and {sent} .",
    "{name} bought {countd} {food} at the market on {day} .",
    "my {family} was born in {place} in {month} .",
    "the {wnoun} made the {animal} {adv} {neg} .",
    "{name} is a {pos} friend of my {family} .",
    "after the {wnoun} , the {spot} looked {sent} and {colour} .",
]


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
                value = rng.choice(_SLOTS[slot])
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

def _fact_items() -> list[tuple[str, list[str], list[str], str]]:
    """Every fact as (relation, prefix words, answer words, suffix) in its canonical phrasing."""
    items = []
    for country, city in CAPITALS:
        items.append(("capital", f"the capital of {country} is".split(), [city], "."))
    for obj, col in COLOUR_FACTS:
        items.append(("colour", f"the colour of the {obj} is".split(), [col], "."))
    for i, d in enumerate(DAYS):
        items.append(("day_after", f"the day after {d} is".split(), [DAYS[(i + 1) % 7]], "."))
    for i, m in enumerate(MONTHS):
        items.append(("month_after", f"the month after {m} is".split(), [MONTHS[(i + 1) % 12]], "."))
    for p, n in OPPOSITES:
        items.append(("opposite", f"the opposite of {p} is".split(), [n], "."))
        items.append(("opposite", f"the opposite of {n} is".split(), [p], "."))
    for (a, b), ans in FAMILY_FACTS:
        items.append(("family", f"the {a} of my {b} is my".split(), [ans], "."))
    for a, f in ANIMAL_FOOD_FACTS:
        items.append(("animal_food", f"the {a} gives us".split(), [f], "."))
    for s, w in SEASON_WEATHER:
        items.append(("season", f"in {s} the weather is often".split(), [w], "."))
    for i in range(MAX_NUMBER):
        items.append(("number_after", f"the number after {NUMBER_WORDS[i]} is".split(), [NUMBER_WORDS[i + 1]], "."))
    return items


FACTS = _fact_items()


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

def _rand_op(rng: random.Random, a: int | None = None) -> tuple[int, str, int, int]:
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


def _arith(rng: random.Random) -> Sample:
    digits = rng.random() < 0.35
    r = rng.random()
    if r < 0.6:
        a, op, b, c = _rand_op(rng)
        words = [_num(a, digits), op, _num(b, digits), "is", _num(c, digits), "."]
        return _sample(words, "arith", answer=(4, 5), template="arith_digits" if digits else "arith")
    if r < 0.8:  # chain: the second line starts from the first line's result
        a, op, b, c = _rand_op(rng)
        _, op2, d, e = _rand_op(rng, a=c)
        words = [_num(a, digits), op, _num(b, digits), "is", _num(c, digits), ".",
                 _num(c, digits), op2, _num(d, digits), "is", _num(e, digits), "."]
        return _sample(words, "arith", answer=(10, 11), template="arith_chain")
    n = rng.randint(3, 6)  # counting
    start = rng.randint(0, MAX_NUMBER + 1 - n)
    words = ["counting", ":"] + [_num(start + i, digits) for i in range(n)] + ["."]
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
        a, op, b, c = _rand_op(rng)
        digits = rng.random() < 0.35
        return ["what", "is", _num(a, digits), op, _num(b, digits), "?"], [_num(c, digits)], "qa_arith"
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


def _qa(rng: random.Random) -> Sample:
    if rng.random() < 0.5:
        q, ans, tmpl = _qa_closed(rng)
        prompt = ["question", ":"] + q + ["answer", ":"]
    else:
        q, ans, tmpl = _qa_context(rng)
        prompt = q + ["answer", ":"]
    return _sample(prompt + ans, "qa", answer=(len(prompt), len(prompt) + len(ans)), prompt_len=len(prompt),
                   template=tmpl)


_MAKERS = {"plain": _plain, "fact": _fact, "arith": _arith, "qa": _qa}


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
# Vocabulary, split, statistics
# --------------------------------------------------------------------------------------------------------

def vocabulary() -> list[str]:
    """Every word the generator can emit (sorted); the tokenizer covers all of them."""
    words: set[str] = set(_CONCEPT_OF)
    for lst in _SLOTS.values():
        for v in lst:
            words.update(v.split())
    for t in PLAIN_TEMPLATES:
        words.update(w for w in t.split() if not w.startswith("{"))
    for _, prefix, ans, end in FACTS:
        words.update(prefix + ans + [end])
    words.update(["everyone", "knows", "that", "counting", ":", "question", "answer", "?", ".", "what",
                  "colour", "is", "the", "capital", "of", "day", "comes", "after", "opposite", "who", "my",
                  "does", "give", "us", "has", "a", "and", "lives", "in", "where", "live", "likes", "like",
                  "how", "many", "have", "plus", "minus", "times", "sky", "sea"])
    words.update(o for o, _ in COLOUR_FACTS)
    return sorted(words)


def _bucket(text: str, seed: int) -> float:
    h = hashlib.blake2b(f"{seed}\x00{text}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64


def split(samples: Iterable[Sample], heldout_frac: float = 0.1, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """(train, held-out) by a stable hash of each text: identical texts land on the same side, so no
    held-out sentence occurs in training. Order within each side is preserved."""
    if not 0.0 <= heldout_frac <= 1.0:
        raise ValueError("heldout_frac must be in [0, 1]")
    train, held = [], []
    for s in samples:
        (held if is_heldout(s.text, heldout_frac, seed) else train).append(s)
    return train, held


def is_heldout(text: str, heldout_frac: float = 0.05, seed: int = 0) -> bool:
    """Whether :func:`split` with these arguments puts ``text`` on the held-out side."""
    return _bucket(text, seed) < heldout_frac


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
    import torch

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


def concept_id_table(tokenizer) -> tuple[list[str], "torch.Tensor"]:
    """``(names, table)``: ``names`` = the concept names in :data:`CONCEPTS` order and ``table[token_id]`` =
    the index of that token's concept in ``names``, or -1 (special tokens, unlabelled words). ``table[ids]``
    labels a whole batch of token ids at once (ground truth for latent-vs-concept scoring)."""
    import torch

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
    import torch

    ids = pack(samples, tokenizer, seq_len, mode="pad")
    prompt = torch.zeros_like(ids, dtype=torch.bool)
    for r, s in enumerate(samples):
        prompt[r, :1 + (s.prompt_len or 0)] = True
    return ids, prompt


# --------------------------------------------------------------------------------------------------------
# Decoding-order / steering tasks with right answers
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    """A fill-in task: ``words`` is the full solution; the words at ``answer_positions`` are hidden
    (``masked()``) and must be produced. Positions are word indices (token index = word index + 1 after
    ``[BOS]``)."""

    kind: str
    words: tuple[str, ...]
    answer_positions: tuple[int, ...]
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def text(self) -> str:
        return " ".join(self.words)

    @property
    def answers(self) -> tuple[str, ...]:
        return tuple(self.words[i] for i in self.answer_positions)

    def masked(self, mask_token: str = "[MASK]") -> list[str]:
        hidden = set(self.answer_positions)
        return [mask_token if i in hidden else w for i, w in enumerate(self.words)]

    def score(self, predicted: Sequence[str]) -> float:
        """Fraction of answer positions right; ``predicted`` is the full word sequence or just the answers."""
        if len(predicted) == len(self.words):
            got = [predicted[i] for i in self.answer_positions]
        elif len(predicted) == len(self.answer_positions):
            got = list(predicted)
        else:
            raise ValueError(f"expected {len(self.words)} words or {len(self.answer_positions)} answers, "
                             f"got {len(predicted)}")
        return sum(g.lower() == a for g, a in zip(got, self.answers)) / len(self.answer_positions)

    def encode(self, tokenizer):
        """``(input_ids, target_ids, token_positions)`` as lists: ``[BOS] masked-words [EOS]``, the full
        solution, and the token indices of the answers."""
        masked = self.masked(tokenizer.mask_token)
        inp = [tokenizer.bos_token_id] + _ids(tokenizer, masked) + [tokenizer.eos_token_id]
        tgt = [tokenizer.bos_token_id] + _ids(tokenizer, self.words) + [tokenizer.eos_token_id]
        return inp, tgt, [p + 1 for p in self.answer_positions]


TASK_KINDS = ("arith", "arith_chain", "count", "fact", "qa")


def decoding_tasks(n: int, seed: int = 0, kinds: Sequence[str] = TASK_KINDS) -> list[Task]:
    """``n`` fill-in tasks (cycling through ``kinds``) drawn with ``random.Random(seed)``:

    ``arith``        "three plus four is [M] ." (1 answer)
    ``arith_chain``  "three plus four is [M] . [M] plus two is [M] ." (the last answer depends on the first:
                     left-to-right order has it easy, an order that commits to the end first does not)
    ``count``        "counting : four five six [M] [M] ." (the answers only follow from the sequence)
    ``fact``         "the capital of france is [M] ." and the other fact relations
    ``qa``           "question : what colour is the sky ? answer : [M]" (closed and context items)"""
    bad = set(kinds) - set(TASK_KINDS)
    if bad:
        raise ValueError(f"unknown task kind(s) {sorted(bad)}; expected some of {TASK_KINDS}")
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        digits = False
        if kind == "arith":
            a, op, b, c = _rand_op(rng)
            words = [_num(a, digits), op, _num(b, digits), "is", _num(c, digits), "."]
            tasks.append(Task(kind, tuple(words), (4,), {"a": a, "op": op, "b": b}))
        elif kind == "arith_chain":
            a, op, b, c = _rand_op(rng)
            _, op2, d, e = _rand_op(rng, a=c)
            words = [_num(a, digits), op, _num(b, digits), "is", _num(c, digits), ".",
                     _num(c, digits), op2, _num(d, digits), "is", _num(e, digits), "."]
            tasks.append(Task(kind, tuple(words), (4, 6, 10), {"a": a, "op": op, "b": b, "op2": op2, "d": d}))
        elif kind == "count":
            m = rng.randint(4, 6)
            start = rng.randint(0, MAX_NUMBER + 1 - m)
            words = ["counting", ":"] + [_num(start + j, digits) for j in range(m)] + ["."]
            tasks.append(Task(kind, tuple(words), (m, m + 1), {"start": start}))
        elif kind == "fact":
            rel, prefix, ans, end = rng.choice(FACTS)
            words = prefix + ans + [end]
            tasks.append(Task(kind, tuple(words), tuple(range(len(prefix), len(prefix) + len(ans))),
                              {"relation": rel}))
        else:
            s = _qa(rng)
            tasks.append(Task(kind, s.words, tuple(range(*s.answer)), {"template": s.template,
                                                                       "prompt_len": s.prompt_len}))
    return tasks
