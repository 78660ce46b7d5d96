"""Decoding order through SAE features (docs/reference.md §6), and an SAE-guided remasking order.

:func:`replay` runs every recorded state of a sampler's history (the start state included) through the model
once — all states of all rows batched, one truncated forward per batch for every layer, the sampler's own
attention mask — and keeps, per (layer, state, row, generated position), the top-K SAE latents as compact
tensors (ids int32, values float16: ``6·K`` bytes per cell). :func:`order_statistics` turns a trace into the
paper's per-position statistics over **every** generated position:

- *pre-decode* (the position is masked in both states of a transition): mean Jaccard of consecutive top-K
  sets (stability), top-1 lock ratio, mean |Δ top-1 value|;
- *post-decode* (committed in both): mean drift ``1 − Jaccard``, top-1 flips, std of the top-1 value, and
  token revisions; the commit transition itself counts in neither phase.

:func:`order_sensitive_features` scores ``Σ_t |C_ref(t, f) − C_other(t, f)|`` with ``C_t(f)`` the number of
positions whose top-K holds f at state t. :class:`SAEStabilityGuide` is a sampler ``guide``: it commits first
the masked positions whose top-K set stopped changing since the previous step, confidence breaking ties, at the
cost of one SAE encode per step at one layer (the activations come from the sampler's own forward).
:class:`DreamConfidence` is a guide that ranks by one of Dream's confidence measures, so that LLaDA's loop runs
Dream's algorithms at LLaDA's commit counts (matched commits; Dream's own schedule commits nothing at the first
of G steps for G answers).

:func:`group_correlation` correlates a per-task statistic with exact match over the task groups whose outcome
varies (a group where every task is right, or every task wrong, adds no covariance, only dilution), with its
sign, an interval and a sign-agnostic verdict; :func:`conjecture_verdict` summarises it over orders.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping

import math

import torch
from torch import Tensor

from dlmscope.models import hooks
from dlmscope.models.sampler_rules import dream_tokens
from dlmscope.models.sampling import Generation
from dlmscope.util.bootstrap import correlation
from dlmscope.util.choices import check_choice

__all__ = ["FeatureTrace", "replay", "jaccard", "OrderStats", "order_statistics", "feature_counts",
           "order_sensitive_features", "SAEStabilityGuide", "BYTES_PER_LATENT", "top_latents", "LogitsTap",
           "DreamConfidence", "DREAM_CONFIDENCE_ALGS", "group_correlation", "conjecture_verdict"]

#: bytes a trace keeps per latent per (layer, state, row, position): an int32 id and a float16 value
BYTES_PER_LATENT = 6


def _check_sae(adapter, layer: int, sae) -> None:
    adapter.check_layer(layer)
    if getattr(sae, "d", None) != adapter.d_model:
        raise ValueError(f"the SAE of layer {layer} has d={getattr(sae, 'd', None)}, the model's hidden size is "
                         f"{adapter.d_model}")


def top_latents(sae, x: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """The ``K`` largest SAE latents of activations ``x [..., d]``: ``(ids [..., K] int32, values [..., K]
    float32)``, sorted by value (largest first); latents that are not active (value 0) get id −1."""
    values, ids = sae.encode(x.to(sae.W_enc.dtype), k=K)
    values, order = values.float().sort(-1, descending=True)
    ids = ids.gather(-1, order).to(torch.int32)
    return torch.where(values > 0, ids, torch.full_like(ids, -1)), values


def jaccard(a: Tensor, b: Tensor) -> Tensor:
    """``[...]``: the Jaccard index of the id sets ``a`` and ``b`` ``[..., K]`` (−1 = no latent); two empty
    sets count as equal (1)."""
    va, vb = a >= 0, b >= 0
    inter = ((a[..., :, None] == b[..., None, :]) & va[..., :, None] & vb[..., None, :]).any(-1).sum(-1)
    union = va.sum(-1) + vb.sum(-1) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter, dtype=torch.float32))


@dataclass
class FeatureTrace:
    """Top-K SAE latents at every generated position of every recorded state (``S`` steps, ``S + 1``
    states: the start and after each step)."""

    layers: tuple[int, ...]
    #: ``[L, S + 1, B, G, K]`` int32, largest first; −1 where fewer than K latents are active
    ids: Tensor
    #: ``[L, S + 1, B, G, K]`` float16
    values: Tensor
    #: ``[S + 1, B, G]`` bool: the position is still masked in that state
    masked: Tensor
    #: ``[S + 1, B, G]`` int64: the token at the position in that state
    tokens: Tensor

    def layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not replayed; this trace has layers {list(self.layers)}")
        return self.layers.index(layer)

    @property
    def bytes_per_cell(self) -> int:
        """Bytes per (state × position × layer) of one row."""
        return self.ids.shape[-1] * BYTES_PER_LATENT


@torch.no_grad()
def replay(adapter, gen: Generation, saes: Mapping[int, object], *, top_k: int | None = None,
           batch_rows: int = 64) -> FeatureTrace:
    """Replay ``gen.history`` (a sampler run with ``history=True``) through ``adapter`` with ``saes``
    (``{layer: SAE}``); ``top_k`` latents kept per position (default: the smallest SAE k). States of all
    rows are batched ``batch_rows`` at a time; each batch is one truncated forward for every layer."""
    if gen.history is None:
        raise ValueError("the generation has no history: run the sampler with history=True")
    if gen.gen_positions is None or gen.attention_mask is None:
        raise ValueError("the generation does not record its generated positions; use dlmscope.models.sampling")
    if not saes:
        raise ValueError("replay needs at least one {layer: SAE}")
    mask_id = adapter.require_mask_token()
    layers = tuple(sorted(saes))
    for L in layers:
        _check_sae(adapter, L, saes[L])
    K = min(s.k for s in saes.values()) if top_k is None else top_k
    if isinstance(K, bool) or not isinstance(K, int) or not 1 <= K <= min(s.k for s in saes.values()):
        raise ValueError(f"top_k must be in 1..{min(s.k for s in saes.values())} (the SAEs' k), got {top_k!r}")
    history = gen.history.to(adapter.device)                                  # [S+1, B, T]
    S1, B, T = history.shape
    gen_pos = gen.gen_positions.to(adapter.device)                             # [B, G]
    G = gen_pos.shape[1]
    tokens = history.gather(2, gen_pos[None].expand(S1, -1, -1))               # [S+1, B, G]
    masked = tokens == mask_id
    if not masked[0].any():
        raise ValueError("the history's start state has no masked generated position: nothing was decoded")
    flat = history.reshape(S1 * B, T)
    attention = gen.attention_mask.to(adapter.device).repeat(S1, 1)
    pos = gen_pos.repeat(S1, 1)                                               # [(S+1)·B, G]
    ids = torch.empty((len(layers), S1 * B, G, K), dtype=torch.int32, device=adapter.device)
    vals = torch.empty((len(layers), S1 * B, G, K), dtype=torch.float16, device=adapter.device)
    for start in range(0, S1 * B, batch_rows):
        rows = slice(start, start + batch_rows)
        hs = adapter.forward_until(flat[rows], layers, attention_mask=attention[rows])
        for li, L in enumerate(layers):
            h = hs[L].gather(1, pos[rows, :, None].expand(-1, -1, hs[L].shape[-1]))   # [b, G, d]
            i, v = top_latents(saes[L], h, K)
            ids[li, rows], vals[li, rows] = i, v.to(torch.float16)
    shape = (len(layers), S1, B, G, K)
    return FeatureTrace(layers, ids.view(shape), vals.view(shape), masked, tokens)


def _phase_mean(x: Tensor, sel: Tensor) -> Tensor:
    """Mean of ``x`` over the transitions (dim 1) where ``sel``; NaN where none."""
    n = sel.sum(1)
    return torch.where(n > 0, (x * sel).sum(1) / n.clamp_min(1), torch.full_like(n, float("nan"),
                                                                                 dtype=torch.float32))


@dataclass
class OrderStats:
    """Per (layer, row, generated position) statistics of a trace (``[L, B, G]``; NaN where a phase has no
    transition), plus the masked positions' stability per step."""

    layers: tuple[int, ...]
    #: pre-decode: mean Jaccard of consecutive top-K sets, top-1 lock ratio, mean |Δ top-1 value|
    pre_stability: Tensor
    lock_ratio: Tensor
    pre_top1_delta: Tensor
    #: post-decode: mean 1 − Jaccard, top-1 changes (count), std of the top-1 value, token changes (count)
    post_drift: Tensor
    top1_flips: Tensor
    post_top1_std: Tensor
    revisions: Tensor
    #: ``[B, G]``: the step that committed the position (``S`` if never)
    commit_step: Tensor
    #: ``[L, S]``: mean Jaccard over the positions masked before and after step s (NaN if none)
    step_stability: Tensor

    def per_position(self, name: str) -> Tensor:
        """``[L, G]``: a statistic averaged over rows (NaNs skipped)."""
        return torch.nanmean(getattr(self, name).float(), dim=1)

    def as_dict(self) -> dict:
        names = ("pre_stability", "lock_ratio", "pre_top1_delta", "post_drift", "top1_flips", "post_top1_std",
                 "revisions")
        return {"layers": list(self.layers),
                "per_position": {n: self.per_position(n).tolist() for n in names},
                "mean": {n: torch.nanmean(getattr(self, n).float(), dim=(1, 2)).tolist() for n in names},
                "step_stability": self.step_stability.tolist()}


def order_statistics(trace: FeatureTrace) -> OrderStats:
    """The statistics of the module docstring, for every generated position of every row."""
    ids, vals = trace.ids, trace.values.float()                                # [L, S+1, B, G, K]
    pre = trace.masked[:-1] & trace.masked[1:]                                 # [S, B, G]
    post = ~trace.masked[:-1] & ~trace.masked[1:]
    J = jaccard(ids[:, :-1], ids[:, 1:]).float()                               # [L, S, B, G]
    top1, v1 = ids[..., 0], vals[..., 0]                                       # [L, S+1, B, G]
    changed = (top1[:, 1:] != top1[:, :-1]).float()
    dv = (v1[:, 1:] - v1[:, :-1]).abs()
    pre_l, post_l = pre[None].expand_as(J), post[None].expand_as(J)
    decoded = (~trace.masked)[None].expand_as(v1).float()                      # [L, S+1, B, G]
    n_dec = decoded.sum(1)
    mean_dec = (v1 * decoded).sum(1) / n_dec.clamp_min(1)
    var_dec = ((v1 - mean_dec[:, None]) ** 2 * decoded).sum(1) / (n_dec - 1).clamp_min(1)
    post_std = torch.where(n_dec > 1, var_dec.sqrt(), torch.full_like(var_dec, float("nan")))
    tok_changed = (trace.tokens[1:] != trace.tokens[:-1]) & post                # [S, B, G]
    S = pre.shape[0]
    ever = ~trace.masked[-1]
    first_unmasked = (~trace.masked[1:]).float().argmax(0)                     # the state after the commit, − 1
    commit_step = torch.where(ever & trace.masked[0], first_unmasked, torch.full_like(first_unmasked, S))
    n_pre = pre.sum((1, 2))                                                    # [S]
    step_stab = torch.where(n_pre > 0, (J * pre_l).sum((2, 3)) / n_pre.clamp_min(1),
                            torch.full((J.shape[0], S), float("nan"), device=J.device))
    return OrderStats(
        trace.layers,
        pre_stability=_phase_mean(J, pre_l), lock_ratio=_phase_mean(1 - changed, pre_l),
        pre_top1_delta=_phase_mean(dv, pre_l), post_drift=_phase_mean(1 - J, post_l),
        top1_flips=(changed * post_l).sum(1), post_top1_std=post_std,
        revisions=tok_changed.sum(0)[None].expand(len(trace.layers), -1, -1).float(),
        commit_step=commit_step, step_stability=step_stab)


def feature_counts(trace: FeatureTrace, n_latents: int) -> Tensor:
    """``[L, S + 1, n]`` float: ``C_t(f)``, the number of (row, position) whose top-K holds f at state t."""
    L, S1, B, G, K = trace.ids.shape
    ids = trace.ids.reshape(L, S1, -1).long()
    if ids.numel() and int(ids.max()) >= n_latents:
        raise ValueError(f"the trace holds latent {int(ids.max())}, beyond n_latents={n_latents}")
    valid = ids >= 0
    out = torch.zeros(L, S1, n_latents + 1, device=ids.device)
    out.scatter_add_(2, torch.where(valid, ids, n_latents), valid.float())   # −1 goes to a spare slot
    return out[..., :n_latents]


def order_sensitive_features(ref: FeatureTrace, other: FeatureTrace, n_latents: int, *, top: int = 20
                             ) -> dict[int, list[tuple[int, float]]]:
    """Per layer, the ``top`` latents by ``Σ_t |C_ref(t, f) − C_other(t, f)|`` (two runs of the same prompts
    and number of steps under different orders), as ``(latent, score)``."""
    if ref.layers != other.layers:
        raise ValueError(f"the traces were replayed at different layers: {list(ref.layers)} vs {list(other.layers)}")
    if ref.ids.shape[1:4] != other.ids.shape[1:4]:
        raise ValueError(f"the traces differ in (states, rows, positions): {tuple(ref.ids.shape[1:4])} vs "
                         f"{tuple(other.ids.shape[1:4])}; compare runs with the same prompts and steps")
    score = (feature_counts(ref, n_latents) - feature_counts(other, n_latents)).abs().sum(1)    # [L, n]
    top = min(top, n_latents)
    best = score.topk(top, dim=-1)
    return {L: [(int(i), float(v)) for i, v in zip(best.indices[li], best.values[li])]
            for li, L in enumerate(ref.layers)}


class SAEStabilityGuide:
    """A sampler ``guide``: masked positions whose top-K SAE latents at ``layer`` are the same set as at the
    previous step (Jaccard ≥ ``threshold``) rank above all others; confidence orders within each group. At
    the first step nothing has a previous set, so the order is the confidence order."""

    def __init__(self, sae, layer: int, *, top_k: int | None = None, threshold: float = 1.0):
        self.sae, self.layer = sae, layer
        self.top_k = sae.k if top_k is None else top_k
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 1 <= self.top_k <= sae.k:
            raise ValueError(f"top_k must be in 1..{sae.k} (the SAE's k), got {top_k!r}")
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self._h: Tensor | None = None
        self._prev: Tensor | None = None

    @contextlib.contextmanager
    def attach(self, adapter) -> Iterator[None]:
        """Capture block ``layer``'s output on every forward of the run."""
        _check_sae(adapter, self.layer, self.sae)
        self._h, self._prev = None, None

        def keep(hidden: Tensor) -> None:
            self._h = hidden

        try:
            with hooks.capture(adapter.hook_module(self.layer), keep):
                yield
        finally:
            self._h, self._prev = None, None

    @torch.no_grad()
    def rank(self, conf: Tensor, gen_pos: Tensor, masked: Tensor) -> Tensor:
        """``[B, G]`` scores replacing ``conf`` (the step's confidence at the generated positions)."""
        if self._h is None:
            raise RuntimeError("SAEStabilityGuide.rank called outside attach(): no activations captured")
        h = self._h[:gen_pos.shape[0]]                                         # CFG runs 2B rows: the conditional half
        h = h.gather(1, gen_pos[..., None].expand(-1, -1, h.shape[-1]))
        ids, _ = top_latents(self.sae, h, self.top_k)                          # [B, G, K]
        stable = (jaccard(ids, self._prev) >= self.threshold) if self._prev is not None else \
            torch.zeros_like(masked)
        self._prev = ids
        finite = torch.where(torch.isfinite(conf), conf, torch.zeros_like(conf))
        lift = finite.max() - finite.min() + 1                                 # above every unstable score
        return torch.where(stable & masked, conf + lift, conf)


#: Dream's confidence measures (``origin`` reveals at random and has none)
DREAM_CONFIDENCE_ALGS = ("maskgit_plus", "topk_margin", "entropy")


class LogitsTap:
    """An adapter whose every ``logits`` call is kept (``last``) for a guide that ranks by the step's whole
    distribution (:class:`DreamConfidence`); everything else is the wrapped adapter's."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.last: Tensor | None = None

    def __getattr__(self, name):
        return getattr(self.adapter, name)

    def logits(self, *args, **kwargs) -> Tensor:
        self.last = self.adapter.logits(*args, **kwargs)
        return self.last


class DreamConfidence:
    """A guide for :func:`~dlmscope.models.sampling.llada_fill` run on ``tap``: the masked positions rank by
    Dream's confidence ``alg`` of the step's logits (``maskgit_plus`` the top probability, ``topk_margin`` top-1
    − top-2, ``entropy`` Σ p log p), so Dream's algorithm commits LLaDA's counts per step; ``then`` (e.g. an
    :class:`SAEStabilityGuide`) re-ranks after. Tokens are the argmax in both samplers at temperature 0, the
    only temperature this matches; no CFG."""

    def __init__(self, tap: LogitsTap, alg: str, then=None):
        check_choice("alg", alg, DREAM_CONFIDENCE_ALGS)
        self.tap, self.alg, self.then = tap, alg, then

    @contextlib.contextmanager
    def attach(self, adapter) -> Iterator[None]:
        self.tap.last = None
        with self.then.attach(adapter) if self.then is not None else contextlib.nullcontext():
            try:
                yield
            finally:
                self.tap.last = None

    @torch.no_grad()
    def rank(self, conf: Tensor, gen_pos: Tensor, masked: Tensor) -> Tensor:
        """``[B, G]``: Dream's confidence at the generated positions (``conf``, LLaDA's, is not used)."""
        logits = self.tap.last
        if logits is None or logits.shape[0] != gen_pos.shape[0]:
            raise RuntimeError("DreamConfidence.rank needs the step's logits, one row per canvas row: run the "
                               "sampler on the LogitsTap, inside attach(), without CFG")
        gl = logits.gather(1, gen_pos[..., None].expand(-1, -1, logits.shape[-1])).float()
        _, dream_conf = dream_tokens(gl, self.alg, 0.0, None, None, None)
        return self.then.rank(dream_conf, gen_pos, masked) if self.then is not None else dream_conf


def _floats(values) -> Tensor:
    return torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float64)


def group_correlation(x, y, groups, *, within: bool = True, n_total: int | None = None, units: str = "tasks",
                      **kw) -> dict:
    """Pearson r between a per-task statistic ``x`` and the outcome ``y`` (exact match), one value per task,
    ``groups`` naming each task's group. Tasks where either is NaN / None are dropped; then the groups whose
    ``y`` does not vary are left out. ``within``: both sides centred per group first (a correlation within
    groups, not between their difficulties). Returns the bootstrap :class:`Interval` over tasks (its fields),
    ``sign``, ``fisher_z`` (atanh r · √(n − 3), or √(n − g − 2) within g groups), ``verdict``
    ("association" when the interval excludes 0, of either sign; "none"; "undefined" without an r),
    ``excluded_groups`` ``{group: tasks}`` and ``denominator`` ("over n ``units`` of ``n_total``", default
    every task given)."""
    xv, yv = _floats(x), _floats(y)
    groups = list(groups)
    if not len(xv) == len(yv) == len(groups):
        raise ValueError(f"x, y and groups must have one value per task, got {len(xv)}, {len(yv)}, {len(groups)}")
    ok = ~(torch.isnan(xv) | torch.isnan(yv))
    keep = torch.zeros_like(ok)
    excluded: dict = {}
    for g in dict.fromkeys(groups):
        sel = ok & torch.tensor([gg == g for gg in groups])
        if not sel.any():
            continue
        if bool((yv[sel] == yv[sel][0]).all()):
            excluded[str(g)] = int(sel.sum())
            continue
        keep |= sel
        if within:
            xv[sel] = xv[sel] - xv[sel].mean()
            yv[sel] = yv[sel] - yv[sel].mean()
    n_groups = len({g for g, k in zip(groups, keep.tolist()) if k})
    iv = correlation(xv[keep], yv[keep], **kw)
    n = int(keep.sum())
    df = n - (n_groups + 2 if within else 3)
    z = math.atanh(max(-1 + 1e-12, min(1 - 1e-12, iv.mean))) * math.sqrt(df) if iv.mean == iv.mean and df > 0 \
        else float("nan")
    verdict = "undefined" if iv.low != iv.low else "association" if iv.excludes_zero() else "none"
    total = len(groups) if n_total is None else n_total
    denominator = f"over {n} {units} of {total}" + (
        "; out for zero outcome variance: " + ", ".join(f"{g} ({k} task{'' if k == 1 else 's'})" for g, k in excluded.items())
        if excluded else "")
    return {"mean": iv.mean, "low": iv.low, "high": iv.high, "n": n, "over": {"tasks": n},
            "sign": "positive" if iv.mean > 0 else "negative" if iv.mean < 0 else "none",
            "fisher_z": z, "verdict": verdict, "within_groups": within, "excluded_groups": excluded,
            "denominator": denominator}


def conjecture_verdict(per_order: Mapping[str, dict]) -> dict:
    """The paper's conjecture (feature dynamics track decoding quality; it has no sign) over orders, from one
    :func:`group_correlation` per order: "association" when more than half of the orders with an r have a
    robust one (interval excluding 0, either sign), "partly" when some do, "not reproduced" when none does;
    ``sign`` says which way (positive, negative or mixed)."""
    rated = {o: c for o, c in per_order.items() if c["verdict"] != "undefined"}
    positive = [o for o, c in rated.items() if c["verdict"] == "association" and c["mean"] > 0]
    negative = [o for o, c in rated.items() if c["verdict"] == "association" and c["mean"] < 0]
    robust = len(positive) + len(negative)
    verdict = "association" if robust > len(rated) / 2 else "partly" if robust else "not reproduced"
    sign = None if not robust else "positive" if not negative else "negative" if not positive else "mixed"
    detail = "; ".join(f"{o} r = {c['mean']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}] {c['denominator']}"
                       for o, c in rated.items())
    return {"verdict": verdict, "sign": sign, "positive": positive, "negative": negative, "orders": list(rated),
            "text": f"{verdict}: a robust correlation at {robust} of {len(rated)} orders"
                    + (f" ({sign})" if sign else "") + (f": {detail}" if detail else "")}
