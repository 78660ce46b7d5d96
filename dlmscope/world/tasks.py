"""Decoding-order and steering tasks: fill-in items with known answers and known answer positions.

A :class:`Task` is a full solution plus the word positions to hide; a model fills them and
:meth:`Task.score` grades the fill. :func:`decoding_tasks` draws them from the same facts, arithmetic and
Q&A makers as the corpus (:mod:`.samples`), so the answers are ones the corpus teaches.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

from .samples import number_word, qa_sample, rand_op
from .templates import FACTS, MAX_NUMBER


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


#: The task kinds :func:`decoding_tasks` cycles through by default.
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
            a, op, b, c = rand_op(rng)
            words = [number_word(a, digits), op, number_word(b, digits), "is", number_word(c, digits), "."]
            tasks.append(Task(kind, tuple(words), (4,), {"a": a, "op": op, "b": b}))
        elif kind == "arith_chain":
            a, op, b, c = rand_op(rng)
            _, op2, d, e = rand_op(rng, a=c)
            words = [number_word(a, digits), op, number_word(b, digits), "is", number_word(c, digits), ".",
                     number_word(c, digits), op2, number_word(d, digits), "is", number_word(e, digits), "."]
            tasks.append(Task(kind, tuple(words), (4, 6, 10), {"a": a, "op": op, "b": b, "op2": op2, "d": d}))
        elif kind == "count":
            m = rng.randint(4, 6)
            start = rng.randint(0, MAX_NUMBER + 1 - m)
            words = ["counting", ":"] + [number_word(start + j, digits) for j in range(m)] + ["."]
            tasks.append(Task(kind, tuple(words), (m, m + 1), {"start": start}))
        elif kind == "fact":
            rel, prefix, ans, end = rng.choice(FACTS)
            words = prefix + ans + [end]
            tasks.append(Task(kind, tuple(words), tuple(range(len(prefix), len(prefix) + len(ans))),
                              {"relation": rel}))
        else:
            s = qa_sample(rng)
            tasks.append(Task(kind, s.words, tuple(range(*s.answer)), {"template": s.template,
                                                                       "prompt_len": s.prompt_len}))
    return tasks
