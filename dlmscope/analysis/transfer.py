"""Post-training stability (docs/reference.md §7): do SAEs trained on a base DLM stay valid on its instruct version?

The paper states the claim without code or protocol. Ours compares, per layer, a *base* SAE (trained on the base
model) with a *target* SAE trained on the target model (the instruct DLM; for the optional control, the AR twin)
at the same layer, with the same policy and recipe. This module holds the measurements, pure functions of SAEs and
activations; :mod:`dlmscope.jobs.transfer` trains the SAEs, adds ΔLM and runs them over layers.

* **reconstruction** — FVE of the base SAE on base activations, of the base SAE on target activations and of the
  target SAE on target activations, all on the same held-out tokens (:func:`paired_activations` runs both models
  on one corruption of the same text and keeps the same positions);
* **alive overlap** — latents of the base SAE that fire at least once on base vs on target tokens (Jaccard);
* **activation correlation** — per latent of the base SAE, the Pearson correlation over the same tokens of its
  (Top-K, so mostly zero) activation on base vs on target activations (:func:`latent_agreement`);
* **decoder matching** — signed cosines between base and target decoder rows: the best partner of each base row
  (max-cos) and a one-to-one Hungarian matching (:func:`match_decoders`), beside the same statistics against a
  randomly initialised SAE of the same shape (chance) and, when known, against the SAEs' shared initialisation.

Signed, not absolute, cosines: a Top-K latent only ever adds its direction with a positive weight, so a row and
its negation are different features. SAEs that share their initialisation (as the transfer job trains them, unless
told otherwise) keep the index of matched rows (``identity_fraction``), and part of any match is the start
point's: ``decoder_init`` (base vs that start) measures how much. Shapes: activations ``[N, d]``; decoders
``W_dec [n, d]``; per-latent values ``[n]``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from dlmscope.data.activations import check_policy, harvest, split_batch
from dlmscope.sae.metrics import evaluate_sae
from dlmscope.sae.topk import TopKSAE

__all__ = ["THRESHOLDS", "CHANCE_SEED", "check_saes", "check_same_tokens", "check_models", "paired_activations",
           "LatentAgreement", "latent_agreement", "alive_overlap", "correlation_summary", "DecoderMatch",
           "match_decoders", "match_summary", "compare_layer"]

#: cosine / correlation thresholds the fractions are reported at
THRESHOLDS = (0.9, 0.7, 0.5)
#: seed of the chance-level random SAE; far from the init seeds of :func:`dlmscope.jobs.train.make_saes`
#: (``seed * 1009 + layer``), so the random SAE is never the trained SAEs' own initialisation
CHANCE_SEED = 982_451_653


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


def check_models(base, target, policy: str) -> None:
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
    check_models(base, target, policy)
    layers = target.check_layers(base.check_layers(layers))
    gens = [torch.Generator().manual_seed(seed) for _ in range(2)]
    parts: tuple[dict, dict] = ({L: [] for L in layers}, {L: [] for L in layers})
    kept = 0
    for item in token_batches:
        if kept >= tokens:
            break
        ids, am = split_batch(item)
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
