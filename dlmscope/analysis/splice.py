"""SAE splice-in and ΔLM loss for diffusion and autoregressive LMs (held-out FVE / L0 / dead latents need no
model: :func:`dlmscope.sae.metrics.evaluate_sae`).

* :func:`splice` — a context manager replacing block L's output (resid_post) by the SAE reconstruction,
  optionally plus the error term ``x − x̂`` (then the model's output is bit-for-bit the clean one, while
  gradients still reach the SAE's latents), optionally only at some positions (``"masked"``, ``"unmasked"``
  or a bool ``[B, T]`` / ``[T]`` mask).
* :func:`dlm_delta_loss` — docs/reference.md §4: one masked input (``t ~ U[t_min, t_max]``, position 0 and pads
  never masked) scored clean, with the SAE spliced in at every position (no error term) and with block L
  zero-ablated; ``L_mask = Σ_{masked} CE / t / #masked`` and the auxiliary ``L_unmask`` (unmasked non-pad
  positions except 0, weight ``1/(1−t)``). Logits come from ``adapter.logits`` (aligned: Dream's shift applied).
* :func:`ar_delta_loss` — next-token CE on clean text, clean vs SAE vs zero-ablation, fraction recovered.
* :func:`scale_free` / :func:`compare_deltas` — scale-free numbers (Δ/clean, fraction of loss recovered vs
  zero-ablation) that make the DLM and AR deltas comparable despite different objectives.

The estimators over batches (the paper's pooled one and the per-batch mean, each with its SE) live in
:mod:`dlmscope.analysis.estimators` and are re-exported here. :func:`delta_loss_over_batches` returns the
pooled numbers with the per-batch ones beside them, and by default
draws the batches' masking rates stratified (:func:`stratified_ts`). Batches with no masked (or unmasked)
position contribute a loss of 0 for that term (the empty sum) and report ``n_masked = 0``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dlmscope.analysis.estimators import (ESTIMATORS, HEADLINE_DELTAS, average_results, collapsed_strata,
                                         fraction_recovered, per_batch_results, pooled_results, relative_se)
from dlmscope.data.noise import T_MAX, T_MIN, check_t_range, corrupt, draw_t, valid_positions
from dlmscope.models import hooks
from dlmscope.models.hooks import InputIds

__all__ = [
    "splice",
    "zero_ablate",
    "dlm_delta_loss",
    "delta_loss_over_batches",
    "delta_loss_by_layer",
    "ar_delta_loss",
    "scale_free",
    "compare_deltas",
    "average_results",
    "per_batch_results",
    "pooled_results",
    "collapsed_strata",
    "stratified_ts",
    "relative_se",
    "HEADLINE_DELTAS",
    "ESTIMATORS",
    "fraction_recovered",
]


# ----------------------------------------------------------------------------------------------- splicing
def _sae_dtype(sae) -> torch.dtype | None:
    try:
        return next(sae.parameters()).dtype
    except (AttributeError, StopIteration):
        return None


def _sae_d(sae) -> int | None:
    cfg = getattr(sae, "cfg", None)
    d = getattr(cfg, "d", None)
    return int(d) if d is not None else None


def _position_mask(positions, ids: Tensor | None, adapter, shape: torch.Size, device) -> Tensor | None:
    if positions is None:
        return None
    B, T = shape[0], shape[1]
    if isinstance(positions, str):
        if ids is None:
            raise RuntimeError("splice(positions=...) needs the input ids, but the model was called without them")
        mask_id = adapter.require_mask_token()
        sel = ids == mask_id
        return (sel if positions == "masked" else ~sel).to(device)
    pm = positions.to(device=device, dtype=torch.bool)
    if pm.dim() == 1:
        pm = pm.unsqueeze(0).expand(B, -1)
    if tuple(pm.shape) != (B, T):
        raise ValueError(f"splice positions mask has shape {tuple(positions.shape)}, expected [{B}, {T}] or [{T}]")
    return pm


@contextlib.contextmanager
def splice(adapter, layer: int, sae, *, error_term: bool = False, positions=None) -> Iterator[None]:
    """Within the block, block ``layer``'s output is replaced by ``sae(x)`` (the reconstruction x̂).

    ``sae`` is a :class:`~dlmscope.sae.topk.TopKSAE` or any module / callable mapping ``[..., d] → [..., d]``; it
    runs in its own parameter dtype and the result is cast back to the model's dtype.

    ``error_term=True`` adds ``x − x̂``: the output value is exactly ``x`` (computed as
    ``x + (x̂ − x̂.detach())``, which is exact), the gradient w.r.t. ``x`` is the clean model's and gradients
    still reach the SAE (its latents and parameters) through ``x̂``.

    ``positions``: ``None`` (every position), ``"masked"`` / ``"unmasked"`` (positions whose input token is /
    is not the mask token — needs a mask token) or a bool tensor ``[B, T]`` / ``[T]``; other positions keep x.
    """
    module = adapter.hook_module(layer)  # ValueError if out of range
    if isinstance(positions, str) and positions not in ("masked", "unmasked"):
        raise ValueError(f"positions must be None, 'masked', 'unmasked' or a bool tensor, got {positions!r}")
    if isinstance(positions, str):
        adapter.require_mask_token()
    elif positions is not None and not isinstance(positions, Tensor):
        raise ValueError(f"positions must be None, 'masked', 'unmasked' or a bool tensor, got {type(positions)}")
    d_model = getattr(adapter, "d_model", None)
    d_sae = _sae_d(sae)
    if d_model is not None and d_sae is not None and d_sae != d_model:
        raise ValueError(f"SAE input size d={d_sae} does not match the model's hidden size {d_model}")
    sae_dtype = _sae_dtype(sae)

    def spliced(x: Tensor) -> Tensor:
        xs = x.to(sae_dtype) if sae_dtype is not None and x.dtype != sae_dtype else x
        if error_term:
            xs = xs.detach()
        x_hat = sae(xs)
        if error_term:
            new = x + (x_hat - x_hat.detach()).to(x.dtype)
        else:
            new = x_hat.to(x.dtype)
        pm = _position_mask(positions, seen.ids, adapter, x.shape, x.device)
        if pm is not None:
            new = torch.where(pm.unsqueeze(-1), new, x)
        return new

    # the input ids are needed only to find the (un)masked positions
    recorder = (hooks.record_input_ids(adapter.model) if isinstance(positions, str)
                else contextlib.nullcontext(InputIds()))
    with recorder as seen, hooks.replace(module, spliced):
        yield


class _Zero(torch.nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)


def zero_ablate(adapter, layer: int, positions=None):
    """Context manager: within it, block ``layer``'s output (resid_post) is replaced by zeros (at ``positions``,
    as in :func:`splice`)."""
    return splice(adapter, layer, _Zero(), positions=positions)


# ------------------------------------------------------------------------------------------------ losses
def _token_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-position CE ``[B, T]`` in float32."""
    B, T, V = logits.shape
    return F.cross_entropy(logits.float().reshape(B * T, V), targets.reshape(B * T), reduction="none").reshape(B, T)


def _masked_mean(ce: Tensor, sel: Tensor) -> Tensor:
    sel = sel.to(ce.dtype)
    return (ce * sel).sum() / sel.sum().clamp_min(1.0)


def _run_variants(adapter, by_layer: dict[int, list], loss_fn, ids, attention_mask, *, zero_ablation: bool,
                  positions=None) -> dict[int, dict]:
    """Loss tensors of one batch per layer: ``{layer: {"clean": ..., i: ... per SAE, "zero": ...}}``. One clean
    forward serves every layer and SAE; each layer's SAE and zero-ablated forwards replay blocks ``0 … layer−1``,
    which they do not change, from it (its block outputs are kept up to the deepest layer)."""
    blocks = list(adapter.blocks)[:max(by_layer)]
    with hooks.record_outputs(blocks) as recorded:
        clean = loss_fn(adapter.logits(ids, attention_mask))
    out = {}
    for layer, saes in by_layer.items():
        vals = {"clean": clean}
        runs = [(i, splice(adapter, layer, sae, positions=positions)) for i, sae in enumerate(saes)]
        if zero_ablation:
            runs.append(("zero", zero_ablate(adapter, layer, positions)))
        for name, ctx in runs:
            with hooks.replay_outputs(blocks[:layer], recorded[:layer]), ctx:
                vals[name] = loss_fn(adapter.logits(ids, attention_mask))
        out[layer] = vals
    return out


def _as_list(sae) -> tuple[list, bool]:
    """``(saes, many)``: a list/tuple of SAEs is compared on the same batch; a single one gives one result."""
    return (list(sae), True) if isinstance(sae, (list, tuple)) else ([sae], False)


@torch.no_grad()
def dlm_delta_loss(
    adapter,
    sae,
    layer: int,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    t_min: float = T_MIN,
    t_max: float = T_MAX,
    generator: torch.Generator | None = None,
    *,
    zero_ablation: bool = True,
    t: float | None = None,
    positions=None,
) -> dict[str, float] | list[dict[str, float]]:
    """DLM ΔLM loss of one batch (docs/reference.md §4), clean vs SAE spliced at every position (no error term).

    ``sae`` may be a list of SAEs: each is spliced in on the same corrupted batch, the clean and zero-ablated
    forwards run once, and a list of result dicts comes back.
    ``t`` (if given) fixes the masking rate instead of drawing it from ``U[t_min, t_max]``. ``positions``
    (default: every position, as in the paper) limits the splice (and the zero-ablation), see :func:`splice`,
    e.g. ``"masked"``. Returns floats:
    ``t, n_masked, n_unmasked, mask_clean, mask_sae, mask_delta, unmask_clean, unmask_sae, unmask_delta`` and,
    with ``zero_ablation``, ``mask_zero, unmask_zero, mask_recovered, unmask_recovered``.
    """
    if not adapter.is_diffusion:
        raise ValueError("dlm_delta_loss needs a diffusion LM; use ar_delta_loss for autoregressive models")
    mask_id = adapter.require_mask_token()
    adapter.hook_module(layer)  # validates the layer
    t_min, t_max = check_t_range(t_min, t_max)
    if t is None:
        t = draw_t(t_min, t_max, generator)
    saes, many = _as_list(sae)
    results = _dlm_batch(adapter, {layer: saes}, input_ids, attention_mask, t, generator, mask_id,
                         zero_ablation=zero_ablation, positions=positions)[layer]
    return results if many else results[0]


def _dlm_batch(adapter, by_layer: dict[int, list], input_ids: Tensor, attention_mask: Tensor | None, t: float,
               generator, mask_id: int, *, zero_ablation: bool, positions=None) -> dict[int, list[dict]]:
    """:func:`dlm_delta_loss` of one batch at masking rate ``t`` for every layer's SAEs (one corruption, one clean
    forward, one host sync): ``{layer: [result dict per SAE]}``."""
    t = float(t)
    if not 0.0 < t < 1.0:
        raise ValueError(f"the masking rate t must lie in (0, 1), got {t}")
    noisy, masked = corrupt(input_ids, attention_mask, mask_id, t, generator)
    valid = valid_positions(input_ids, attention_mask)
    unmasked = valid & ~masked
    unmasked[:, 0] = False

    def losses(logits: Tensor) -> tuple[Tensor, Tensor]:
        ce = _token_ce(logits, input_ids)
        return _masked_mean(ce, masked) / t, _masked_mean(ce, unmasked) / (1.0 - t)

    vals = _run_variants(adapter, by_layer, losses, noisy, attention_mask, zero_ablation=zero_ablation,
                         positions=positions)
    counts = torch.stack([masked.sum(), unmasked.sum()]).to(dtype=torch.float32)
    pairs = [(layer, name, pair) for layer, v in vals.items() for name, pair in v.items()]
    flat = torch.cat([torch.stack([x for *_, pair in pairs for x in pair]).float(),
                      counts.to(pairs[0][2][0].device)]).tolist()  # one host sync
    got = {(layer, name): (flat[2 * j], flat[2 * j + 1]) for j, (layer, name, _) in enumerate(pairs)}
    out = {}
    for layer, saes in by_layer.items():
        results = []
        for i in range(len(saes)):
            r: dict[str, float] = {"t": t, "n_masked": int(flat[-2]), "n_unmasked": int(flat[-1])}
            for name, key in (("clean", "clean"), (i, "sae"), ("zero", "zero")):
                if (layer, name) in got:
                    r[f"mask_{key}"], r[f"unmask_{key}"] = got[(layer, name)]
            r["mask_delta"] = r["mask_sae"] - r["mask_clean"]
            r["unmask_delta"] = r["unmask_sae"] - r["unmask_clean"]
            if zero_ablation:
                r["mask_recovered"] = fraction_recovered(r["mask_clean"], r["mask_sae"], r["mask_zero"])
                r["unmask_recovered"] = fraction_recovered(r["unmask_clean"], r["unmask_sae"], r["unmask_zero"])
            results.append(r)
        out[layer] = results
    return out


@torch.no_grad()
def ar_delta_loss(
    adapter,
    sae,
    layer: int,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    zero_ablation: bool = True,
) -> dict[str, float] | list[dict[str, float]]:
    """AR ΔLM loss of one batch: mean next-token CE on clean text, clean vs SAE (every position) vs zero.

    Position i's logits score token i+1; a target counts when both it and its context position are non-pad.
    Returns ``clean, sae, delta, n_tokens`` and, with ``zero_ablation``, ``zero, recovered`` (a list of such
    dicts when ``sae`` is a list: clean and zero-ablated forwards run once for all of them).
    """
    if adapter.is_diffusion:
        raise ValueError("ar_delta_loss is for autoregressive models; use dlm_delta_loss for diffusion LMs")
    adapter.hook_module(layer)
    saes, many = _as_list(sae)
    results = _ar_batch(adapter, {layer: saes}, input_ids, attention_mask, zero_ablation=zero_ablation)[layer]
    return results if many else results[0]


def _ar_batch(adapter, by_layer: dict[int, list], input_ids: Tensor, attention_mask: Tensor | None, *,
              zero_ablation: bool) -> dict[int, list[dict]]:
    """:func:`ar_delta_loss` of one batch for every layer's SAEs (one clean forward, one host sync):
    ``{layer: [result dict per SAE]}``."""
    if input_ids.shape[1] < 2:
        raise ValueError("ar_delta_loss needs sequences of at least 2 tokens")
    valid = valid_positions(input_ids, attention_mask)
    sel = valid[:, 1:] & valid[:, :-1]
    targets = input_ids[:, 1:]

    def loss(logits: Tensor) -> Tensor:
        return _masked_mean(_token_ce(logits[:, :-1], targets), sel)

    vals = _run_variants(adapter, by_layer, loss, input_ids, attention_mask, zero_ablation=zero_ablation)
    keys = [(layer, name) for layer, v in vals.items() for name in v]
    stacked = torch.stack([vals[L][name] for L, name in keys] + [sel.sum().to(vals[keys[0][0]]["clean"])]).tolist()
    flat, n_tokens = dict(zip(keys, stacked)), int(stacked[-1])  # one host sync
    out = {}
    for layer, saes in by_layer.items():
        results = []
        for i in range(len(saes)):
            r: dict[str, float] = {"clean": flat[(layer, "clean")], "sae": flat[(layer, i)]}
            if zero_ablation:
                r["zero"] = flat[(layer, "zero")]
            r["delta"] = r["sae"] - r["clean"]
            r["n_tokens"] = n_tokens
            if zero_ablation:
                r["recovered"] = fraction_recovered(r["clean"], r["sae"], r["zero"])
            results.append(r)
        out[layer] = results
    return out


def stratified_ts(n: int, t_min: float = T_MIN, t_max: float = T_MAX,
                  generator: torch.Generator | None = None) -> list[float]:
    """``n`` masking rates, one uniform draw in each of ``n`` equal strata of ``[t_min, t_max]``, in a seeded
    random order (so the batch order does not carry t). Marginally each is ``U[t_min, t_max]`` as in the paper;
    together they cover the range evenly, which removes most of the between-batch variance that t adds."""
    t_min, t_max = check_t_range(t_min, t_max)
    if n < 1:
        raise ValueError(f"need at least one masking rate, got n={n}")
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    order = torch.randperm(n, generator=generator)
    ts = t_min + (t_max - t_min) * (order.double() + u) / n
    # never exactly 0 or 1 (dlm_delta_loss needs t in (0, 1))
    return [min(max(float(t), 1e-6), 1.0 - 1e-6) for t in ts]


def delta_loss_over_batches(adapter, saes: Sequence, layer: int, batches: Sequence[Tensor], *, seed: int,
                            t_sampling: str = "stratified", t_min: float = T_MIN, t_max: float = T_MAX,
                            target_rel_se: float | None = None, round_batches: int | None = None) -> list[dict]:
    """Per SAE, the ΔLM over ``batches`` by the paper's pooled estimator (:func:`pooled_results`), with
    ``per_batch`` (:func:`per_batch_results`) beside it; ``estimator = "pooled"`` and ``se_over`` name them
    (``"batches"``, or with stratified t ``"batches, collapsed strata"``: the SEs treat each round's batches as
    one per t stratum and pool adjacent strata in pairs, :func:`~dlmscope.analysis.estimators.collapsed_strata`,
    instead of counting the spread of t that the stratification removed). A DLM gets one corruption per batch seeded
    by ``seed`` (the same for every SAE; the clean and zero-ablated forwards run once per batch for all of them) at
    masking rates ``t_sampling = "stratified"`` (:func:`stratified_ts` over ``[t_min, t_max]``, drawn from the same
    seed) or ``"iid"`` (``U[t_min, t_max]`` per batch, as the paper); an AR model gets next-token CE. Keys: those of
    :func:`pooled_results`, ``t_sampling`` for a DLM, and ``rel_se`` (:func:`relative_se`).

    ``target_rel_se`` (e.g. 0.1: a standard error below a tenth of the effect) makes the evaluation sequential:
    rounds of ``round_batches`` batches (default a quarter of ``batches``; each round's t stratified on its own), an
    SAE leaving once every ΔLM of its result has ``SE < target_rel_se · |Δ|``, until ``batches`` run out. Every SAE
    of a round sees the same corruptions, so an SAE's batches are a prefix of ``batches``. Results then carry
    ``se_target`` and ``se_target_met`` (False: the batches ran out first — the effect is not resolved at that
    precision). Stopping on the estimate's own SE biases |Δ| slightly upward and favours a round whose SE came out
    low (with stratified t a round of 12 batches gives the SE 6 degrees of freedom); an unmet target is reported,
    never hidden."""
    return delta_loss_by_layer(adapter, {layer: saes}, batches, seed=seed, t_sampling=t_sampling, t_min=t_min,
                               t_max=t_max, target_rel_se=target_rel_se, round_batches=round_batches)[layer]


def delta_loss_by_layer(adapter, saes_by_layer: Mapping[int, Sequence], batches: Sequence[Tensor], *, seed: int,
                        t_sampling: str = "stratified", t_min: float = T_MIN, t_max: float = T_MAX,
                        target_rel_se: float | None = None,
                        round_batches: int | None = None) -> dict[int, list[dict]]:
    """:func:`delta_loss_over_batches` of several layers' SAEs at once: ``{layer: [result per SAE]}``, each layer's
    equal to its own call's (the same seed gives every layer the same t and corruption per batch). One clean
    forward per batch serves every layer; each layer's SAE and zero-ablated forwards replay blocks ``0 … L−1``
    from it (the clean forward's block outputs are kept up to the deepest layer: one hidden state per block)."""
    by_layer = {adapter.check_layer(L): list(saes) for L, saes in saes_by_layer.items()}
    batches = list(batches)
    if not by_layer or not all(by_layer.values()):
        raise ValueError("delta_loss_by_layer needs at least one SAE for every layer it is given")
    if not batches:
        raise ValueError("delta_loss_over_batches needs at least one batch")
    if adapter.is_diffusion and t_sampling not in ("stratified", "iid"):
        raise ValueError(f"t_sampling must be 'stratified' or 'iid', got {t_sampling!r}")
    if target_rel_se is not None and not target_rel_se > 0:
        raise ValueError(f"target_rel_se must be > 0, got {target_rel_se}")
    size = len(batches) if target_rel_se is None else (
        max(2, len(batches) // 4) if round_batches is None else round_batches)
    if size < 1:
        raise ValueError(f"round_batches must be >= 1, got {round_batches}")
    if adapter.is_diffusion:
        mask_id = adapter.require_mask_token()
        t_min, t_max = check_t_range(t_min, t_max)
    gen = torch.Generator().manual_seed(seed)
    seen = {L: [[] for _ in saes] for L, saes in by_layer.items()}
    rounds: list[int] = []   # the round of each batch, for the strata of stratified t
    stratified = adapter.is_diffusion and t_sampling == "stratified"

    def combine(mine: list[dict], estimator=pooled_results) -> dict:
        strata = collapsed_strata([r["t"] for r in mine], rounds[:len(mine)]) if stratified else None
        return estimator(mine, strata)

    active = {L: list(range(len(saes))) for L, saes in by_layer.items()}
    for start in range(0, len(batches), size):
        chunk = batches[start:start + size]
        groups = {L: [by_layer[L][i] for i in act] for L, act in active.items() if act}
        if adapter.is_diffusion:
            ts = stratified_ts(len(chunk), t_min, t_max, gen) if stratified else [None] * len(chunk)
            per_batch = [_dlm_batch(adapter, groups, ids, None, draw_t(t_min, t_max, gen) if t is None else t, gen,
                                    mask_id, zero_ablation=True) for ids, t in zip(chunk, ts)]
        else:
            per_batch = [_ar_batch(adapter, groups, ids, None, zero_ablation=True) for ids in chunk]
        rounds.extend([start] * len(chunk))
        for L in groups:
            for j, i in enumerate(active[L]):
                seen[L][i].extend(batch[L][j] for batch in per_batch)
        if target_rel_se is None:
            continue
        active = {L: [i for i in act if not relative_se(combine(seen[L][i])) < target_rel_se]
                  for L, act in active.items()}
        if not any(active.values()):
            break
    return {L: [_summary(mine, combine, stratified, t_sampling if adapter.is_diffusion else None, target_rel_se)
                for mine in per_sae] for L, per_sae in seen.items()}


def _summary(mine: list[dict], combine, stratified: bool, t_sampling: str | None,
             target_rel_se: float | None) -> dict:
    """One SAE's result over its batches: the pooled estimator, the per-batch one beside it, the SE's unit
    (``t_sampling``: a DLM's, None for an AR model)."""
    out: dict = {**combine(mine), "estimator": "pooled", "se_over": "batches, collapsed strata" if stratified
                 else "batches", "per_batch": combine(mine, per_batch_results)}
    out["rel_se"] = relative_se(out)
    if t_sampling is not None:
        out["t_sampling"] = t_sampling
    if target_rel_se is not None:
        out["se_target"] = target_rel_se
        out["se_target_met"] = bool(out["rel_se"] < target_rel_se)
    return out


# ---------------------------------------------------------------------------------------- scale-free views
def scale_free(result: dict[str, float], prefix: str | None = None) -> dict[str, float]:
    """Scale-free numbers from a :func:`dlm_delta_loss` (``prefix="mask_"`` by default) or :func:`ar_delta_loss`
    result: ``delta``, ``clean``, ``rel_delta = delta / clean`` and ``recovered`` (vs zero-ablation, if run)."""
    if prefix is None:
        prefix = "mask_" if "mask_clean" in result else ""
    clean, sae = float(result[f"{prefix}clean"]), float(result[f"{prefix}sae"])
    out = {"clean": clean, "sae": sae, "delta": sae - clean,
           "rel_delta": (sae - clean) / clean if clean else float("nan")}
    if f"{prefix}zero" in result:
        out["recovered"] = fraction_recovered(clean, sae, float(result[f"{prefix}zero"]))
    return out


def compare_deltas(dlm: dict[str, float], ar: dict[str, float], *, dlm_prefix: str = "mask_") -> dict[str, float]:
    """Side-by-side scale-free comparison of a DLM and an AR ΔLM result (e.g. same layer index).

    Keys: ``dlm_*`` / ``ar_*`` for ``delta, rel_delta, recovered`` plus ``rel_delta_gap = dlm − ar`` and
    ``recovered_gap = dlm − ar`` (NaN when zero-ablation was not run).
    """
    d, a = scale_free(dlm, dlm_prefix), scale_free(ar, "")
    out = {}
    for key in ("clean", "delta", "rel_delta", "recovered"):
        out[f"dlm_{key}"] = d.get(key, float("nan"))
        out[f"ar_{key}"] = a.get(key, float("nan"))
    out["rel_delta_gap"] = out["dlm_rel_delta"] - out["ar_rel_delta"]
    out["recovered_gap"] = out["dlm_recovered"] - out["ar_recovered"]
    return out
