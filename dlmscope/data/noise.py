"""The masked-diffusion corruption process (docs/reference.md §3, §4), shared by harvesting and the ΔLM losses.

Per LM batch one masking rate ``t ~ U[t_min, t_max]`` is drawn (defaults 0.05 / 0.5); every non-pad position
except position 0 is then replaced by the mask token independently with probability ``t``. Pad positions
(``attention_mask == 0``) are never masked; without an attention mask every position counts as text.

Random numbers are drawn on the generator's device (CPU when no generator is given), so with host-side tokens
the masked positions are known on the host without a device sync.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["T_MIN", "T_MAX", "generator_device", "check_t_range", "draw_t", "valid_positions", "corrupt"]

#: The paper's masking-rate range.
T_MIN, T_MAX = 0.05, 0.5


def generator_device(generator: torch.Generator | None) -> torch.device:
    """Where ``generator`` draws (CPU for None, torch's default generator)."""
    return generator.device if generator is not None else torch.device("cpu")


def check_t_range(t_min: float, t_max: float) -> tuple[float, float]:
    """``(t_min, t_max)`` as floats if ``0 < t_min <= t_max <= 1``, else a ValueError naming both."""
    t_min, t_max = float(t_min), float(t_max)
    if not 0.0 < t_min <= t_max <= 1.0:
        raise ValueError(f"need 0 < t_min <= t_max <= 1, got t_min={t_min}, t_max={t_max}")
    return t_min, t_max


def draw_t(t_min: float, t_max: float, generator: torch.Generator | None = None) -> float:
    """One masking rate ``t ~ U[t_min, t_max]`` as a host float (no device sync with a CPU generator)."""
    u = torch.rand((), generator=generator, device=generator_device(generator))
    return t_min + (t_max - t_min) * float(u)


def valid_positions(input_ids: Tensor, attention_mask: Tensor | None, device=None) -> Tensor:
    """Bool ``[B, T]``: the non-pad positions (all of them without an attention mask), on ``device``."""
    device = input_ids.device if device is None else device
    if attention_mask is None:
        return torch.ones(input_ids.shape, dtype=torch.bool, device=device)
    return attention_mask.to(device=device) != 0


def corrupt(
    input_ids: Tensor,
    attention_mask: Tensor | None,
    mask_token_id: int,
    t: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Mask every non-pad position except position 0 of ``input_ids [B, T]`` independently with probability ``t``.

    Returns ``(noisy_ids [B, T], masked [B, T] bool)`` on ``input_ids``' device; the random draw happens on the
    generator's device (CPU when ``generator`` is None).
    """
    gdev = generator_device(generator)
    u = torch.rand(input_ids.shape, generator=generator, device=gdev)
    eligible = valid_positions(input_ids, attention_mask, gdev)
    eligible[:, 0] = False
    masked = (u < t) & eligible
    masked = masked.to(input_ids.device, non_blocking=True)
    noisy = input_ids.masked_fill(masked, int(mask_token_id))
    return noisy, masked
