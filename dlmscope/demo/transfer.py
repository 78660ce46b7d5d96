"""The demo's post-training stability section: base-DLM SAEs on the instruct twin, the AR twin as control.

At ``cfg.transfer_layers``, Unmask-policy SAEs (n and k_ref of the demo) are trained on the base DLM, the instruct
twin and the AR twin (clean text) from one shared initialisation, on the demo's text, and compared with
:func:`dlmscope.jobs.transfer.run_transfer`.
"""
from __future__ import annotations

from dlmscope.jobs.transfer import run_transfer
from .config import DemoConfig

__all__ = ["run_transfer_section"]


def run_transfer_section(adapters: dict, batches: tuple, cfg: DemoConfig) -> dict:
    """``adapters`` holds ``dlm``, ``instruct`` and ``ar``; ``batches`` the demo's ``(train, heldout)``."""
    train = cfg.train_config()
    return run_transfer(adapters["dlm"], adapters["instruct"], list(cfg.transfer_layers), policy="unmask",
                        n_latents=cfg.n_latents, k=cfg.k_ref, train_tokens=cfg.transfer_tokens,
                        eval_tokens=cfg.transfer_eval_tokens, delta_batches=cfg.transfer_delta_batches,
                        seed=cfg.seed, control=adapters["ar"], batches=batches, train=train,
                        sae_batch=cfg.sae_batch)
