"""The ΔLM estimators over batches (docs/reference.md §4), each with a standard error over batches (the unit:
one batch is one draw of text, of t and of the mask, so its tokens are not independent).

* :func:`pooled_results` — the paper's: ``Σ_b Σ_{masked} CE / t_b ÷ Σ_b #masked`` (each term's numerator and
  count pooled; scale ≈ mean CE / E[t]); its SE is the ratio estimator's delta method over batches.
* :func:`per_batch_results` (alias :func:`average_results`) — the mean of the per-batch losses (each batch weighted
  equally, so a masked token by ``1 / (t_b · #masked_b)``; scale ≈ mean CE · E[1/t]); SE = std / √B.
* :func:`relative_se` — ``SE / |Δ|``, the precision a reported effect is held to.
* :func:`collapsed_strata` — the variance groups of batches whose t was drawn stratified (one batch per stratum):
  given as ``strata``, both SEs use the collapsed-strata estimator (pairs of adjacent strata) instead of treating
  the batches as independent draws of t, which would count the spread of t the design removed.

The per-batch dicts come from :func:`dlmscope.analysis.splice.dlm_delta_loss` / ``ar_delta_loss``.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["ESTIMATORS", "HEADLINE_DELTAS", "average_results", "collapsed_strata", "fraction_recovered",
           "per_batch_results", "pooled_results", "relative_se"]

#: the two ΔLM estimators over batches; the first is the paper's and the default
ESTIMATORS = ("pooled", "per_batch")

def fraction_recovered(clean: float, sae: float, zero: float) -> float:
    """``(L_zero − L_sae) / (L_zero − L_clean)``: 1 = the SAE loses nothing, 0 = as bad as zero-ablation."""
    denom = zero - clean
    if not math.isfinite(denom) or abs(denom) < 1e-12:
        return float("nan")
    return (zero - sae) / denom


#: the ΔLM keys that carry a standard error (and a result's SE target): a DLM's two losses, an AR model's one
HEADLINE_DELTAS = ("mask_delta", "unmask_delta", "delta")


def _count_key(key: str) -> str:
    """The count a loss key is a mean over: ``n_masked`` for ``mask_*``, ``n_unmasked`` for ``unmask_*``,
    ``n_tokens`` for the AR keys."""
    return "n_masked" if key.startswith("mask_") else "n_unmasked" if key.startswith("unmask_") else "n_tokens"


def _recompute_recovered(out: dict) -> None:
    """The recovered fractions of the combined losses (more stable than combining per-batch fractions)."""
    for pre in ("mask_", "unmask_", ""):
        if f"{pre}zero" in out:
            out[f"{pre}recovered"] = fraction_recovered(out[f"{pre}clean"], out[f"{pre}sae"], out[f"{pre}zero"])


def _check(results: Sequence[dict], strata: Sequence[int] | None = None) -> None:
    if not results:
        raise ValueError("no results to combine")
    if strata is not None:
        if len(strata) != len(results):
            raise ValueError(f"strata has {len(strata)} labels for {len(results)} batches")
        if len(results) > 1 and min(Counter(strata).values()) < 2:
            raise ValueError("every stratum group needs at least 2 batches (collapse single strata in pairs)")


def collapsed_strata(ts: Sequence[float], rounds: Sequence[int]) -> list[int]:
    """Group labels for the collapsed-strata variance of batches with stratified masking rates: within each round
    (``rounds[b]``, the batches whose t were stratified together, one per stratum), the batches sorted by t are
    grouped in adjacent pairs, an odd one out joining the last pair. A round of one batch has no partner and
    joins the group before it."""
    if len(ts) != len(rounds):
        raise ValueError(f"{len(ts)} masking rates but {len(rounds)} round labels")
    labels = [0] * len(ts)
    group = -1
    for r in dict.fromkeys(rounds):
        mine = sorted((b for b in range(len(ts)) if rounds[b] == r), key=lambda b: ts[b])
        if len(mine) == 1 and group >= 0:
            labels[mine[0]] = group
            continue
        for j, b in enumerate(mine):
            if j % 2 == 0 and j + 1 < len(mine):
                group += 1
            labels[b] = max(group, 0)
    return labels


def _sum_variance(e: Tensor, strata: Sequence[int] | None) -> float:
    """Estimated variance of ``Σ_b e_b`` ``[B]``: independent draws ``B/(B−1) Σ (e_b − ē)²``, or collapsed
    strata ``Σ_g m_g/(m_g−1) Σ_{b∈g} (e_b − ē_g)²`` (NaN for B < 2)."""
    B = e.numel()
    if B < 2:
        return float("nan")
    groups = [torch.arange(B)] if strata is None else [
        torch.tensor([b for b in range(B) if strata[b] == g]) for g in dict.fromkeys(strata)]
    total = 0.0
    for idx in groups:
        x = e[idx]
        total += float(((x - x.mean()) ** 2).sum()) * len(x) / (len(x) - 1)
    return total


def per_batch_results(results: Sequence[dict[str, float]], strata: Sequence[int] | None = None) -> dict[str, float]:
    """Per-key mean over per-batch result dicts, each batch weighted equally (counts ``n_*`` are summed; NaNs
    ignored), with ``{mask_,unmask_,}delta_se`` = std over batches / √B (NaN for one batch; over ``strata``
    groups, see :func:`collapsed_strata`, when given). Not the paper's
    estimator (that is :func:`pooled_results`): the DLM losses are means over a batch's masked tokens of CE / t_b,
    so a batch of few masked tokens (small t_b) weighs as much as a large one."""
    _check(results, strata)
    out: dict[str, float] = {}
    for key in results[0]:
        vals = [r[key] for r in results if key in r]
        if key.startswith("n_"):
            out[key] = int(sum(vals))
        else:
            finite = [float(v) for v in vals if not math.isnan(float(v))]
            out[key] = sum(finite) / len(finite) if finite else float("nan")
    _recompute_recovered(out)
    for key in HEADLINE_DELTAS:
        if key in out:
            vals = torch.tensor([r[key] for r in results], dtype=torch.float64)
            out[f"{key}_se"] = _sum_variance(vals, strata) ** 0.5 / len(vals)
    return out


#: the per-batch mean under its former name
average_results = per_batch_results


def _ratio_se(num: Tensor, den: Tensor, strata: Sequence[int] | None = None) -> float:
    """Delta-method SE of ``R = Σ num_b / Σ den_b`` over B batches ``[B]``: ``sqrt(Var(Σ_b e_b)) / Σ_b den_b``
    with residuals ``e_b = num_b − R·den_b`` and the variance of :func:`_sum_variance` (independent batches:
    ``B / (B − 1) · Σ_b e_b²``; or collapsed ``strata``). NaN for B < 2 or no count."""
    B, total = num.numel(), float(den.sum())
    if B < 2 or total <= 0:
        return float("nan")
    r = float(num.sum()) / total
    return _sum_variance(num - r * den, strata) ** 0.5 / total


def pooled_results(results: Sequence[dict[str, float]], strata: Sequence[int] | None = None) -> dict[str, float]:
    """The paper's pooled estimator over per-batch result dicts (of :func:`dlm_delta_loss` or
    :func:`ar_delta_loss`): each loss is ``Σ_b loss_b · count_b ÷ Σ_b count_b`` with its own count
    (``n_masked`` for ``mask_*``, ``n_unmasked`` for ``unmask_*``, ``n_tokens`` for the AR keys) — for ``L_mask``
    exactly ``Σ_b Σ_{masked} CE / t_b ÷ Σ_b #masked``. Counts are summed, ``t`` is the mean over batches,
    ``n_batches`` is B, and ``{mask_,unmask_,}delta_se`` is the ratio estimator's delta-method SE over batches
    (over ``strata`` groups, see :func:`collapsed_strata`, when given). A loss with a NaN batch (or no count at
    all) is NaN."""
    _check(results, strata)
    out: dict[str, float] = {}
    for key in results[0]:
        if key.startswith("n_"):
            out[key] = int(sum(r[key] for r in results))
        elif key == "t":
            out[key] = sum(float(r["t"]) for r in results) / len(results)
    deltas = {}
    for key in results[0]:
        if key.startswith("n_") or key == "t" or key.endswith("recovered"):
            continue
        count = torch.tensor([float(r.get(_count_key(key), 0)) for r in results], dtype=torch.float64)
        vals = torch.tensor([float(r[key]) for r in results], dtype=torch.float64)
        sums = torch.where(count > 0, vals * count, torch.zeros_like(vals))  # an empty term's loss is its 0 sum
        total = float(count.sum())
        out[key] = float(sums.sum()) / total if total > 0 and not bool(vals.isnan().any()) else float("nan")
        if key.endswith("delta"):
            deltas[key] = (sums, count)
    _recompute_recovered(out)
    for key, (sums, count) in deltas.items():
        out[f"{key}_se"] = _ratio_se(sums, count, strata)
    out["n_batches"] = len(results)
    return out


def relative_se(result: dict) -> float:
    """The largest ``SE / |Δ|`` over the ΔLM keys of ``result`` (:data:`HEADLINE_DELTAS`); inf for a zero Δ,
    NaN when no SE is known (one batch)."""
    rel = []
    for key in HEADLINE_DELTAS:
        if key in result:
            se, delta = result[f"{key}_se"], abs(result[key])
            rel.append(float("nan") if math.isnan(se) else (se / delta if delta > 0 else float("inf")))
    return max(rel) if rel and not any(math.isnan(r) for r in rel) else float("nan")
