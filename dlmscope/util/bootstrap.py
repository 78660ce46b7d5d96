"""Confidence intervals for the studies' means: a percentile bootstrap over the units that were sampled.

An interval is over the units the claim is about. :func:`bootstrap_mean` resamples one kind of unit (prompts, or
tasks × seeds) and holds any groups fixed; :func:`bootstrap_crossed` resamples every sampled factor at once
(SAE seeds × concepts or latents × prompts), each axis independently, for a claim about the population behind
each factor. Values measured on the same unit under two conditions are resampled together, so a paired
difference keeps its pairing. Every :class:`Interval` names what it was resampled over (``over``).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = ["Interval", "bootstrap_mean", "bootstrap_crossed", "paired_difference", "two_sample_difference",
           "correlation", "side_of_zero", "spread"]


@dataclass(frozen=True)
class Interval:
    """A mean and its bootstrap confidence interval."""

    #: the mean over every unit (NaNs, e.g. failed judgements, dropped)
    mean: float
    #: the ``level`` percentile interval of the resampled means
    low: float
    high: float
    #: the number of units resampled (for a crossed bootstrap, the cells: the product of ``over``'s sizes)
    n: int
    #: what was resampled: axis name -> its size, e.g. ``{"concepts": 10, "prompts": 64}``
    over: dict = field(default_factory=dict)

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __format__(self, spec: str) -> str:
        spec = spec or "+.2f"
        return f"{self.mean:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def _nan_for_none(values):
    """``values`` (numbers, or lists of them nested to any depth) with ``None`` as NaN."""
    if isinstance(values, (list, tuple)):
        return [_nan_for_none(v) for v in values]
    return float("nan") if values is None else float(values)


def _tensor(values) -> torch.Tensor:
    """float64, with ``None`` (a failed measurement) as NaN; nested lists of any depth (a ragged one is refused
    by torch, naming its shape)."""
    if isinstance(values, torch.Tensor):
        return values.to(torch.float64)
    return torch.tensor(_nan_for_none(values), dtype=torch.float64)


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")


def _percentiles(means: torch.Tensor, level: float) -> tuple[float, float]:
    """The ``level`` percentile interval of the resampled statistics (NaN draws dropped; NaN if none is left)."""
    means = means[~torch.isnan(means)]
    if means.numel() == 0:
        return float("nan"), float("nan")
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(means, q).tolist()
    return low, high


def bootstrap_crossed(values, axes: Sequence[str], *, level: float = 0.95, resamples: int = 2000,
                      seed: int = 0) -> Interval:
    """The mean of ``values`` ``[A_1, ..., A_m]`` and its bootstrap interval with every axis resampled.

    ``axes`` names the m sampled factors (e.g. ``("seeds", "concepts", "prompts")``); the design is crossed
    (each prompt measured under every concept, with every seed), so each resample draws every axis's levels
    independently with replacement and takes the mean over the drawn cells. The interval then covers the
    variation of every factor: an effect carried by a few concepts is uncertain however many prompts there are.
    NaN cells (``None`` too) are ignored. A factor with one level cannot be resampled and adds no width: say so.
    """
    v = _tensor(values)
    axes = tuple(axes)
    if v.dim() != len(axes) or v.numel() == 0:
        raise ValueError(f"values {tuple(v.shape)} must have one non-empty axis per name in axes={axes}")
    _check_level(level)
    ok = ~torch.isnan(v)
    filled = torch.where(ok, v, 0.0)
    total = ok.sum()
    mean = float(filled.sum() / total) if total else float("nan")
    gen = torch.Generator().manual_seed(seed)
    draws = [torch.randint(0, size, (resamples, size), generator=gen) for size in v.shape]   # [R, A_i] per axis
    m = v.dim()
    chunk = max(1, 2 ** 22 // max(1, v.numel()))   # resamples per pass: ~4M cells gathered at a time
    means = []
    for start in range(0, resamples, chunk):
        index = tuple(d[start:start + chunk].view(-1, *[d.shape[1] if j == i else 1 for j in range(m)])
                      for i, d in enumerate(draws))                                    # broadcast to [Rc, A_1..A_m]
        sums = filled[index].flatten(1).sum(1)
        counts = ok[index].flatten(1).sum(1).to(torch.float64)
        means.append(sums / counts)
    low, high = _percentiles(torch.cat(means), level)
    return Interval(mean, low, high, v.numel(), dict(zip(axes, v.shape)))


def bootstrap_mean(values, *, level: float = 0.95, resamples: int = 2000, seed: int = 0,
                   unit: str = "units") -> Interval:
    """The mean of ``values`` and its bootstrap interval over ``unit`` (its name, for ``Interval.over``).
    ``values`` is ``[U]`` or ``[G, U]``: with groups (e.g. one row per steered concept over the same prompts),
    the statistic is the mean over all cells and a resample draws units (columns), keeping each unit's values
    across groups together; the groups are held fixed (use :func:`bootstrap_crossed` to resample them too).
    NaN cells are ignored (``None`` counts as NaN)."""
    v = _tensor(values)
    if v.dim() == 1:
        v = v[None]
    if v.dim() != 2 or v.shape[1] == 0:
        raise ValueError(f"values must be [units] or [groups, units] with at least one unit, got {tuple(v.shape)}")
    _check_level(level)
    U = v.shape[1]
    ok = ~torch.isnan(v)
    filled = torch.where(ok, v, 0.0)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, U, (resamples, U), generator=gen)                     # [R, U] units drawn
    sums = filled[:, idx].sum(dim=(0, 2))                                       # [R]
    counts = ok[:, idx].sum(dim=(0, 2)).to(torch.float64)
    means = sums / counts                                                      # NaN where a draw has no value
    total = ok.sum()
    mean = float(filled.sum() / total) if total else float("nan")
    low, high = _percentiles(means, level)
    return Interval(mean, low, high, U, {unit: U})


def paired_difference(before: Sequence, after: Sequence, *, axes: Sequence[str] | None = None, **kw) -> Interval:
    """The mean of ``after − before`` (same shape, measured on the same units) and its interval:
    :func:`bootstrap_mean` (``[U]`` or ``[G, U]``, groups fixed) or, with ``axes``, :func:`bootstrap_crossed`."""
    b, a = _tensor(before), _tensor(after)
    if a.shape != b.shape:
        raise ValueError(f"before {tuple(b.shape)} and after {tuple(a.shape)} must have the same shape")
    return bootstrap_mean(a - b, **kw) if axes is None else bootstrap_crossed(a - b, axes, **kw)


def two_sample_difference(a: Sequence, b: Sequence, *, level: float = 0.95, resamples: int = 2000, seed: int = 0,
                          unit: str = "units") -> Interval:
    """``mean(a) − mean(b)`` for two *independent* samples (``[A]``, ``[B]``; NaN/None dropped, e.g. the latents
    of two SAEs) and its percentile bootstrap interval, each sample resampled on its own (``over``:
    ``{unit_a: A, unit_b: B}``). NaN when either sample is empty."""
    x, y = _tensor(list(a)), _tensor(list(b))
    x, y = x[~x.isnan()], y[~y.isnan()]
    _check_level(level)
    over = {f"{unit}_a": x.numel(), f"{unit}_b": y.numel()}
    if x.numel() == 0 or y.numel() == 0:
        return Interval(float("nan"), float("nan"), float("nan"), x.numel() + y.numel(), over)
    gen = torch.Generator().manual_seed(seed)
    da = x[torch.randint(0, x.numel(), (resamples, x.numel()), generator=gen)].mean(1)     # [R]
    db = y[torch.randint(0, y.numel(), (resamples, y.numel()), generator=gen)].mean(1)     # [R]
    low, high = _percentiles(da - db, level)
    return Interval(float(x.mean() - y.mean()), low, high, x.numel() + y.numel(), over)


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
    if r != r:
        return Interval(r, float("nan"), float("nan"), U)
    low, high = _percentiles(_pearson(a[idx], b[idx]), level)
    return Interval(r, low, high, U)


def side_of_zero(interval, above: str, below: str, neither: str) -> str | None:
    """The pre-specified reading of a difference interval (an :class:`Interval` or its dict): ``above`` when it
    lies above 0, ``below`` when below, else ``neither``; None without an interval (or a NaN one)."""
    if interval is None:
        return None
    low, high = (interval["low"], interval["high"]) if isinstance(interval, dict) else (interval.low, interval.high)
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return None
    return above if low > 0 else below if high < 0 else neither


def spread(values) -> dict:
    """``{"mean", "low", "high", "n", "values", "interval"}``: the mean of the numbers that are not None or NaN
    and their min–max range (NaN when there are none). For a handful of seeds, where a bootstrap percentile
    interval would be about as wide and claim more than the draws support."""
    values = list(values)
    ok = [float(v) for v in values if v is not None and v == v]
    if not ok:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0, "values": values,
                "interval": "min–max over seeds"}
    return {"mean": statistics.fmean(ok), "low": min(ok), "high": max(ok), "n": len(ok), "values": values,
            "interval": "min–max over seeds"}
