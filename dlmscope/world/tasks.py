"""Decoding-order and steering tasks: fill-in items with known answers and known answer positions.

A :class:`Task` is a full solution plus the word positions to hide; a model fills them and
:meth:`Task.score` grades the fill. :func:`decoding_tasks` draws them from the same facts, arithmetic and
Q&A makers as the corpus (:mod:`.samples`), so the answers are ones the corpus teaches.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Sequence

from .samples import COUNT_LENGTH, chain_words, is_heldout, number_word, qa_sample, rand_op
from .templates import FACTS, MAX_NUMBER, NAMES, TOPICS


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
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        inp = [bos] + tokenizer.convert_tokens_to_ids(masked) + [eos]
        tgt = [bos] + tokenizer.convert_tokens_to_ids(list(self.words)) + [eos]
        return inp, tgt, [p + 1 for p in self.answer_positions]


#: The scored task kinds :func:`decoding_tasks` cycles through by default. ``chain3`` never occurs in the
#: corpus (its chains have two steps): a composition, always held out.
SCORED_KINDS = ("arith", "arith_chain", "count", "fact", "qa", "chain3")
#: Kinds whose task text never occurs in training, whatever the hash split says.
COMPOSITION_KINDS = ("chain3",)
#: Every kind: the scored ones plus ``neutral`` prompts for steering (any concept may fill the slot; not scored).
TASK_KINDS = SCORED_KINDS + ("neutral",)
#: The templates of the neutral prompts (``{}`` is the open slot); the corpus has them as plain sentences
#: whose slot takes a word of any concept (``templates.TOPICS``).
NEUTRAL_TEMPLATES = ("{name} wrote a story about {topic} .", "{name} talked about {topic} all day .")


def _chain(rng: random.Random, steps: int) -> tuple[list[str], tuple[int, ...]]:
    """A chain of ``steps`` operations with every result and every repeated result hidden."""
    words = chain_words(rng, steps)
    answers = [4] + [p for p in range(7, len(words), 7) for p in (p, p + 4)]
    return words, tuple(answers)


def decoding_tasks(n: int, seed: int = 0, kinds: Sequence[str] = TASK_KINDS) -> list[Task]:
    """``n`` fill-in tasks (cycling through ``kinds``) drawn with ``random.Random(seed)``:

    ``arith``        "three plus four is [M] ." (1 answer)
    ``arith_chain``  "three plus four is [M] , then [M] plus two is [M] ." (the last answer depends on the
                     first: left-to-right order has it easy, an order that commits to the end first does not)
    ``count``        "counting : four five [M] [M] [M] ." (counting continued over 2–4 positions)
    ``fact``         "the capital of france is [M] ." and the other fact relations
    ``qa``           "question : what colour is the sky ? answer : [M]" (closed and context items)
    ``chain3``       a three-step chain, 5 answers (never in the corpus: a held-out composition)
    ``neutral``      "anna wrote a story about [M] ." — any concept fits the slot (steering prompts); the
                     stored answer is one draw, not a right answer, and the kind is not scored"""
    bad = set(kinds) - set(TASK_KINDS)
    if bad:
        raise ValueError(f"unknown task kind(s) {sorted(bad)}; expected some of {TASK_KINDS}")
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind == "arith":
            a, op, b, c = rand_op(rng)
            words = [number_word(a, False), op, number_word(b, False), "is", number_word(c, False), "."]
            tasks.append(Task(kind, tuple(words), (4,), {"a": a, "op": op, "b": b}))
        elif kind in ("arith_chain", "chain3"):
            words, answers = _chain(rng, 2 if kind == "arith_chain" else 3)
            tasks.append(Task(kind, tuple(words), answers))
        elif kind == "count":
            start = rng.randint(0, MAX_NUMBER + 1 - COUNT_LENGTH)
            shown = rng.randint(1, 3)
            words = ["counting", ":"] + [number_word(start + j, False) for j in range(COUNT_LENGTH)] + ["."]
            tasks.append(Task(kind, tuple(words), tuple(range(2 + shown, 2 + COUNT_LENGTH)), {"start": start}))
        elif kind == "fact":
            rel, prefix, ans, end = rng.choice(FACTS)
            words = prefix + ans + [end]
            tasks.append(Task(kind, tuple(words), tuple(range(len(prefix), len(prefix) + len(ans))),
                              {"relation": rel}))
        elif kind == "qa":
            s = qa_sample(rng)
            tasks.append(Task(kind, s.words, tuple(range(*s.answer)), {"template": s.template,
                                                                       "prompt_len": s.prompt_len}))
        else:
            template = rng.choice(NEUTRAL_TEMPLATES)
            words = template.format(name=rng.choice(NAMES), topic=rng.choice(TOPICS)).split()
            slot = template.split().index("{topic}")
            tasks.append(Task(kind, tuple(words), (slot,), {"template": template, "open": True}))
    return tasks


def task_heldout(task: Task, heldout_frac: float, seed: int) -> bool:
    """Whether ``task``'s full text is absent from training: on the held-out side of the corpus's hash split,
    or a composition kind the corpus never contains."""
    return task.kind in COMPOSITION_KINDS or is_heldout(task.text, heldout_frac, seed)


def task_record(task: Task, heldout: bool) -> str:
    """One line of ``tasks.jsonl`` (sorted keys; :func:`load_tasks` reads it back)."""
    return json.dumps({"kind": task.kind, "words": list(task.words), "answer_positions": list(task.answer_positions),
                       "answers": list(task.answers), "meta": task.meta, "heldout": heldout}, sort_keys=True)


def load_tasks(path) -> tuple[list[Task], list[bool]]:
    """``(tasks, heldout flags)`` from a ``tasks.jsonl`` written by the world build."""
    tasks, heldout = [], []
    with open(path) as f:
        for line in f:
            t = json.loads(line)
            tasks.append(Task(t["kind"], tuple(t["words"]), tuple(t["answer_positions"]), t["meta"]))
            heldout.append(bool(t["heldout"]))
    return tasks, heldout
