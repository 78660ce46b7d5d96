"""The demo's crosscoder section: which latents the instruct fine-tune created or removed, against two nulls.

At ``cfg.crosscoder_layers``, ``cfg.crosscoder_seeds`` crosscoders (the world's n and k_ref, BatchTopK) are trained
on paired ``cfg.crosscoder_policy`` activations of the base DLM and the instruct twin — one forward of each on the
same corrupted tokens of the pre-training text interleaved 1:1 with the world's Q&A prompts, the instruct twin's
SFT mix — and the same for the base DLM and the placebo twin (the base fine-tuned with the instruct recipe on base
text only: the count null). :func:`dlmscope.jobs.crosscoder.run_crosscoder_diff` scores them on held-out
pre-training text and held-out Q&A text (the fine-tune's own).
"""
from __future__ import annotations

from dlmscope.jobs.crosscoder import run_crosscoder_diff
from dlmscope.jobs.transfer import world_qa_batches
from .config import DemoConfig

__all__ = ["run_crosscoder_section"]


def run_crosscoder_section(adapters: dict, batches: tuple, cfg: DemoConfig) -> dict:
    """``adapters`` holds ``dlm``, ``instruct`` and ``placebo``; ``batches`` the demo's ``(train, heldout)``."""
    tok = adapters["dlm"].tokenizer
    # training Q&A drawn with another seed than the held-out Q&A (the transfer section's own text)
    own = tuple(world_qa_batches(tok, seq_len=cfg.seq_len, lm_batch=cfg.lm_batch, seed=s)
                for s in (cfg.seed + 1, cfg.seed))
    return run_crosscoder_diff(adapters["dlm"], adapters["instruct"], list(cfg.crosscoder_layers),
                               placebo=adapters["placebo"], policy=cfg.crosscoder_policy, n_latents=cfg.n_latents,
                               k=cfg.k_ref, train_tokens=cfg.crosscoder_tokens, eval_tokens=cfg.crosscoder_eval_tokens,
                               epochs=cfg.crosscoder_epochs, seeds=cfg.crosscoder_seeds, seed=cfg.seed,
                               batches=batches, own_batches=own, batch_size=cfg.sae_batch, lr=cfg.lr,
                               warmup_steps=cfg.warmup_steps, dead_tokens=cfg.dead_tokens)
