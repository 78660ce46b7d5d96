"""Post-training stability (REFERENCE.md §7): do SAEs trained on a base DLM stay valid on its instruct version?

The paper states the claim without code or protocol. Ours compares, per layer, a *base* SAE (trained on the base
model) with a *target* SAE trained on the target model (the instruct DLM; for the optional control, the AR twin)
at the same layer, with the same policy and recipe:

* **reconstruction** — FVE of the base SAE on base activations, of the base SAE on target activations and of the
  target SAE on target activations, all on the same held-out tokens (:func:`paired_activations` runs both models
  on one corruption of the same text and keeps the same positions);
* **ΔLM** — the base SAE and the target SAE spliced into the target model (one corruption for both), and the base
  SAE in the base model for reference (:func:`~dlmscope.analysis.splice.delta_loss_over_batches`);
* **alive overlap** — latents of the base SAE that fire at least once on base vs on target tokens (Jaccard);
* **activation correlation** — per latent of the base SAE, the Pearson correlation over the same tokens of its
  (Top-K, so mostly zero) activation on base vs on target activations (:func:`latent_agreement`);
* **decoder matching** — signed cosines between base and target decoder rows: the best partner of each base row
  (max-cos) and a one-to-one Hungarian matching (:func:`match_decoders`), beside the same statistics against a
  randomly initialised SAE of the same shape (chance) and, when known, against the SAEs' shared initialisation.

Signed, not absolute, cosines: a Top-K latent only ever adds its direction with a positive weight, so a row and
its negation are different features. SAEs trained by :func:`run_transfer` share their initialisation (the
pipeline seeds it by ``(seed, layer)``) unless ``target_init_seed`` is set; from a shared start, matched rows keep
their index (``identity_fraction``) and part of any match is the start point's: ``decoder_init`` (base vs that
start) measures how much. Shapes: activations ``[N, d]``; decoders ``W_dec [n, d]``; per-latent values ``[n]``.

    result = run_transfer(load_world_model("dlm"), load_world_model("instruct"), [2, 5],
                          control=load_world_model("ar"))
    print("\\n".join(summary_lines(result)))
    plot_transfer(result, "transfer.png")
"""
from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from dlmscope.data.activations import _split_batch, check_policy, harvest
from dlmscope.jobs.train import SweepSpec, make_saes, train_sweep
from dlmscope.sae.topk import TopKSAE
from .splice import delta_loss_over_batches, evaluate_sae
from dlmscope.data.text import world_batches
from dlmscope.train.trainer import TrainConfig
from dlmscope.train.log import LogConfig

__all__ = ["THRESHOLDS", "check_saes", "check_same_tokens", "paired_activations", "train_saes",
           "LatentAgreement", "latent_agreement", "alive_overlap", "correlation_summary", "DecoderMatch",
           "match_decoders", "match_summary", "compare_layer", "run_transfer", "summary_lines", "plot_transfer"]

#: cosine / correlation thresholds the fractions are reported at
THRESHOLDS = (0.9, 0.7, 0.5)
#: seed of the chance-level random SAE; far from the pipeline's init seeds (``seed * 1009 + layer``), so the
#: random SAE is never the trained SAEs' own initialisation
CHANCE_SEED = 982_451_653
#: the demo's recipe (DemoConfig defaults) for the world's tiny models; pass ``train=`` for real models
WORLD_RECIPE = TrainConfig(lr=1e-3, warmup_steps=20, dead_tokens=100_000, norm_batches=10)


# ------------------------------------------------------------------------------------------------ validation
def check_saes(base, target) -> None:
    """ValueError unless the two SAEs have the same ``d`` and ``n``."""
    if base.d != target.d:
        raise ValueError(f"the base SAE has d={base.d} but the target SAE has d={target.d}; "
                         "compare SAEs of the same hook point")
    if base.n != target.n:
        raise ValueError(f"the base SAE has n={base.n} latents but the target SAE has n={target.n}; "
                         "decoder matching and the per-latent comparison need SAEs of the same size")


def check_same_tokens(base_acts: Tensor, target_acts: Tensor, d: int | None = None) -> None:
    """ValueError unless both are ``[N, d]`` of the same shape (the same tokens from both models)."""
    for name, x in (("base", base_acts), ("target", target_acts)):
        if not isinstance(x, Tensor) or x.dim() != 2:
            raise ValueError(f"{name} activations must be a [N, d] tensor, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if base_acts.shape != target_acts.shape:
        raise ValueError(f"base activations {tuple(base_acts.shape)} and target activations "
                         f"{tuple(target_acts.shape)} differ in shape: they must be the same tokens from both "
                         "models (harvest them with the same text, policy and seed, e.g. paired_activations)")
    if d is not None and base_acts.shape[1] != d:
        raise ValueError(f"activations have d={base_acts.shape[1]} but the SAE expects d={d}")


def _check_models(base, target, policy: str) -> None:
    """The two adapters must see the same text the same way: hidden size, vocabulary and mask token."""
    if base.d_model != target.d_model:
        raise ValueError(f"the base model has d_model={base.d_model} but the target has d_model={target.d_model}")
    tb, tt = base.tokenizer, target.tokenizer
    if tb is not None and tt is not None and tb.get_vocab() != tt.get_vocab():
        raise ValueError("the base and target models have different vocabularies: the same token ids are not "
                         "the same text")
    if policy != "clean" and base.mask_token_id != target.mask_token_id:
        raise ValueError(f"policy {policy!r} masks the text, but the models' mask tokens differ "
                         f"({base.mask_token_id} vs {target.mask_token_id}); use policy='clean'")


# ----------------------------------------------------------------------------------------------- activations
@torch.no_grad()
def paired_activations(base, target, token_batches: Iterable, layers: Sequence[int], policy: str, *,
                       tokens: int, seed: int = 1) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """``({layer: [N, d]}, {layer: [N, d]})`` fp32 activations of the *same* positions of the same corrupted
    text in ``base`` and ``target`` (``N ≤ tokens``; rows in (batch, position) order, unshuffled).

    Both models draw their corruption from generators seeded with ``seed``; every batch's corrupted ids and kept
    positions are checked to be identical, so row i is the same token (in the same context) in both.
    """
    policy = check_policy(policy)
    _check_models(base, target, policy)
    layers = target.check_layers(base.check_layers(layers))
    gens = [torch.Generator().manual_seed(seed) for _ in range(2)]
    parts: tuple[dict, dict] = ({L: [] for L in layers}, {L: [] for L in layers})
    kept = 0
    for item in token_batches:
        if kept >= tokens:
            break
        ids, am = _split_batch(item)
        (acts_b, info_b), (acts_t, info_t) = (
            harvest(m, ids, layers, policy, attention_mask=am, generator=g, dtype=torch.float32, return_info=True)
            for m, g in zip((base, target), gens))
        if not (torch.equal(info_b["noisy_ids"], info_t["noisy_ids"]) and torch.equal(info_b["keep"], info_t["keep"])):
            raise RuntimeError("the two models' corruptions of the same batch differ; cannot pair their tokens")
        take = min(tokens - kept, acts_b[layers[0]].shape[0])
        for out, acts in zip(parts, (acts_b, acts_t)):
            for L in layers:
                out[L].append(acts[L][:take].cpu())
        kept += take
    if kept == 0:
        raise ValueError("paired_activations got no tokens (empty token_batches, or the policy kept none)")
    return tuple({L: torch.cat(xs) for L, xs in out.items()} for out in parts)  # type: ignore[return-value]


def train_saes(adapter, token_batches, layers: Sequence[int], policy: str, *, n_latents: int, k: int,
               tokens: int, seed: int = 0, init_seed: int | None = None, train: TrainConfig | None = None,
               batch_size: int = 1024, label: str = "") -> dict[int, TopKSAE]:
    """``{layer: TopKSAE}``: one SAE per layer trained on ``tokens`` activations of ``adapter`` through
    :func:`~dlmscope.jobs.train.train_sweep` (one harvest for all layers, cached in a temporary directory).

    ``seed`` fixes the data order and corruption; the initialisation depends on ``(init_seed, layer)`` only
    (default ``init_seed = seed``, the pipeline's), so SAEs trained here on two models share it.
    """
    spec = SweepSpec(layers=tuple(layers), ks=(k,), n_latents=n_latents, policy=policy, tokens=tokens,
                     batch_size=batch_size, seed=seed)
    init = dataclasses.replace(spec, seed=seed if init_seed is None else init_seed)
    start = {L: make_saes(adapter.d_model, init, L, {"model": str(adapter.source)}) for L in spec.layers}
    with tempfile.TemporaryDirectory(prefix="dlmscope-transfer-") as cache:
        saes = train_sweep(adapter, token_batches, spec, train or WORLD_RECIPE, cache_dir=cache, saes=start,
                           log=LogConfig(log_every=25), label=label)
    return {L: s[0] for L, s in saes.items()}


# ------------------------------------------------------------------------------------------- latent behaviour
class LatentAgreement(NamedTuple):
    """One SAE's latents on the same tokens of two models."""

    corr: Tensor         #: [n] float64 Pearson r of each latent's activation, base vs target (NaN: no variance)
    fires_base: Tensor   #: [n] int64 tokens on which the latent fired, base activations
    fires_target: Tensor  #: [n] int64 the same on target activations


@torch.no_grad()
def latent_agreement(sae, base_acts: Tensor, target_acts: Tensor) -> LatentAgreement:
    """Per-latent activation correlation and fire counts of ``sae`` on token-aligned ``[N, d]`` activations.

    The Top-K code (zero off the top-k) is formed densely in row blocks of about 16M entries; the moments are
    accumulated in float64.
    """
    check_same_tokens(base_acts, target_acts, sae.d)
    n = sae.n
    p = next(sae.parameters())
    s = torch.zeros(5, n, dtype=torch.float64)  # Σa, Σb, Σa², Σb², Σab
    fires = torch.zeros(2, n, dtype=torch.int64)
    rows = max(1, 2 ** 24 // n)
    for xa, xb in zip(base_acts.split(rows), target_acts.split(rows)):
        a, b = (sae.encode_dense(x.to(p.device, p.dtype)).double().cpu() for x in (xa, xb))
        s += torch.stack([a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0), (a * b).sum(0)])
        fires += torch.stack([(a > 0).sum(0), (b > 0).sum(0)])
    N = base_acts.shape[0]
    cov = s[4] - s[0] * s[1] / N
    var_a, var_b = s[2] - s[0] ** 2 / N, s[3] - s[1] ** 2 / N
    # a latent that is constant on either side (never fired, or cancellation noise) has no correlation
    ok = (var_a > 1e-12 * s[2].clamp_min(1e-300)) & (var_b > 1e-12 * s[3].clamp_min(1e-300))
    corr = torch.where(ok, cov / (var_a * var_b).clamp_min(1e-300).sqrt(), torch.full_like(cov, math.nan))
    return LatentAgreement(corr.clamp(-1.0, 1.0), fires[0], fires[1])


def alive_overlap(fires_base: Tensor, fires_target: Tensor) -> dict:
    """Latents alive (fired ≥ 1 time) on base vs on target tokens: counts and the Jaccard of the alive sets."""
    a, b = fires_base > 0, fires_target > 0
    both, either = int((a & b).sum()), int((a | b).sum())
    return {"n_latents": int(a.numel()), "alive_base": int(a.sum()), "alive_target": int(b.sum()),
            "alive_both": both, "alive_base_only": int((a & ~b).sum()), "alive_target_only": int((b & ~a).sum()),
            "jaccard": both / either if either else math.nan}


def _fractions(values: Tensor, prefix: str) -> dict:
    """``{prefix}_frac_gt_{θ}`` for every θ in :data:`THRESHOLDS` (NaN for no values)."""
    return {f"{prefix}_frac_gt_{t}": float((values > t).double().mean()) if values.numel() else math.nan
            for t in THRESHOLDS}


def correlation_summary(agreement: LatentAgreement) -> dict:
    """Median correlation and the fractions above :data:`THRESHOLDS`, over latents alive on both sides with a
    defined correlation."""
    use = (agreement.fires_base > 0) & (agreement.fires_target > 0) & agreement.corr.isfinite()
    r = agreement.corr[use]
    return {"n_latents_used": int(use.sum()), "median": float(r.median()) if r.numel() else math.nan,
            "mean": float(r.mean()) if r.numel() else math.nan, **_fractions(r, "corr")}


# ------------------------------------------------------------------------------------------ decoder matching
class DecoderMatch(NamedTuple):
    """How each base decoder row finds a partner among the other SAE's rows (signed cosines)."""

    max_cos: Tensor      #: [n] the best cosine of base row i over all other rows
    best: Tensor         #: [n] int64 the other row attaining it
    matched_cos: Tensor  #: [n] the cosine of base row i with its Hungarian (one-to-one) partner
    assignment: Tensor   #: [n] int64 the Hungarian partner of base row i
    same_index_cos: Tensor  #: [n] the cosine of base row i with other row i (high when the SAEs share an init)


def _decoder(sae_or_w) -> Tensor:
    w = sae_or_w.W_dec if hasattr(sae_or_w, "W_dec") else sae_or_w
    if not isinstance(w, Tensor) or w.dim() != 2:
        raise ValueError(f"expected an SAE or a decoder matrix [n, d], got {type(w).__name__}")
    return F.normalize(w.detach().float().cpu(), dim=1)


@torch.no_grad()
def match_decoders(base, other) -> DecoderMatch:
    """Match the decoder rows of ``base`` to those of ``other`` (SAEs or ``W_dec [n, d]`` matrices, same shape).

    Max-cos: for each base row, the best signed cosine over the other rows (partners may repeat). Hungarian:
    ``scipy.optimize.linear_sum_assignment`` maximising the total signed cosine, a one-to-one matching.
    Holds the ``[n, n]`` cosine matrix in memory.
    """
    wa, wb = _decoder(base), _decoder(other)
    if wa.shape[1] != wb.shape[1]:
        raise ValueError(f"decoders of different input size d: {wa.shape[1]} vs {wb.shape[1]}")
    if wa.shape[0] != wb.shape[0]:
        raise ValueError(f"SAEs of different size n: {wa.shape[0]} vs {wb.shape[0]} latents; one-to-one "
                         "matching needs the same n")
    cos = wa @ wb.T
    max_cos, best = cos.max(dim=1)
    rows, cols = linear_sum_assignment(cos.double().numpy(), maximize=True)
    assignment = torch.empty(wa.shape[0], dtype=torch.int64)
    assignment[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.int64)
    matched = cos.gather(1, assignment[:, None])[:, 0]
    return DecoderMatch(max_cos, best, matched, assignment, cos.diagonal().clone())


def match_summary(m: DecoderMatch) -> dict:
    """Means and fractions above :data:`THRESHOLDS` of max-cos and Hungarian cosines; ``identity_fraction`` =
    share of Hungarian pairs that keep their index."""
    n = m.assignment.numel()
    return {"max_cos_mean": float(m.max_cos.mean()), **_fractions(m.max_cos, "max_cos"),
            "hungarian_mean": float(m.matched_cos.mean()), **_fractions(m.matched_cos, "hungarian"),
            "identity_fraction": float((m.assignment == torch.arange(n)).double().mean()),
            "same_index_cos_mean": float(m.same_index_cos.mean())}


# ---------------------------------------------------------------------------------------------- one layer
def compare_layer(base_sae, target_sae, base_acts: Tensor, target_acts: Tensor, *, init_sae=None) -> dict:
    """Everything but ΔLM for one layer, as a JSON-able dict.

    ``base_acts`` / ``target_acts``: ``[N, d]`` activations of the same tokens from the base and the target
    model. Keys: ``fve`` (``base_on_base``, ``base_on_target``, ``target_on_target``: :func:`evaluate_sae`
    dicts, and ``ratio`` = base-on-target / target-on-target FVE), ``alive``, ``correlation``, ``decoder``
    (base vs target), ``decoder_chance`` (base vs a random SAE of the same shape) and, with ``init_sae`` (the
    SAEs' shared initialisation), ``decoder_init`` (base vs that init).
    """
    check_saes(base_sae, target_sae)
    check_same_tokens(base_acts, target_acts, base_sae.d)
    fve = {"base_on_base": evaluate_sae(base_sae, base_acts), "base_on_target": evaluate_sae(base_sae, target_acts),
           "target_on_target": evaluate_sae(target_sae, target_acts)}
    own = fve["target_on_target"]["fve"]
    fve["ratio"] = fve["base_on_target"]["fve"] / own if own > 0 else math.nan
    agreement = latent_agreement(base_sae, base_acts, target_acts)
    chance = TopKSAE(base_sae.d, base_sae.n, base_sae.k, generator=torch.Generator().manual_seed(CHANCE_SEED))
    out = {"fve": fve, "alive": alive_overlap(agreement.fires_base, agreement.fires_target),
           "correlation": correlation_summary(agreement),
           "decoder": match_summary(match_decoders(base_sae, target_sae)),
           "decoder_chance": match_summary(match_decoders(base_sae, chance))}
    if init_sae is not None:
        out["decoder_init"] = match_summary(match_decoders(base_sae, init_sae))
    return out


def _pick(saes: Mapping, layer: int, k: int, d_model: int, n_latents: int, what: str):
    """The SAE for ``layer`` from ``{layer: SAE or [SAE per k]}`` (a list: the one with this ``k``), checked
    against the model's hidden size and the run's ``n_latents``."""
    if layer not in saes:
        raise ValueError(f"{what} has no SAE for layer {layer} (it has layers {sorted(saes)})")
    got = saes[layer]
    if isinstance(got, (list, tuple)):
        match = [s for s in got if s.k == k]
        if not match:
            raise ValueError(f"{what}[{layer}] has no SAE with k={k} (ks {[s.k for s in got]})")
        got = match[0]
    if got.d != d_model:
        raise ValueError(f"{what}[{layer}] has d={got.d} but the model's hidden size is d_model={d_model}")
    if got.n != n_latents:
        raise ValueError(f"{what}[{layer}] has n={got.n} latents but n_latents={n_latents}: SAEs of different n "
                         f"cannot be matched one to one (pass n_latents={got.n})")
    if got.k != k:
        raise ValueError(f"{what}[{layer}] has k={got.k} but k={k}")
    return got


# ------------------------------------------------------------------------------------------------ the run
def run_transfer(base_adapter, instruct_adapter, layers: Sequence[int], *, policy: str = "unmask",
                 n_latents: int = 512, k: int = 8, train_tokens: int = 200_000, eval_tokens: int = 30_000,
                 delta_batches: int = 12, seed: int = 0, control=None, base_saes: Mapping | None = None,
                 instruct_saes: Mapping | None = None, control_saes: Mapping | None = None,
                 batches: tuple[Sequence, Sequence] | None = None, sentences: int = 100_000,
                 train: TrainConfig | None = None, sae_batch: int = 1024,
                 target_init_seed: int | None = None) -> dict:
    """Base → instruct SAE transfer at each of ``layers``; returns a JSON-able dict.

    SAEs: ``base_saes`` / ``instruct_saes`` ``{layer: SAE or [SAE per k]}`` are used as given (a list: its
    ``k`` SAE; every layer, ``n_latents`` latents); when ``None`` they are trained here on ``train_tokens``
    activations of ``policy`` (:func:`train_saes`, recipe ``train``, default the demo's), all from one shared
    initialisation, unless ``target_init_seed`` gives the instruct and control SAEs their own. ``batches``:
    ``(train, heldout)`` LM batches, default the embedded world's corpus (``sentences`` sentences, 64-token rows,
    32 per batch, split by ``seed``); both models see the same text. Evaluation runs on ``eval_tokens`` paired
    held-out tokens (corruption seed ``seed + 1``, as the pipeline's held-out set) and ΔLM on the first
    ``delta_batches`` held-out batches (corruption seed ``seed + 7``, as the demo's).

    ``control``: optionally the AR twin (an adapter): its ``clean``-policy SAE (``control_saes``, or trained here)
    against the base SAE on clean text, as the reference for "a different model".

    Result: ``config``; ``layers[str(L)]`` with ``instruct`` (:func:`compare_layer` plus ``delta``:
    ``base_in_base``, ``base_in_target``, ``target_in_target``) and, with a control, ``control`` (the same with
    the AR twin as target); ``summary[str(L)]`` with the headline numbers (see :func:`summary_lines`).
    """
    policy = check_policy(policy)
    _check_models(base_adapter, instruct_adapter, policy)
    layers = instruct_adapter.check_layers(base_adapter.check_layers(layers))
    if control is not None:
        _check_models(base_adapter, control, "clean")
        control.check_layers(layers)
    d = base_adapter.d_model
    # the given SAEs are checked before any work: every layer, this k, the model's d and n_latents
    given = {what: None if saes is None else {L: _pick(saes, L, k, d, n_latents, what) for L in layers}
             for what, saes in (("base_saes", base_saes), ("instruct_saes", instruct_saes),
                                ("control_saes", control_saes))}
    if base_adapter.tokenizer is None and batches is None:
        raise ValueError("the base model has no tokenizer; pass batches=(train, heldout) token batches")
    if delta_batches < 1:
        raise ValueError(f"delta_batches must be >= 1, got {delta_batches}")
    train_b, held_b = batches if batches is not None else world_batches(base_adapter.tokenizer, sentences, 64, 32,
                                                                        seed)
    held_b = list(held_b)
    if not held_b:
        raise ValueError("run_transfer needs held-out token batches")
    spec = SweepSpec(layers=tuple(layers), ks=(k,), n_latents=n_latents, policy=policy, tokens=train_tokens,
                     batch_size=sae_batch, seed=seed)

    def saes_for(adapter, what, pol):
        """``({layer: SAE}, trained here?)``: the given SAEs of every layer, or ones trained now."""
        if given[what] is not None:
            return given[what], False
        init_seed = target_init_seed if what != "base_saes" else None
        return train_saes(adapter, train_b, layers, pol, n_latents=n_latents, k=k, tokens=train_tokens, seed=seed,
                          init_seed=init_seed, train=train, batch_size=sae_batch, label=what), True

    base, base_trained = saes_for(base_adapter, "base_saes", policy)
    targets = [("instruct", instruct_adapter, *saes_for(instruct_adapter, "instruct_saes", policy), policy)]
    if control is not None:
        targets.append(("control", control, *saes_for(control, "control_saes", "clean"), "clean"))

    out: dict = {"config": {"layers": list(layers), "policy": policy, "control_policy": "clean",
                            "n_latents": n_latents, "k": k, "train_tokens": train_tokens, "eval_tokens": eval_tokens,
                            "delta_batches": delta_batches, "seed": seed, "control": control is not None,
                            "target_init_seed": target_init_seed, "cosine": "signed"},
                 "layers": {str(L): {} for L in layers}}
    delta_ids = held_b[:delta_batches]
    for name, adapter, target, trained, pol in targets:
        acts_b, acts_t = paired_activations(base_adapter, adapter, held_b, layers, pol, tokens=eval_tokens,
                                            seed=seed + 1)
        for L in layers:
            # the init both SAEs started from is known only when this run trained both of them
            init = make_saes(d, spec, L)[0] if base_trained and trained and target_init_seed is None else None
            entry = compare_layer(base[L], target[L], acts_b[L], acts_t[L], init_sae=init)
            b_in_t, t_in_t = delta_loss_over_batches(adapter, [base[L], target[L]], L, delta_ids, seed=seed + 7)
            entry["delta"] = {"base_in_target": b_in_t, "target_in_target": t_in_t}
            if name == "instruct":
                entry["delta"]["base_in_base"] = delta_loss_over_batches(base_adapter, [base[L]], L, delta_ids, seed=seed + 7)[0]
            out["layers"][str(L)][name] = entry
    out["summary"] = {str(L): _layer_summary(out["layers"][str(L)]) for L in layers}
    return out


def _layer_summary(entry: dict) -> dict:
    """Headline numbers of one layer (the control's prefixed ``control_``), with the fraction of loss recovered
    vs zero-ablation (the DLM's ``L_mask`` one, or the AR one) of the base and the target SAE in the target."""
    out = {}
    for name, e in entry.items():
        f, dec, cor = e["fve"], e["decoder"], e["correlation"]
        vals = {**{f"fve_{c}": f[c]["fve"] for c in ("base_on_base", "base_on_target", "target_on_target")},
                "fve_ratio": f["ratio"], "alive_jaccard": e["alive"]["jaccard"], "corr_median": cor["median"],
                "corr_frac_gt_0.9": cor["corr_frac_gt_0.9"],
                **{key: dec[key] for key in ("max_cos_mean", "hungarian_mean", "hungarian_frac_gt_0.9",
                                             "hungarian_frac_gt_0.7", "identity_fraction")},
                **{f"chance_{key}": e["decoder_chance"][key] for key in ("max_cos_mean", "hungarian_mean")},
                **{f"recovered_{c}": d.get("mask_recovered", d.get("recovered", math.nan))
                   for c, d in e["delta"].items() if c != "base_in_base"}}
        if "decoder_init" in e:
            vals["init_hungarian_mean"] = e["decoder_init"]["hungarian_mean"]
        out.update({("" if name == "instruct" else f"{name}_") + key: v for key, v in vals.items()})
    return out


def summary_lines(result: dict) -> list[str]:
    """One plain-language line per layer: how much of the base SAE survives on the instruct model."""
    lines = []
    for L, s in result["summary"].items():
        line = (f"layer {L}: base SAE on instruct keeps {s['fve_ratio']:.0%} of the instruct SAE's FVE "
                f"({s['fve_base_on_target']:.3f} vs {s['fve_target_on_target']:.3f}; on base "
                f"{s['fve_base_on_base']:.3f}); Hungarian-matched decoder rows: mean cos {s['hungarian_mean']:.2f}, "
                f"{s['hungarian_frac_gt_0.9']:.0%} > 0.9 (chance mean {s['chance_hungarian_mean']:.2f}); median "
                f"latent correlation {s['corr_median']:.2f}; alive Jaccard {s['alive_jaccard']:.2f}")
        if "control_fve_ratio" in s:
            line += (f" | AR control: FVE ratio {s['control_fve_ratio']:.0%}, Hungarian mean "
                     f"{s['control_hungarian_mean']:.2f}, median correlation {s['control_corr_median']:.2f}")
        lines.append(line)
    return lines


def plot_transfer(result: dict, path: str | Path) -> Path:
    """A PNG of the per-layer numbers: FVE of the three conditions (and the AR control), Hungarian-matched
    decoder fractions against chance, and the median latent activation correlation."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state is touched

    layers = list(result["summary"])
    s = [result["summary"][L] for L in layers]
    ctrl = "control_fve_ratio" in s[0]
    x = torch.arange(len(layers)).double()
    fig = Figure(figsize=(3 * max(3.8, 0.7 * len(layers)), 5.0))
    ax_fve, ax_dec, ax_cor = fig.subplots(1, 3)

    def grouped_bars(ax, bars):  # one group of bars per layer
        w = 0.8 / len(bars)
        for i, (key, label) in enumerate(bars):
            ax.bar((x + (i - (len(bars) - 1) / 2) * w).tolist(), [r[key] for r in s], w, label=label)

    grouped_bars(ax_fve, [("fve_base_on_base", "base SAE, base acts"),
                          ("fve_base_on_target", "base SAE, instruct acts"),
                          ("fve_target_on_target", "instruct SAE, instruct acts")]
                 + ([("control_fve_base_on_target", "base SAE, AR acts (control)")] if ctrl else []))
    ax_fve.set_title("held-out FVE", fontsize=10)
    series = [("", "instruct")] + ([("control_", "AR control")] if ctrl else [])
    grouped_bars(ax_dec, [(f"{pre}hungarian_frac_gt_{t}", f"{label}: fraction cos > {t}")
                          for pre, label in series for t in (0.9, 0.7)])
    # the mean matched cosines as a horizontal mark across each layer's group of bars
    marks = [("hungarian_mean", "instruct", "-"), ("chance_hungarian_mean", "random SAE (chance)", ":")]
    marks += [("init_hungarian_mean", "shared init", "--")] if "init_hungarian_mean" in s[0] else []
    for key, label, ls in marks:
        ax_dec.hlines([r[key] for r in s], (x - 0.45).tolist(), (x + 0.45).tolist(), colors="black", linestyles=ls,
                      label=f"mean cos: {label}")
    ax_dec.set_title("Hungarian-matched decoder rows, base vs other", fontsize=10)

    for pre, label, mk in (("", "instruct", "o"),) + ((("control_", "AR control", "s"),) if ctrl else ()):
        ax_cor.plot(x.tolist(), [r[f"{pre}corr_median"] for r in s], marker=mk, label=f"{label}: median r")
        ax_cor.plot(x.tolist(), [r[f"{pre}corr_frac_gt_0.9"] for r in s], marker=mk, ls="--",
                    label=f"{label}: fraction r > 0.9")
    ax_cor.set_title("base SAE latent activation, base vs target", fontsize=10)

    for ax in (ax_fve, ax_dec, ax_cor):
        ax.set_xticks(x.tolist(), [f"L{L}" for L in layers])
        ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.05)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    cfg = result["config"]
    fig.suptitle(f"base → instruct SAE transfer (policy {cfg['policy']}, n = {cfg['n_latents']}, k = {cfg['k']})")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
