"""How well the world's models know the world: exact match on the scored decoding tasks.

The DLM (or the instruct twin) fills a task's answer positions with a confidence sampler at temperature 0:
everything else visible, one position committed per step — the still-masked position whose argmax token has
the highest probability — until none is left (LLaDA's ``low_confidence`` remasking with one token per step).
The AR twin decodes left to right greedily: at each answer position it takes the argmax given everything
before it (its own earlier answers included); the non-answer words of the task are given. A task counts as
right only if every answer is (exact match).

``logits_fn(input_ids [B, T], attention_mask [B, T]) -> logits [B, T, V]`` is either a bare transformers
model (the build's training loop) or a :class:`dlmscope.models.Adapter` (a DLM adapter's ``logits`` score
token ``i`` at position ``i``; an AR model's logits at ``i`` score token ``i + 1``, either way).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .tasks import SCORED_KINDS, Task

__all__ = ["fill_masked", "fill_left_to_right", "exact_match", "task_quality"]


def _encode_batch(tasks: Sequence[Task], tok) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]]]:
    """``(masked_ids, target_ids, attention_mask, answer_positions)``, right-padded to the longest task."""
    enc = [t.encode(tok) for t in tasks]
    width = max(len(inp) for inp, _, _ in enc)
    inp = torch.full((len(tasks), width), tok.pad_token_id, dtype=torch.long)
    tgt = inp.clone()
    for r, (i, t, _) in enumerate(enc):
        inp[r, :len(i)] = torch.tensor(i)
        tgt[r, :len(t)] = torch.tensor(t)
    return inp, tgt, (inp != tok.pad_token_id).long(), [pos for _, _, pos in enc]


def _logits(logits_fn, ids, att):
    if hasattr(logits_fn, "logits") and callable(logits_fn.logits):   # an Adapter: aligned logits
        return logits_fn.logits(ids, att).float()
    return logits_fn(input_ids=ids, attention_mask=att).logits.float()


@torch.no_grad()
def fill_masked(logits_fn, tasks: Sequence[Task], tok, batch: int = 256) -> list[list[int]]:
    """Token ids a masked DLM puts at each task's answer positions, committed most-confident-first."""
    out: list[list[int]] = []
    for s in range(0, len(tasks), batch):
        ids, _, att, positions = _encode_batch(tasks[s:s + batch], tok)
        masked = ids == tok.mask_token_id
        rows = torch.arange(ids.shape[0])
        while masked.any():
            probs = _logits(logits_fn, ids, att).softmax(-1)
            conf, token = probs.max(-1)                                 # [B, T]
            conf = torch.where(masked, conf, torch.full_like(conf, -1.0))
            pick = conf.argmax(-1)                                      # one position per row
            live = masked[rows, pick]
            ids[rows[live], pick[live]] = token[rows[live], pick[live]]
            masked[rows[live], pick[live]] = False
        out.extend([ids[r, pos].tolist() for r, pos in enumerate(positions)])
    return out


@torch.no_grad()
def fill_left_to_right(logits_fn, tasks: Sequence[Task], tok, batch: int = 256) -> list[list[int]]:
    """Token ids an AR model puts at each task's answer positions, greedily in position order (the logits at
    ``p - 1`` predict position ``p``)."""
    out: list[list[int]] = []
    for s in range(0, len(tasks), batch):
        ids, _, att, positions = _encode_batch(tasks[s:s + batch], tok)
        for j in range(max(len(p) for p in positions)):
            rows = torch.tensor([r for r, pos in enumerate(positions) if j < len(pos)])
            at = torch.tensor([pos[j] for pos in positions if j < len(pos)])
            logits = _logits(logits_fn, ids, att)
            ids[rows, at] = logits[rows, at - 1].argmax(-1)
        out.extend([ids[r, pos].tolist() for r, pos in enumerate(positions)])
    return out


def exact_match(tasks: Sequence[Task], predicted: Sequence[Sequence[int]], tok) -> list[bool]:
    """Per task: every answer position holds the answer's token."""
    return [list(p) == tok.convert_tokens_to_ids(list(t.answers)) for t, p in zip(tasks, predicted)]


def task_quality(logits_fn, tasks: Sequence[Task], heldout: Sequence[bool], tok, causal: bool,
                 batch: int = 256) -> dict:
    """Exact match per task kind, split into ``in_distribution`` (task text occurs in training) and
    ``heldout`` (it does not: unseen pairs, longer chains). Each cell is ``{"exact_match", "n"}``; kinds
    outside :data:`SCORED_KINDS` (neutral prompts) are skipped."""
    keep = [i for i, t in enumerate(tasks) if t.kind in SCORED_KINDS]
    tasks, heldout = [tasks[i] for i in keep], [heldout[i] for i in keep]
    fill: Callable = fill_left_to_right if causal else fill_masked
    right = exact_match(tasks, fill(logits_fn, tasks, tok, batch), tok)
    out: dict = {"in_distribution": {}, "heldout": {}}
    for split, want in (("in_distribution", False), ("heldout", True)):
        for kind in sorted({t.kind for t in tasks}):
            hits = [ok for t, h, ok in zip(tasks, heldout, right) if t.kind == kind and h == want]
            if hits:
                out[split][kind] = {"exact_match": sum(hits) / len(hits), "n": len(hits)}
    return out
