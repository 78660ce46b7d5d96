"""Quality numbers of the world's trained models (stored as ``world.json["models"]``): masked-token accuracy,
perplexity against a unigram model, one-shot Q&A, and exact match per decoding-task kind (:mod:`.quality`)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import corpus as C
from .objectives import diffusion_mask, is_causal
from .quality import task_quality

__all__ = ["unigram_counts", "masked_accuracy", "ar_perplexity", "qa_accuracy", "evaluate_models",
           "quality_summary"]


def unigram_counts(ids: torch.Tensor, vocab_size: int, pad_id: int) -> torch.Tensor:
    flat = ids.flatten()
    flat = flat[flat != pad_id]
    return torch.bincount(flat, minlength=vocab_size).double()


@torch.no_grad()
def _logits(model, ids, attention_mask=None, chunk=64):
    out = [model(input_ids=ids[i:i + chunk],
                 attention_mask=None if attention_mask is None else attention_mask[i:i + chunk]).logits.float()
           for i in range(0, ids.shape[0], chunk)]
    return torch.cat(out)


@torch.no_grad()
def masked_accuracy(model, ids, rate: float, mask_id: int, pad_id: int, unigram: torch.Tensor, seed: int = 0):
    """Masked-token accuracy at mask rate ``rate`` (argmax at masked positions; position 0 never masked), with
    the unigram baseline (always predict the most frequent training token) on the same positions, and the
    mean masked CE (nats)."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.full((ids.shape[0],), float(rate))
    noisy, masked = diffusion_mask(ids, t, gen, mask_id, pad_id)
    logits = _logits(model, noisy)
    tgt = ids[masked]
    pred = logits[masked].argmax(-1)
    ce = F.cross_entropy(logits[masked], tgt).item()
    return {"accuracy": (pred == tgt).double().mean().item(),
            "unigram_accuracy": (tgt == int(unigram.argmax())).double().mean().item(),
            "ce": ce, "n_masked": int(masked.sum())}


@torch.no_grad()
def ar_perplexity(model, ids, unigram: torch.Tensor):
    """Next-token perplexity of the AR model on ``ids`` vs a unigram model (training counts, add-one)."""
    logits = _logits(model, ids)[:, :-1]
    tgt = ids[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1)).item()
    p = (unigram + 1) / (unigram + 1).sum()
    uni = -(p.log()[tgt.flatten()]).mean().item()
    acc = (logits.argmax(-1) == tgt).double().mean().item()
    return {"ppl": math.exp(ce), "unigram_ppl": math.exp(uni), "next_token_accuracy": acc}


@torch.no_grad()
def qa_accuracy(model, samples, tok, seq_len: int):
    """Exact-match accuracy on Q&A items: ``[BOS] prompt [MASK]*len(answer) [EOS]`` (padded), one-shot argmax
    at the answer positions."""
    ids, prompt = C.encode_prompted(samples, tok, seq_len)
    answer = ~prompt & (ids != tok.pad_token_id) & (ids != tok.eos_token_id)
    noisy = torch.where(answer, torch.full_like(ids, tok.mask_token_id), ids)
    att = (ids != tok.pad_token_id).long()
    pred = _logits(model, noisy, att).argmax(-1)
    ok = ((pred == ids) | ~answer).all(1)
    return {"accuracy": ok.double().mean().item(), "n": len(samples)}


def evaluate_models(dlm, ar, instruct, world, tok, tc, ar_matched=None, placebo=None) -> dict:
    """The metrics of ``world.json["models"]`` (``tc``: the build's :class:`~.train_models.TrainConfig`); the
    budget-matched AR twin's perplexity and exact match when ``ar_matched`` is given, the placebo twin's Q&A
    accuracy and exact match (as the instruct twin's) when ``placebo`` is."""
    train_ids = C.pack(world.train, tok, tc.seq_len)
    unigram = unigram_counts(train_ids, len(tok), tok.pad_token_id)
    held = C.pack(world.heldout, tok, tc.seq_len)[:tc.eval_rows]
    out: dict = {"heldout_rows": int(held.shape[0]), "seq_len": tc.seq_len}
    out["dlm_masked"] = {f"t={r}": masked_accuracy(dlm, held, r, tok.mask_token_id, tok.pad_token_id, unigram,
                                                   seed=tc.seed + 100) for r in tc.eval_mask_rates}
    out["ar"] = ar_perplexity(ar, held, unigram)
    if ar_matched is not None:
        out["ar_matched"] = ar_perplexity(ar_matched, held, unigram)
    qa = world.instruct_heldout
    named = {"dlm": dlm, "ar": ar, "instruct": instruct, "ar_matched": ar_matched, "placebo": placebo}
    out["qa_accuracy"] = {name: qa_accuracy(named[name], qa, tok, tc.sft_seq_len)
                          for name in ("dlm", "instruct", "placebo") if named[name] is not None}
    heldout = [C.task_heldout(t, world.config.heldout_frac, world.config.seed) for t in world.tasks]
    out["quality"] = {name: task_quality(model, world.tasks, heldout, tok, causal=is_causal(model))
                      for name, model in named.items() if model is not None}
    return out


def quality_summary(quality: dict, prefix: str = "[world] ") -> str:
    """One line per model: in-distribution exact match per task kind, then the held-out tasks'."""
    return "\n".join(f"{prefix}{name}: " + ", ".join(f"{k} {v['exact_match']:.2f}"
                                                                 for k, v in q["in_distribution"].items())
                     + " | held out: " + ", ".join(f"{k} {v['exact_match']:.2f}" for k, v in q["heldout"].items())
                     for name, q in quality.items())
