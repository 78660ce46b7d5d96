"""Controls for the planted-concept F1 of :mod:`dlmscope.interp.concepts`: what a score means is its margin over
what needs no training.

Two baselines, each scored exactly as the trained SAE is (the same tokens, the same held-out choice):

``random SAEs``       several untrained SAEs matched to the trained one (:func:`random_saes_like`): random decoder
                      directions with the trained rows' norms, the encoder tied to them at the trained encoder
                      rows' norms, ``b_enc = 0`` and the *trained* ``b_dec``. The trained ``b_dec`` centres the
                      activations as the trained SAE does; without it a random SAE's latents fire on the residual
                      stream's mean and its chance level says little. :func:`chance_concept_f1` gives the
                      distribution over the random SAEs (mean, a percentile interval, every value).
``best dimension``    the F1 of thresholding one raw residual coordinate, ``sign · x[:, dim] >= threshold``, the
                      best (dim, sign, threshold) per concept (:func:`best_dimension_f1`): a concept the residual
                      stream already carries on one axis needs no SAE to be found.

:func:`concept_baselines` runs both, the one call a job makes beside :func:`~dlmscope.interp.concepts.score_concepts`.
"""
from __future__ import annotations

import copy
import dataclasses
import statistics
from collections.abc import Sequence

import torch
from torch import Tensor

from .concepts import score_concepts

__all__ = ["random_saes_like", "chance_concept_f1", "DimensionScores", "best_dimension_f1", "concept_baselines"]


@torch.no_grad()
def random_saes_like(sae, count: int, *, seed: int = 0) -> list:
    """``count`` untrained copies of ``sae`` (any module with ``W_enc [n, d]``, ``b_enc [n]``, ``W_dec [n, d]``,
    ``b_dec [d]`` and ``encode``), copy ``i`` drawn with seed ``seed + i``: ``W_dec`` rows are random unit
    directions times the trained rows' norms, ``W_enc`` rows the same directions (the tied init) times the
    trained encoder rows' norms, ``b_enc`` zero, ``b_dec`` the trained one. The trained SAE is not changed."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    dec_norm = sae.W_dec.detach().float().norm(dim=1, keepdim=True).cpu()   # [n, 1]
    enc_norm = sae.W_enc.detach().float().norm(dim=1, keepdim=True).cpu()   # [n, 1]
    out = []
    for i in range(count):
        gen = torch.Generator().manual_seed(seed + i)
        direction = torch.nn.functional.normalize(torch.randn(tuple(sae.W_dec.shape), generator=gen), dim=1)
        twin = copy.deepcopy(sae)
        twin.W_dec.copy_(direction * dec_norm)
        twin.W_enc.copy_(direction * enc_norm)
        twin.b_enc.zero_()
        out.append(twin)
    return out


def _spread(values: Sequence[float], level: float) -> dict:
    """Mean, the ``level`` percentile interval and the values themselves (NaNs dropped from mean and interval)."""
    v = torch.tensor(list(values), dtype=torch.float64)
    v = v[~v.isnan()]
    if v.numel() == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "values": list(values)}
    low, high = torch.quantile(v, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return {"mean": float(v.mean()), "low": low, "high": high, "values": list(values)}


def chance_concept_f1(sae, activations: Tensor, labels: Tensor, names: Sequence[str], *, count: int = 5,
                      seed: int = 0, select_on: tuple[Tensor, Tensor] | None = None, level: float = 0.95,
                      batch_size: int = 8192) -> dict:
    """Concept F1 of :func:`random_saes_like` ``(sae, count, seed=seed)``, each scored as
    :func:`~dlmscope.interp.concepts.score_concepts` scores ``sae`` (``activations [N, d]``, ``labels [N]``,
    ``select_on`` the held-out choice). Returns ``{"median_f1": spread, "concepts": {name: spread}, "count",
    "seed", "over"}`` where a spread is ``{"mean", "low", "high", "values"}``: the mean over the random SAEs, the
    ``level`` percentile interval of their values (the spread of chance, not a bootstrap) and each value."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    scores = [score_concepts(r, activations, labels, names, select_on=select_on, batch_size=batch_size)
              for r in random_saes_like(sae, count, seed=seed)]
    return {"median_f1": _spread([s.median_f1 for s in scores], level),
            "concepts": {name: _spread([s.f1[c] for s in scores], level) for c, name in enumerate(names)},
            "count": count, "seed": seed, "over": {"random SAEs": count},
            "how": "untrained SAEs with the trained b_dec and row norms, b_enc = 0, random tied directions"}


@dataclasses.dataclass
class DimensionScores:
    """Per concept, the best single-coordinate rule ``sign · x[:, dim] >= threshold`` and its scores; lists are
    ``[n_concepts]``."""

    names: list[str]
    dim: list[int]
    sign: list[int]
    threshold: list[float]
    f1: list[float]
    precision: list[float]
    recall: list[float]
    support: list[int]

    @property
    def median_f1(self) -> float:
        """Median over the concepts that occur at least once."""
        vals = [f for f, s in zip(self.f1, self.support) if s > 0]
        return float(statistics.median(vals)) if vals else float("nan")

    def as_dict(self) -> dict:
        return {"median_f1": self.median_f1,
                "concepts": {n: {"dim": j, "sign": s, "threshold": t, "f1": f, "precision": p, "recall": r,
                                 "support": c}
                             for n, j, s, t, f, p, r, c in zip(self.names, self.dim, self.sign, self.threshold,
                                                               self.f1, self.precision, self.recall, self.support)}}


def _check(activations: Tensor, labels: Tensor, n_concepts: int) -> tuple[Tensor, Tensor]:
    if activations.dim() != 2 or labels.shape != activations.shape[:1]:
        raise ValueError(f"activations must be [N, d] and labels [N], got {tuple(activations.shape)} and "
                         f"{tuple(labels.shape)}")
    labels = labels.long().cpu()
    if labels.numel() and (int(labels.max()) >= n_concepts or int(labels.min()) < -1):
        raise ValueError(f"labels must lie in -1..{n_concepts - 1}")
    return activations.detach().cpu(), labels


@torch.no_grad()
def _best_rules(x: Tensor, labels: Tensor, n_concepts: int, chunk: int) -> tuple[list, list, list]:
    """Per concept the (dim, sign, threshold) of the highest-F1 rule on ``x [N, d]`` (ties: sign +1 first, then
    the lowest dim)."""
    n = x.shape[0]
    count = torch.bincount(labels[labels >= 0], minlength=n_concepts).double()
    best = [(-1.0, 0, 1, float("inf"))] * n_concepts                             # (f1, dim, sign, threshold)
    fires = torch.arange(1, n + 1, dtype=torch.float64)[:, None]                 # [N, 1] tokens at or above a cut
    for sign in (1, -1):
        for start in range(0, x.shape[1], chunk):
            s, order = (sign * x[:, start:start + chunk].double()).sort(0, descending=True)    # [N, c]
            lab = labels[order]                                                  # [N, c]
            cut = torch.ones_like(s, dtype=torch.bool)                           # a cut only after a run of ties
            cut[:-1] = s[:-1] != s[1:]
            for c in range(n_concepts):
                f1 = 2 * (lab == c).cumsum(0).double() / (fires + count[c])
                f1 = torch.where(cut, f1, torch.full_like(f1, -1.0))
                top, pos = f1.max(0)                                             # [c] best cut per dim
                j = int(top.argmax())
                if float(top[j]) > best[c][0]:
                    best[c] = (float(top[j]), start + j, sign, float(s[pos[j], j]))
    return [b[1] for b in best], [b[2] for b in best], [b[3] for b in best]


def best_dimension_f1(activations: Tensor, labels: Tensor, names: Sequence[str], *,
                      select_on: tuple[Tensor, Tensor] | None = None, chunk: int = 256) -> DimensionScores:
    """The best single residual coordinate per concept: over every dim, both signs and every threshold, the rule
    ``sign · x[:, dim] >= threshold`` with the highest F1 against ``labels [N]`` (concept index or -1) on
    ``activations [N, d]``. ``select_on = (activations, labels)`` of other tokens: choose the rule there and
    score it here (as :func:`~dlmscope.interp.concepts.score_concepts` chooses latents). ``chunk``: dims sorted
    at a time (memory ~ 4 · N · chunk doubles)."""
    x, lab = _check(activations, labels, len(names))
    xs, ls = _check(*select_on, len(names)) if select_on is not None else (x, lab)
    if xs.shape[1] != x.shape[1]:
        raise ValueError(f"select_on has d = {xs.shape[1]}, activations d = {x.shape[1]}")
    dims, signs, thresholds = _best_rules(xs, ls, len(names), chunk)
    f1, precision, recall, support = [], [], [], []
    for c, (j, s, t) in enumerate(zip(dims, signs, thresholds)):
        pred = s * x[:, j].double() >= t
        hit, fired, n_c = int((pred & (lab == c)).sum()), int(pred.sum()), int((lab == c).sum())
        f1.append(2 * hit / (fired + n_c) if fired + n_c else 0.0)
        precision.append(hit / fired if fired else 0.0)
        recall.append(hit / n_c if n_c else 0.0)
        support.append(n_c)
    return DimensionScores(list(names), dims, signs, thresholds, f1, precision, recall, support)


def concept_baselines(sae, activations: Tensor, labels: Tensor, names: Sequence[str], *, count: int = 5,
                      seed: int = 0, select_on: tuple[Tensor, Tensor] | None = None, level: float = 0.95,
                      batch_size: int = 8192) -> dict:
    """Both controls for ``sae``'s concept F1 on the same tokens and choice: ``{"random_sae":``
    :func:`chance_concept_f1` ``, "best_dimension":`` :func:`best_dimension_f1` ``.as_dict()}``."""
    return {"random_sae": chance_concept_f1(sae, activations, labels, names, count=count, seed=seed,
                                            select_on=select_on, level=level, batch_size=batch_size),
            "best_dimension": best_dimension_f1(activations, labels, names, select_on=select_on).as_dict()}
