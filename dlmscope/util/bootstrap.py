"""Confidence intervals for the studies' means: a percentile bootstrap over the units that were sampled.

The units are prompts (steering) or tasks × seeds (decoding orders); values measured on the same unit under
two conditions are resampled together, so a paired difference keeps its pairing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["Interval", "bootstrap_mean", "paired_difference", "correlation"]


@dataclass(frozen=True)
class Interval:
    """A mean and its bootstrap confidence interval."""

    #: the mean over every unit (NaNs, e.g. failed judgements, dropped)
    mean: float
    #: the ``level`` percentile interval of the resampled means
    low: float
    high: float
    #: the number of units resampled
    n: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __format__(self, spec: str) -> str:
        spec = spec or "+.2f"
        return f"{self.mean:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def _tensor(values) -> torch.Tensor:
    """float64, with ``None`` (a failed measurement) as NaN."""
    if isinstance(values, torch.Tensor):
        return values.to(torch.float64)
    rows = values if values and isinstance(values[0], (list, tuple)) else [values]
    t = torch.tensor([[float("nan") if x is None else float(x) for x in r] for r in rows], dtype=torch.float64)
    return t if rows is values else t[0]


def bootstrap_mean(values, *, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> Interval:
    """The mean of ``values`` and its bootstrap interval. ``values`` is ``[U]`` or ``[G, U]``: with groups
    (e.g. one row per steered concept over the same prompts), the statistic is the mean over all cells and a
    resample draws units (columns), keeping each unit's values across groups together. NaN cells are
    ignored (``None`` counts as NaN)."""
    v = _tensor(values)
    if v.dim() == 1:
        v = v[None]
    if v.dim() != 2 or v.shape[1] == 0:
        raise ValueError(f"values must be [units] or [groups, units] with at least one unit, got {tuple(v.shape)}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    U = v.shape[1]
    ok = ~torch.isnan(v)
    filled = torch.where(ok, v, 0.0)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, U, (resamples, U), generator=gen)                     # [R, U] units drawn
    sums = filled[:, idx].sum(dim=(0, 2))                                       # [R]
    counts = ok[:, idx].sum(dim=(0, 2)).to(torch.float64)
    means = sums / counts                                                      # NaN where a draw has no value
    means = means[~torch.isnan(means)]
    total = ok.sum()
    mean = float(filled.sum() / total) if total else float("nan")
    if means.numel() == 0:
        return Interval(mean, float("nan"), float("nan"), U)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(means, q).tolist()
    return Interval(mean, low, high, U)


def paired_difference(before: Sequence, after: Sequence, **kw) -> Interval:
    """``bootstrap_mean(after − before)``: both ``[U]`` or ``[G, U]``, measured on the same units."""
    b, a = _tensor(before), _tensor(after)
    if a.shape != b.shape:
        raise ValueError(f"before {tuple(b.shape)} and after {tuple(a.shape)} must have the same shape")
    return bootstrap_mean(a - b, **kw)


def _pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson r along the last dim (NaN where either side is constant)."""
    x = x - x.mean(-1, keepdim=True)
    y = y - y.mean(-1, keepdim=True)
    return (x * y).sum(-1) / (x.pow(2).sum(-1).sqrt() * y.pow(2).sum(-1).sqrt())


def correlation(x: Sequence, y: Sequence, *, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> Interval:
    """Pearson's r between ``x`` and ``y`` (one value per unit; units where either is NaN / None dropped)
    with a bootstrap interval over units. NaN when fewer than 3 units remain or a side is constant."""
    a, b = _tensor(x), _tensor(y)
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"x and y must be 1-d and of the same length, got {tuple(a.shape)} and {tuple(b.shape)}")
    keep = ~(torch.isnan(a) | torch.isnan(b))
    a, b = a[keep], b[keep]
    U = a.numel()
    if U < 3:
        return Interval(float("nan"), float("nan"), float("nan"), U)
    r = float(_pearson(a, b))
    idx = torch.randint(0, U, (resamples, U), generator=torch.Generator().manual_seed(seed))
    rs = _pearson(a[idx], b[idx])
    rs = rs[~torch.isnan(rs)]
    if rs.numel() == 0 or r != r:
        return Interval(r, float("nan"), float("nan"), U)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(rs, q).tolist()
    return Interval(r, low, high, U)
