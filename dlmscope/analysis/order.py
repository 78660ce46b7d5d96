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
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import Tensor

from dlmscope.models import hooks
from dlmscope.models.sampling import Generation

__all__ = ["FeatureTrace", "replay", "jaccard", "OrderStats", "order_statistics", "feature_counts",
           "order_sensitive_features", "SAEStabilityGuide", "BYTES_PER_LATENT", "top_latents"]

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
