"""Learning-rate schedule of the paper's code: linear warmup from 0, constant, linear decay to 0 at the end."""
from __future__ import annotations


def lr_factor(step: int, total_steps: int, warmup_steps: int = 1000, decay_fraction: float = 0.2) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``.

    ``step / warmup_steps`` during the first ``warmup_steps`` steps (so step 0 has lr 0, as a ``LambdaLR`` with
    the same lambda gives), then 1, and from ``decay_start = int(total_steps * (1 - decay_fraction))`` on
    ``(total_steps - step) / (total_steps - decay_start)``, which reaches ``1/(total_steps - decay_start)`` at the
    last step. Where warmup and decay overlap (short runs) the smaller factor wins.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= decay_fraction <= 1.0:
        raise ValueError(f"decay_fraction must lie in [0, 1], got {decay_fraction}")
    factor = 1.0
    if step < warmup_steps:
        factor = step / warmup_steps
    decay_start = int(total_steps * (1.0 - decay_fraction))
    if decay_fraction > 0 and step >= decay_start:
        factor = min(factor, max(total_steps - step, 0) / (total_steps - decay_start))
    return factor


def lr_at(step: int, total_steps: int, lr: float, warmup_steps: int = 1000, decay_fraction: float = 0.2) -> float:
    """The learning rate at ``step``: ``lr * lr_factor(...)``."""
    return lr * lr_factor(step, total_steps, warmup_steps, decay_fraction)
