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

**Seed-to-seed ceiling and null** (:func:`compare_layer` with ``second_base_sae``; :func:`transfer_verdict`).
"The instruct SAE agrees with the base SAE" is read against how much two base SAEs from different init seeds
agree (the ceiling: base SAE vs second base SAE, same measures, on base activations) and against a random SAE
(the null). Per layer three measures are pre-specified: the FVE ratio (foreign SAE / own SAE), the Hungarian-
matched decoder cosine and the *matched-latent correlation* (base latent i on base activations vs its Hungarian
partner in the other SAE on the other activations, :func:`matched_agreement`). With several seed replicates
(each its own base, second-base and target SAE) the FVE ratio is judged over them (:func:`fve_replicate`,
:func:`fve_verdict_over_seeds`: min–max over seeds, the worst replicate's outcome). The words are "consistent with
stability" at best: no threshold of ours decides "reproduced".

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
from dlmscope.util.bootstrap import paired_difference, spread

__all__ = ["THRESHOLDS", "CHANCE_SEED", "check_saes", "check_same_tokens", "check_models", "paired_activations",
           "LatentAgreement", "latent_agreement", "matched_agreement", "alive_overlap", "correlation_summary",
           "DecoderMatch", "match_decoders", "match_summary", "chance_sae", "measure_verdict", "fve_verdict",
           "fve_replicate", "fve_verdict_over_seeds", "transfer_verdict", "compare_layer", "VERDICTS"]

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
def _agreement(sae_a, acts_a: Tensor, sae_b, acts_b: Tensor, partner: Tensor | None) -> LatentAgreement:
    """Per latent i of ``sae_a``: Pearson r of its code on ``acts_a`` with the code of latent ``partner[i]`` of
    ``sae_b`` on ``acts_b`` (same rows), and their fire counts. Dense codes in row blocks of ~16M entries;
    moments in float64."""
    check_same_tokens(acts_a, acts_b, sae_a.d)
    n = sae_a.n
    pa, pb = next(sae_a.parameters()), next(sae_b.parameters())
    s = torch.zeros(5, n, dtype=torch.float64)  # Σa, Σb, Σa², Σb², Σab
    fires = torch.zeros(2, n, dtype=torch.int64)
    rows = max(1, 2 ** 24 // n)
    for xa, xb in zip(acts_a.split(rows), acts_b.split(rows)):
        a = sae_a.encode_dense(xa.to(pa.device, pa.dtype)).double().cpu()
        b = sae_b.encode_dense(xb.to(pb.device, pb.dtype)).double().cpu()
        if partner is not None:
            b = b[:, partner]
        s += torch.stack([a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0), (a * b).sum(0)])
        fires += torch.stack([(a > 0).sum(0), (b > 0).sum(0)])
    N = acts_a.shape[0]
    cov = s[4] - s[0] * s[1] / N
    var_a, var_b = s[2] - s[0] ** 2 / N, s[3] - s[1] ** 2 / N
    # a latent that is constant on either side (never fired, or cancellation noise) has no correlation
    ok = (var_a > 1e-12 * s[2].clamp_min(1e-300)) & (var_b > 1e-12 * s[3].clamp_min(1e-300))
    corr = torch.where(ok, cov / (var_a * var_b).clamp_min(1e-300).sqrt(), torch.full_like(cov, math.nan))
    return LatentAgreement(corr.clamp(-1.0, 1.0), fires[0], fires[1])


def latent_agreement(sae, base_acts: Tensor, target_acts: Tensor) -> LatentAgreement:
    """Per-latent activation correlation and fire counts of one ``sae`` on token-aligned ``[N, d]`` activations
    of the two models (the Top-K code, zero off the top-k)."""
    return _agreement(sae, base_acts, sae, target_acts, None)


def matched_agreement(sae_a, acts_a: Tensor, sae_b, acts_b: Tensor, partner: Tensor) -> LatentAgreement:
    """Per latent i of ``sae_a`` ``[n]``: the correlation of its code on ``acts_a`` with the code of its partner
    ``partner[i]`` (e.g. the Hungarian assignment of :func:`match_decoders`) in ``sae_b`` on ``acts_b`` —
    the same tokens. Comparable across pairs of SAEs: base vs instruct SAE, base vs second base SAE."""
    check_saes(sae_a, sae_b)
    return _agreement(sae_a, acts_a, sae_b, acts_b, partner)


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


# ------------------------------------------------------------------------------------- ceiling, null, verdict
#: the per-measure outcomes of :func:`measure_verdict` / :func:`fve_verdict`, best first
VERDICTS = ("at_ceiling", "below_ceiling", "at_null", "undefined")
_WORDS = {"at_ceiling": "consistent with stability (as close as two base seeds)",
          "below_ceiling": "above the null but below the seed-to-seed ceiling",
          "at_null": "not distinguishable from the null",
          "undefined": "undefined (a ratio over an FVE ≤ 0, or no defined value)"}


def chance_sae(like) -> TopKSAE:
    """A random SAE of ``like``'s shape (seed :data:`CHANCE_SEED`) centred with ``like``'s ``b_dec``: the null."""
    out = TopKSAE(like.d, like.n, like.k, generator=torch.Generator().manual_seed(CHANCE_SEED))
    with torch.no_grad():
        out.b_dec.copy_(like.b_dec.detach().to(out.b_dec))
    return out


def measure_verdict(observed: Tensor, ceiling: Tensor, null: Tensor, *, level: float = 0.95, resamples: int = 2000,
                    seed: int = 0) -> dict:
    """Pre-specified comparison of a per-latent measure ``[n]`` (base latent i vs its partner: observed = in the
    instruct SAE, ceiling = in the second base SAE, null = in the random SAE). Intervals of the mean paired
    differences over latents (bootstrap, NaN latents dropped): ``at_null`` unless observed − null is above 0;
    else ``at_ceiling`` unless observed − ceiling is below 0; else ``below_ceiling`` (``undefined``: no latent
    with all three values)."""
    kw = dict(level=level, resamples=resamples, seed=seed, unit="latents")
    vs_ceiling, vs_null = paired_difference(ceiling, observed, **kw), paired_difference(null, observed, **kw)
    if math.isnan(vs_null.low) or math.isnan(vs_ceiling.high):
        outcome = "undefined"
    else:
        outcome = "at_null" if not vs_null.low > 0 else "below_ceiling" if vs_ceiling.high < 0 else "at_ceiling"
    mean = lambda v: float(v[~v.isnan()].mean()) if bool((~v.isnan()).any()) else math.nan  # noqa: E731
    return {"observed": mean(observed.double()), "ceiling": mean(ceiling.double()), "null": mean(null.double()),
            "minus_ceiling": _interval(vs_ceiling), "minus_null": _interval(vs_null), "outcome": outcome,
            "words": _WORDS[outcome]}


def fve_verdict(ratio: float, ceiling_ratio: float, null_ratio: float) -> dict:
    """The FVE ratio (foreign SAE / own SAE on the same activations) against the seed-to-seed one (base SAE /
    second base SAE on base activations, its distance from 1 the seed spread) and the null's (random SAE / own
    SAE): ``at_null`` if ``ratio ≤ null``; ``below_ceiling`` if ``ratio < 1 − |1 − ceiling|``; else
    ``at_ceiling``; ``undefined`` where a ratio is NaN. Two seeds give one draw of the spread: a single ratio,
    no interval."""
    floor = 1.0 - abs(1.0 - ceiling_ratio)
    if not all(map(math.isfinite, (ratio, ceiling_ratio, null_ratio))):
        outcome = "undefined"
    else:
        outcome = "at_null" if ratio <= null_ratio else "below_ceiling" if ratio < floor else "at_ceiling"
    return {"observed": ratio, "ceiling": ceiling_ratio, "null": null_ratio, "ceiling_floor": floor,
            "outcome": outcome, "words": _WORDS[outcome]}


def fve_replicate(base_sae, second_base_sae, target_sae, base_acts: Tensor, target_acts: Tensor) -> dict:
    """One seed replicate's FVE ratios (as in :func:`compare_layer`): ``ratio`` = base SAE / target SAE on
    target activations, ``ceiling_ratio`` = base SAE / second base SAE on base activations, ``null_ratio`` = the
    random SAE centred like the base SAE (:func:`chance_sae`) / target SAE on target activations."""
    check_saes(base_sae, target_sae)
    check_saes(base_sae, second_base_sae)
    check_same_tokens(base_acts, target_acts, base_sae.d)
    fve = lambda sae, acts: evaluate_sae(sae, acts)["fve"]  # noqa: E731
    own = fve(target_sae, target_acts)
    return {"ratio": _fve_ratio(fve(base_sae, target_acts), own),
            "ceiling_ratio": _fve_ratio(fve(base_sae, base_acts), fve(second_base_sae, base_acts)),
            "null_ratio": _fve_ratio(fve(chance_sae(base_sae), target_acts), own)}


def fve_verdict_over_seeds(replicates: Sequence[dict]) -> dict:
    """The FVE-ratio measure over seed replicates (:func:`fve_replicate` dicts, each replicate its own base,
    second-base and target init seeds): :func:`fve_verdict` per replicate, and the worst outcome of them
    (``at_ceiling`` only when every replicate is at its ceiling, ``at_null`` when any is at its null);
    ``observed`` / ``ceiling`` / ``null`` are means over replicates, ``over_seeds`` their min–max ranges."""
    if not replicates:
        raise ValueError("fve_verdict_over_seeds needs at least one replicate")
    per = [fve_verdict(r["ratio"], r["ceiling_ratio"], r["null_ratio"]) for r in replicates]
    outcome = max((v["outcome"] for v in per), key=VERDICTS.index)
    ranges = {key: spread(r[key] for r in replicates) for key in ("ratio", "ceiling_ratio", "null_ratio")}
    return {"observed": ranges["ratio"]["mean"], "ceiling": ranges["ceiling_ratio"]["mean"],
            "null": ranges["null_ratio"]["mean"], "over_seeds": ranges, "seeds": len(replicates),
            "per_seed": [v["outcome"] for v in per], "outcome": outcome,
            "words": _WORDS[outcome] + f" (the worst of {len(replicates)} seed replicates)"}


def transfer_verdict(measures: dict) -> dict:
    """One layer's verdict from its :func:`fve_verdict` / :func:`measure_verdict` dicts ``{name: dict}``:
    ``consistent`` when every measure is at its ceiling, ``below_ceiling`` when every one is above its null,
    else ``at_null`` (an undefined measure counts as not above its null); ``words`` say which measures fell short.
    Never "reproduced": the ceiling is two seeds."""
    short = {o: [m for m, v in measures.items() if v["outcome"] == o] for o in VERDICTS}
    if short["at_null"] or short["undefined"]:
        why = [f"{m} not above the null" for m in short["at_null"]] + [f"{m} undefined" for m in short["undefined"]]
        return {"outcome": "at_null", "words": "not shown: " + ", ".join(why)}
    if short["below_ceiling"]:
        return {"outcome": "below_ceiling", "words": "above the null, below the seed-to-seed ceiling on "
                + ", ".join(short["below_ceiling"])}
    return {"outcome": "consistent", "words": "consistent with stability: the base and target SAEs agree as "
            "much as two base SAEs of different seeds, on every measure"}


def _interval(iv) -> dict:
    return {"mean": iv.mean, "low": iv.low, "high": iv.high, "n": iv.n, "over": dict(iv.over)}


def _fve_ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


# ---------------------------------------------------------------------------------------------- one layer
def compare_layer(base_sae, target_sae, base_acts: Tensor, target_acts: Tensor, *, init_sae=None,
                  second_base_sae=None, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> dict:
    """Everything but ΔLM for one layer, as a JSON-able dict.

    ``base_acts`` / ``target_acts``: ``[N, d]`` activations of the same tokens from the base and the target
    model. Keys: ``fve`` (``base_on_base``, ``base_on_target``, ``target_on_target``: :func:`evaluate_sae`
    dicts, and ``ratio`` = base-on-target / target-on-target FVE), ``alive``, ``correlation``, ``decoder``
    (base vs target), ``decoder_chance`` (base vs :func:`chance_sae`), ``matched_correlation``
    (:func:`matched_agreement` summary, base vs target SAE) and, with ``init_sae`` (a shared initialisation),
    ``decoder_init``. With ``second_base_sae`` (the base model's SAE from another init seed): ``ceiling`` (its
    FVE ratio, decoder match and matched correlation against the base SAE, on ``base_acts``), ``null`` (the
    random SAE's) and ``verdict`` (per measure and :func:`transfer_verdict`; intervals over latents).
    """
    check_saes(base_sae, target_sae)
    check_same_tokens(base_acts, target_acts, base_sae.d)
    fve = {"base_on_base": evaluate_sae(base_sae, base_acts), "base_on_target": evaluate_sae(base_sae, target_acts),
           "target_on_target": evaluate_sae(target_sae, target_acts)}
    fve["ratio"] = _fve_ratio(fve["base_on_target"]["fve"], fve["target_on_target"]["fve"])
    agreement = latent_agreement(base_sae, base_acts, target_acts)
    chance = chance_sae(base_sae)
    matches = {"target": match_decoders(base_sae, target_sae), "chance": match_decoders(base_sae, chance)}
    matched = {"target": matched_agreement(base_sae, base_acts, target_sae, target_acts, matches["target"].assignment),
               "chance": matched_agreement(base_sae, base_acts, chance, target_acts, matches["chance"].assignment)}
    out = {"fve": fve, "alive": alive_overlap(agreement.fires_base, agreement.fires_target),
           "correlation": correlation_summary(agreement), "decoder": match_summary(matches["target"]),
           "decoder_chance": match_summary(matches["chance"]),
           "matched_correlation": correlation_summary(matched["target"])}
    if init_sae is not None:
        out["decoder_init"] = match_summary(match_decoders(base_sae, init_sae))
    if second_base_sae is None:
        return out
    check_saes(base_sae, second_base_sae)
    second_fve = evaluate_sae(second_base_sae, base_acts)["fve"]
    chance_fve = evaluate_sae(chance, target_acts)["fve"]
    matches["ceiling"] = match_decoders(base_sae, second_base_sae)
    matched["ceiling"] = matched_agreement(base_sae, base_acts, second_base_sae, base_acts,
                                           matches["ceiling"].assignment)
    out["ceiling"] = {"fve_second_on_base": second_fve,
                      "fve_ratio": _fve_ratio(fve["base_on_base"]["fve"], second_fve),
                      "decoder": match_summary(matches["ceiling"]),
                      "matched_correlation": correlation_summary(matched["ceiling"])}
    out["null"] = {"fve_chance_on_target": chance_fve,
                   "fve_ratio": _fve_ratio(chance_fve, fve["target_on_target"]["fve"]),
                   "decoder": out["decoder_chance"], "matched_correlation": correlation_summary(matched["chance"])}
    kw = dict(level=level, resamples=resamples, seed=seed)
    measures = {"fve_ratio": fve_verdict(fve["ratio"], out["ceiling"]["fve_ratio"], out["null"]["fve_ratio"]),
                "decoder_cos": measure_verdict(*(matches[w].matched_cos for w in ("target", "ceiling", "chance")),
                                               **kw),
                "matched_corr": measure_verdict(*(matched[w].corr for w in ("target", "ceiling", "chance")), **kw)}
    out["verdict"] = {**transfer_verdict(measures), "measures": measures}
    return out
