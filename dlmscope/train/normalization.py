"""The scalar ``s`` the trainer divides activations by (``TrainConfig.normalization``), estimated once at the start.

Two statistics over the first ``norm_batches`` batches of every rank of the data group:

- ``"centred"`` (the default): ``s = sqrt(mean_b |x_b - mean x|^2)``, the root of the total variance. On ``x / s``
  the variance an SAE has to explain is 1 whatever the stream's mean, so the reconstruction MSE (in units of
  ``s^2``) and the AuxK term (normalised by the residual's own variance, so scale-free) keep the balance that the
  AuxK weight 1/32 was chosen for. Adding a constant vector to the stream changes only ``b_dec``.
- ``"rms"`` (the paper's code, docs/reference.md §2): ``s = sqrt(mean_b |x_b|^2)``. It exceeds the centred ``s``
  by ``sqrt(1 + |mean|^2 / variance)``, so where the mean dominates the MSE term shrinks by that factor squared
  while AuxK does not: once a latent is dead, AuxK outweighs the reconstruction and training degrades (the world
  DLM's block-0 Mask-SAEs, where ``|mean|^2 / variance`` is about 2,200: docs/block0_mask_sae.md).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from dlmscope.util import distributed as D

__all__ = ["NORMALIZATIONS", "norm_factor"]

#: the statistics :func:`norm_factor` knows, the default first
NORMALIZATIONS = ("centred", "rms")
#: a centred variance at most this fraction of the mean square is float rounding, not structure
MIN_RELATIVE_VARIANCE = 1e-10


@torch.no_grad()
def norm_factor(batches: list[Tensor], kind: str = "centred", group=None) -> float:
    """``s`` (see the module docstring) of the rows of ``batches`` (each ``[B, d]``) on every rank of ``group``
    (None: all ranks), in float64. Raises ValueError where ``s`` is not a finite positive number, or where
    ``kind="centred"`` and the rows are all equal (up to float rounding): there is nothing for an SAE to learn."""
    if kind not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {kind!r}")
    d, device = batches[0].shape[1], batches[0].device
    acc = torch.zeros(d + 2, dtype=torch.float64, device=device)  # (Σ_b x_b, Σ_b |x_b|², rows)
    for x in batches:
        xd = x.double()
        acc[:d] += xd.sum(0)
        acc[d] += xd.pow(2).sum()
        acc[d + 1] += x.shape[0]
    D.all_reduce_(acc, group=group)
    rows = float(acc[d + 1])
    mean_sq = float(acc[d]) / rows if rows > 0 else math.nan
    if not math.isfinite(mean_sq) or mean_sq <= 0:
        raise ValueError(f"cannot normalise activations: mean squared norm is {mean_sq}")
    if kind == "rms":
        return math.sqrt(mean_sq)
    # a second pass around the global mean: Σ|x|² - rows·|mean|² would cancel where the mean dwarfs the variance
    mean = acc[:d] / rows
    spread = torch.zeros(1, dtype=torch.float64, device=device)
    for x in batches:
        spread += (x.double() - mean).pow(2).sum()
    D.all_reduce_(spread, group=group)
    variance = float(spread) / rows
    if not math.isfinite(variance) or variance <= MIN_RELATIVE_VARIANCE * mean_sq:
        raise ValueError(f"cannot normalise activations by their spread: total variance {variance:.3g} against a "
                         f"mean squared norm {mean_sq:.3g} over {int(rows)} rows (the rows are equal up to rounding, "
                         "nothing for an SAE to learn); normalization='rms' or normalize_activations=False trains "
                         "on them anyway")
    return math.sqrt(variance)
