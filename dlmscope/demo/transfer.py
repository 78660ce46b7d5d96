"""The demo's post-training stability section: base-DLM SAEs on the instruct twin, the AR twin as control.

At ``cfg.transfer_layers``, Unmask-policy SAEs (n and k_ref of the demo) are trained on the demo's text: two on
the base DLM from different init seeds (the seed-to-seed ceiling), one on the instruct twin and one on the AR twin
(clean text), each from its own init seed (:data:`dlmscope.jobs.transfer.INIT_OFFSETS`), the base, second-base and
instruct SAEs in ``cfg.transfer_seeds`` seed replicates (the FVE ratio judged over them), and compared with
:func:`dlmscope.jobs.transfer.run_transfer` on held-out pre-training text and on the instruct twin's own
distribution (the world's Q&A prompts, :func:`~dlmscope.jobs.transfer.world_qa_batches`), each read against the
ceiling and a random-SAE null.
"""
from __future__ import annotations

from dlmscope.jobs.transfer import run_transfer, world_qa_batches
from .config import DemoConfig

__all__ = ["run_transfer_section"]


def run_transfer_section(adapters: dict, batches: tuple, cfg: DemoConfig) -> dict:
    """``adapters`` holds ``dlm``, ``instruct`` and ``ar``; ``batches`` the demo's ``(train, heldout)``."""
    train = cfg.train_config()
    own = world_qa_batches(adapters["dlm"].tokenizer, seq_len=cfg.seq_len, lm_batch=cfg.lm_batch, seed=cfg.seed)
    return run_transfer(adapters["dlm"], adapters["instruct"], list(cfg.transfer_layers), policy="unmask",
                        n_latents=cfg.n_latents, k=cfg.k_ref, train_tokens=cfg.transfer_tokens,
                        eval_tokens=cfg.transfer_eval_tokens, delta_batches=cfg.transfer_delta_batches,
                        seed=cfg.seed, control=adapters["ar"], batches=batches, own_batches=own, train=train,
                        sae_batch=cfg.sae_batch, seeds=cfg.transfer_seeds)
