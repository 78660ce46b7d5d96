"""The statistics of a steering sweep: what is claimed about pooled features, its controls, the paper's score
and a pre-specified comparison of two models (docs/reference.md §5).

Units. A claim about steering *features* pools several steered features (one per concept) over the same prompts,
so its interval resamples both: :func:`dlmscope.util.bootstrap.bootstrap_crossed` over ``[G, U]`` (features ×
prompts; the axis is named ``concepts`` when each feature stands for its own concept, else ``latents``). An
interval about one feature is over prompts only (``unit="prompts"``). Every interval says what it is over
(``over``).

Scores. ``concept`` is the judge's score in [0, 1] (the paper's 0..100 / 100). The paper's score per feature is
``ΔC̄ + 0.3 · (P̄_before − P̄_after) / P̄_before`` on prompt means (:func:`paper_score`): one exploded perplexity
dominates the mean. Beside it, the composite with a robust fluency term (:data:`FLUENCY_TERM` ``"log_ratio"``):
per (feature, prompt) cell ``ΔC − 0.3 · log(P_after / P_before)`` — the paper's term to first order near a ratio
of 1, but a ×670 blow-up costs 0.3 · 6.5 rather than 0.3 · 669, and a cell-wise score can be bootstrapped like
the concept change (:func:`composite_cells`).

Controls. A control is a steered run with no concept behind it at the same α, strength, scope and schedule: a
random unit direction, or a random alive latent of the same SAE. With ``v`` of unit norm and ``m(h)`` the
position's largest activation over all latents, ``‖α · m(h) · v‖`` is the same for the steered latent and its
controls, so the norm is matched by construction; ``‖α·m(h)·v‖ / ‖h‖`` is measured and reported anyway. The
controlled effect is, per cell, the steered change minus the control's change of the same concept on the same
prompt: a steer that only pushes hard raises it no more than the control does.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import asdict
from typing import Sequence

from dlmscope.util.bootstrap import Interval, bootstrap_crossed, bootstrap_mean, side_of_zero

__all__ = ["FLUENCY_WEIGHT", "FLUENCY_TERM", "MAX_PPL_RATIO", "CONTROLS", "PRIMARY_CONTROL", "paper_score",
           "cell_deltas", "log_ratio_cells", "composite_cells", "difference_cells", "feature_axis", "crossed",
           "per_feature", "median_ratio", "nanmedian", "nanmean", "summarise_condition", "matched_fluency", "verdict",
           "judged_control",
           "VERDICT_RULE"]

#: the weight of fluency in the steering score (docs/reference.md §5)
FLUENCY_WEIGHT = 0.3
#: the composite's fluency term: ``−0.3 · log(P_after / P_before)`` per cell
FLUENCY_TERM = "log_ratio"
#: matched fluency: an α counts when its median perplexity ratio (steered / baseline) is at most this
MAX_PPL_RATIO = 2.0
#: the control runs: a random unit direction and a random alive latent of the same SAE, at the steered α
CONTROLS = ("random_latent", "random_direction")
#: the control the controlled effect and the verdict subtract (fixed before any data: the audit's confound was a
#: random alive latent raising concepts as much as their best latent)
PRIMARY_CONTROL = "random_latent"

VERDICT_RULE = ("on the difference (first − second model) of the controlled effect (steered − random-latent "
                "control concept-rate change), 95% interval over concepts × prompts: the first model if the "
                "interval lies above 0, the second if below, else 'no difference'; the composite verdict is the same "
                "rule on the difference of the log-ratio composite")


def _num(x) -> float:
    return math.nan if x is None else float(x)


def paper_score(c_before: float, c_after: float, p_before: float, p_after: float) -> float:
    """The paper's score of one feature from its prompt means: ``(C̄_a − C̄_b) + 0.3 · (P̄_b − P̄_a) / P̄_b``."""
    return (c_after - c_before) + FLUENCY_WEIGHT * (p_before - p_after) / p_before


def cell_deltas(before: Sequence[Sequence], after: Sequence[Sequence]) -> list[list[float]]:
    """``[G, U]``: ``after − before`` per cell, NaN where either is None or NaN."""
    return [[_num(a) - _num(b) for b, a in zip(rb, ra)] for rb, ra in zip(before, after)]


def log_ratio_cells(p_before: Sequence[Sequence], p_after: Sequence[Sequence]) -> list[list[float]]:
    """``[G, U]``: ``log(P_after / P_before)`` per cell (NaN for an empty generation or a non-positive value)."""
    def one(b, a):
        b, a = _num(b), _num(a)
        return math.log(a / b) if a > 0 and b > 0 else math.nan
    return [[one(b, a) for b, a in zip(rb, ra)] for rb, ra in zip(p_before, p_after)]


def composite_cells(c_before, c_after, p_before, p_after) -> list[list[float]]:
    """``[G, U]``: the composite per cell, ``ΔC − 0.3 · log(P_after / P_before)`` (NaN where either part is)."""
    d, lr = cell_deltas(c_before, c_after), log_ratio_cells(p_before, p_after)
    return [[x - FLUENCY_WEIGHT * y for x, y in zip(rd, rl)] for rd, rl in zip(d, lr)]


def difference_cells(a: Sequence[Sequence], b: Sequence[Sequence]) -> list[list[float]]:
    """``[G, U]``: ``a − b`` cell by cell (the same features and prompts on both sides)."""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        raise ValueError(f"the two sides differ in features or prompts: {len(a)}×{len(a[0]) if a else 0} vs "
                         f"{len(b)}×{len(b[0]) if b else 0}")
    return [[_num(x) - _num(y) for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]


def feature_axis(concepts: Sequence[str]) -> str:
    """The name of the features axis: ``concepts`` when each feature stands for its own concept, else ``latents``."""
    return "concepts" if len(set(concepts)) == len(concepts) else "latents"


def crossed(cells: Sequence[Sequence], axis: str, *, seed: int = 0) -> dict:
    """The mean of ``cells [G, U]`` with its interval over features × prompts, as a JSON dict (with ``over``)."""
    return asdict(bootstrap_crossed(cells, (axis, "prompts"), seed=seed))


def per_feature(before: Sequence, after: Sequence, *, seed: int = 0) -> Interval:
    """One feature's mean change ``after − before`` ``[U]`` with its interval over prompts."""
    return bootstrap_mean([_num(a) - _num(b) for b, a in zip(before, after)], seed=seed, unit="prompts")


def median_ratio(after: Sequence, before: Sequence) -> float:
    """The median over prompts of ``after / before`` (NaN, e.g. an empty generation, skipped)."""
    r = [_num(a) / _num(b) for a, b in zip(after, before) if _num(a) == _num(a) and _num(b) == _num(b)]
    return statistics.median(r) if r else math.nan


def nanmedian(xs) -> float:
    """The median of the numbers that are not None or NaN (NaN if none)."""
    xs = [_num(x) for x in xs if _num(x) == _num(x)]
    return statistics.median(xs) if xs else math.nan


def nanmean(xs) -> float:
    """The mean of the numbers that are not None or NaN (NaN if none)."""
    xs = [_num(x) for x in xs if _num(x) == _num(x)]
    return statistics.fmean(xs) if xs else math.nan


def judged_control(draws: Sequence[tuple], judge, concept: str) -> dict:
    """One control judged for ``concept``, from its draws ``(texts [U], perplexities [U], norm ratio)``: per
    prompt the concept score (mean over draws; None if a judgement failed) and perplexity (geometric mean)."""
    per_prompt = list(zip(*(judge.score(concept, texts) for texts, _, _ in draws)))
    concepts = [None if any(x is None for x in xs) else statistics.fmean(xs) for xs in per_prompt]
    ppls = [math.exp(statistics.fmean(math.log(p) for p in ps)) if all(p == p and p > 0 for p in ps) else math.nan
            for ps in zip(*(pp for _, pp, _ in draws))]
    return {"concept_after": nanmean(concepts), "concepts_after": concepts, "ppls_after": ppls,
            "norm_ratio": nanmean(r for _, _, r in draws)}


def summarise_condition(runs: Sequence[dict], concepts: Sequence[str], *, threshold: float = 0.1,
                        seed: int = 0) -> dict:
    """One summary row from the runs of the G features at one (scope, schedule, α): each run holds per prompt
    ``concepts_before/after``, ``ppls_before/after`` and, where controls ran, ``controls[kind]`` with the
    control's ``concepts_after`` / ``ppls_after`` judged for that run's concept.

    ``concept_delta``, ``composite`` (:func:`composite_cells`), ``controls[kind]["concept_delta"]`` and
    ``controlled[kind]`` (steered − control change) are over features × prompts; ``features_up`` counts features
    up by ≥ ``threshold`` with a per-feature interval (over prompts) above 0; ``ppl_ratio_median`` is the median
    of the per-feature median perplexity ratios; ``score_mean`` the mean of the paper's score
    (:func:`paper_score`); ``norm_ratio`` the mean ``‖α·m(h)·v‖ / ‖h‖`` at the steered positions."""
    axis = feature_axis(concepts)
    before = [r["concepts_before"] for r in runs]
    after = [r["concepts_after"] for r in runs]
    p_before, p_after = [r["ppls_before"] for r in runs], [r["ppls_after"] for r in runs]
    steered = cell_deltas(before, after)
    row = {"scope": runs[0]["scope"], "schedule": runs[0]["schedule"], "alpha": runs[0]["alpha"],
           "n_features": len(runs), "feature_axis": axis,
           "concept_delta": crossed(steered, axis, seed=seed),
           "features_up": sum(i.mean >= threshold and i.low > 0
                              for i in (per_feature(b, a, seed=seed) for b, a in zip(before, after))),
           "ppl_ratio_median": nanmedian(median_ratio(a, b) for a, b in zip(p_after, p_before)),
           "score_mean": nanmean(r["score"] for r in runs),
           "composite": crossed(composite_cells(before, after, p_before, p_after), axis, seed=seed),
           "composite_fluency_term": FLUENCY_TERM,
           "norm_ratio": nanmean(r.get("norm_ratio") for r in runs),
           "controls": {}, "controlled": {}}
    for kind in runs[0].get("controls", {}):
        c_after = [r["controls"][kind]["concepts_after"] for r in runs]
        c_ppl = [r["controls"][kind]["ppls_after"] for r in runs]
        control = cell_deltas(before, c_after)
        row["controls"][kind] = {
            "concept_delta": crossed(control, axis, seed=seed),
            "ppl_ratio_median": nanmedian(median_ratio(a, b) for a, b in zip(c_ppl, p_before)),
            "composite": crossed(composite_cells(before, c_after, p_before, c_ppl), axis, seed=seed),
            "norm_ratio": nanmean(r["controls"][kind].get("norm_ratio") for r in runs)}
        row["controlled"][kind] = crossed(difference_cells(steered, control), axis, seed=seed)
    return row


def matched_fluency(rows: Sequence[dict], *, max_ratio: float = MAX_PPL_RATIO) -> list[dict]:
    """Per (scope, schedule): the α with the largest mean concept-rate change among those whose median
    perplexity ratio is at most ``max_ratio`` (ties: the smaller α; α = 0 steers nothing and is left out), with
    its row's intervals; ``alpha`` None where no α keeps fluency (the rule is fixed: the gain picks α, fluency
    only gates)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["scope"], repr(r["schedule"])), []).append(r)
    out = []
    for group in groups.values():
        ok = [r for r in group if r["alpha"] != 0 and _num(r["ppl_ratio_median"]) <= max_ratio
              and _num(r["concept_delta"]["mean"]) == _num(r["concept_delta"]["mean"])]
        best = max(sorted(ok, key=lambda r: r["alpha"]), key=lambda r: r["concept_delta"]["mean"], default=None)
        entry = {"scope": group[0]["scope"], "schedule": group[0]["schedule"], "max_ppl_ratio": max_ratio,
                 "alpha": None if best is None else best["alpha"]}
        if best is not None:
            entry |= {k: best[k] for k in ("concept_delta", "ppl_ratio_median", "composite", "controlled")
                      if k in best}
        out.append(entry)
    return out


def verdict(interval: dict | None, names: tuple[str, str] = ("DLM", "AR")) -> str | None:
    """:data:`VERDICT_RULE` on one difference interval (first − second): ``names[0]`` if it lies above 0,
    ``names[1]`` if below, else ``"no difference"``; None without an interval (or a NaN one)."""
    return side_of_zero(interval, names[0], names[1], "no difference")
