"""The paper's findings checked on a demo run's numbers, and other observations the tables support.

Every function takes the ``results`` dict :func:`dlmscope.demo.run.run_demo` builds (``results.json``) and
its :class:`~dlmscope.demo.config.DemoConfig`.
"""
from __future__ import annotations

from dlmscope.util.bootstrap import side_of_zero, spread

from .config import AR_TWINS, DemoConfig
from .seeds import seed_entries, seed_summary

__all__ = ["PAPER_FVE_MASK", "PAPER_FVE_UNMASK", "PAPER_MASK_UNMASK_GAP", "get",
           "findings", "steering_finding", "order_finding", "transfer_finding", "concept_margins", "observations"]


def get(results, run_key, layer, k, *path):
    """``results["runs"][run_key][layer][k]`` and then the keys ``path`` (e.g. ``"delta", "mask_delta"``)."""
    node = results["runs"][run_key][str(layer)][str(k)]
    for p in path:
        node = node[p]
    return node


#: The paper's FVE of a Mask-SAE and an Unmask-SAE (LLaDA-8B layer 16, k = 50) and their gap.
PAPER_FVE_MASK, PAPER_FVE_UNMASK = 0.711, 0.857
PAPER_MASK_UNMASK_GAP = PAPER_FVE_MASK - PAPER_FVE_UNMASK


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def _failed(results, key, L, k) -> bool:
    return bool(results["runs"][key][str(L)][str(k)].get("failed"))


def _significant_negatives(results, keys, pairs, dkey) -> list:
    """``[[run, layer, k, Δ, se]]`` where Δ < −2·SE (SE over the ΔLM batches): negative beyond batch noise;
    failed SAEs out."""
    out = []
    for key in keys:
        for L, k in pairs:
            if _failed(results, key, L, k):
                continue
            d = get(results, key, L, k, "delta")
            se = d.get(f"{dkey}_se", 0.0)
            se = 0.0 if se is None or se != se else se  # NaN / null (one batch): no noise estimate
            if d[dkey] < -2 * se:
                out.append([key.split("/")[1], L, k, d[dkey], se])
    return out


def findings(results: dict, cfg: DemoConfig) -> dict:
    """The paper's claims, checked on this run's numbers. Failed SAEs
    (:func:`dlmscope.sae.metrics.training_failure`) are out of every
    count and mean (``failed`` lists them).

    ``mask_vs_unmask``: Mask-SAEs reconstruct worse than Unmask-SAEs (:data:`PAPER_FVE_MASK` vs
    :data:`PAPER_FVE_UNMASK` in the paper): over the (layer, k) pairs where neither SAE failed, and at ``k_ref``
    over init seeds (``seeds``: the mean gap over layers per seed, its mean and min–max). Reproduced in sign when
    most pairs have the Mask-SAE worse, the mean gap is negative and every seed's mean gap is negative (the
    seed-to-seed spread is the null the sign is read against).
    ``negative_delta``: splicing a DLM SAE in can *lower* the masked-diffusion loss at early layers (the first
    quarter of the blocks, at least block 0); a Δ counts as negative when it is below −2 standard errors over
    the ΔLM batches (the paper's pooled estimator).
    ``ar_contrast`` / ``ar_matched_contrast``: that effect is weaker or absent for the AR init twin / the
    budget-matched AR twin (relative to each model's clean loss, :func:`_ar_contrast`); not testable
    (``reproduced: None``) when the DLM shows no negative Δ.
    ``steering`` / ``steering_matched`` (the pair with the budget-matched twin) / ``orders`` / ``transfer``:
    :func:`steering_finding`, :func:`order_finding`,
    :func:`transfer_finding` (None when the run did not have that section). ``concepts``: :func:`concept_margins`.
    ``seeds``: :func:`dlmscope.demo.seeds.seed_summary`.
    """
    all_pairs = [(layer, k) for layer in cfg.layers for k in cfg.ks]
    pairs = [(L, k) for L, k in all_pairs if not (_failed(results, "dlm/mask", L, k)
                                                  or _failed(results, "dlm/unmask", L, k))]
    gap = lambda L, k: get(results, "dlm/mask", L, k, "fve") - get(results, "dlm/unmask", L, k, "fve")  # noqa: E731
    gaps = [gap(L, k) for L, k in pairs]
    all_gaps = [gap(L, k) for L, k in all_pairs]
    mask_worse = sum(g < 0 for g in gaps)
    mean_gap = sum(gaps) / len(gaps) if gaps else float("nan")
    seeds = seed_summary(results, list(cfg.layers), cfg.k_ref)
    seed_gap = seeds["gaps"]["mask_minus_unmask"]["mean_over_layers"]
    dlm_keys = ("dlm/mask", "dlm/unmask")
    neg = _significant_negatives(results, dlm_keys, all_pairs, "mask_delta")
    neg_unmask_objective = _significant_negatives(results, dlm_keys, all_pairs, "unmask_delta")
    early = [L for L in cfg.layers if L < max(1.0, results["num_layers"] / 4)]
    neg_layers = sorted({L for _, L, _, _, _ in neg})
    early_neg = [L for L in neg_layers if L in early]
    failed = [[key, L, k, e["failed"]] for key, run in results["runs"].items() for L, by in run.items()
              for k, e in by.items() if e.get("failed")]
    sign_ok = len(seed_gap["values"]) < 2 or _num(seed_gap["high"]) < 0
    return {
        "mask_vs_unmask": {"mask_worse": mask_worse, "pairs": len(pairs), "pairs_all": len(all_pairs),
                           "mean_gap": mean_gap, "mean_gap_with_failed": sum(all_gaps) / len(all_gaps),
                           "min_gap": min(gaps, default=float("nan")), "max_gap": max(gaps, default=float("nan")),
                           "paper_gap": PAPER_MASK_UNMASK_GAP, "seeds": seed_gap, "k_seeds": cfg.k_ref,
                           "reproduced": bool(gaps) and mask_worse > len(pairs) / 2 and mean_gap < 0 and sign_ok},
        "negative_delta": {"dlm": neg, "dlm_unmask_objective": neg_unmask_objective,
                           **{key.split("/")[0]: _significant_negatives(results, (key,), all_pairs, "delta")
                              for key in AR_TWINS if key in results["runs"]},
                           "dlm_layers": neg_layers, "early_layers": early, "reproduced": bool(early_neg)},
        "steering": steering_finding(results),
        "steering_matched": steering_finding(results, "ar_matched"),
        "orders": order_finding(results),
        "transfer": transfer_finding(results),
        "concepts": concept_margins(results, cfg),
        "seeds": seeds,
        "failed": failed,
        **{f"{key.split('/')[0]}_contrast": _ar_contrast(results, cfg, key, neg, early_neg)
           for key in AR_TWINS if key in results["runs"]},
    }


def _ar_contrast(results: dict, cfg: DemoConfig, ar_key: str, neg: list, early_neg: list) -> dict:
    """The negative-ΔLM effect against one AR twin (``ar_key``): per layer at ``k_ref`` each model's Δ/clean and
    recovered fraction, the smallest Δ/clean over every (layer, k), and whether the twin has fewer significant
    negatives at the DLM's early negative layers (None when the DLM has none)."""
    rel_min = lambda key, dk, ck: min(  # noqa: E731
        (get(results, key, L, k, "delta", dk) / get(results, key, L, k, "delta", ck)
         for L in cfg.layers for k in cfg.ks if not _failed(results, key, L, k)), default=float("nan"))
    rel = {}
    for L in cfg.layers:
        d = get(results, "dlm/mask", L, cfg.k_ref, "delta")
        a = get(results, ar_key, L, cfg.k_ref, "delta")
        rel[str(L)] = {"dlm_rel_delta": d["mask_delta"] / d["mask_clean"], "ar_rel_delta": a["delta"] / a["clean"],
                       "dlm_recovered": d.get("mask_recovered", float("nan")),
                       "ar_recovered": a.get("recovered", float("nan")),
                       "dlm_failed": _failed(results, "dlm/mask", L, cfg.k_ref),
                       "ar_failed": _failed(results, ar_key, L, cfg.k_ref)}
    ar_early = _significant_negatives(results, (ar_key,), [(L, k) for L in early_neg for k in cfg.ks], "delta")
    return {"pair": f"dlm/mask vs {ar_key}", "twin": AR_TWINS[ar_key], "per_layer": rel,
            "dlm_min_rel_delta": rel_min("dlm/mask", "mask_delta", "mask_clean"),
            "ar_min_rel_delta": rel_min(ar_key, "delta", "clean"),
            "reproduced": (len(ar_early) < len([n for n in neg if n[1] in early_neg])) if early_neg else None}


def steering_finding(results: dict, twin: str = "ar") -> dict | None:
    """*SAE features steer the DLM more than the AR model* (the paper's headline, docs/reference.md §5), per
    steered layer, at the paper's strengths (DLM 2.0, AR 1.2) and at matched α: the pre-specified verdict of
    :func:`dlmscope.jobs.steer.compare_models` on the DLM − AR difference of the *controlled* effect (steered −
    random-latent control concept-rate change), its 95% interval over concepts × prompts (both resampled: the
    claim is about features, one per planted concept); beside it the verdict on the log-ratio composite and the
    paper's own score (its difference, without an interval).

    A layer supports the claim when the controlled verdict is "DLM" *and* the paper's score favours the DLM (the
    paper's metric and the control agree); reproduced when every steered layer does, partly when some do. ``twin``
    names the AR twin of the pair (``"ar"``: the init twin, ``"ar_matched"``: the budget-matched one). None
    without a steering section or that pair."""
    st = results.get("steering")
    if not st or f"dlm_minus_{twin}" not in st:
        return None
    per_layer = st[f"dlm_minus_{twin}"]
    paper = {L: cell["paper"] for L, cell in per_layer.items()}
    agree = [L for L, c in paper.items() if c.get("verdict") == "DLM" and _num(c["score_paper"]["difference"]) > 0]
    alphas = [a for a in next(iter(per_layer.values())) if a != "paper"]
    verdict = len(agree) == len(per_layer) or ("partly" if agree else False)
    return {"pair": f"dlm vs {twin}", "unit": "concepts × prompts",
            "effect": "controlled: steered − random-latent control concept-rate change",
            "dlm_wins_paper_alpha": [L for L, c in paper.items() if c.get("verdict") == "DLM"],
            "ar_wins_paper_alpha": [L for L, c in paper.items() if c.get("verdict") == "AR"],
            "verdicts_paper_alpha": {L: c.get("verdict") for L, c in paper.items()},
            "composite_verdicts_paper_alpha": {L: c.get("composite_verdict") for L, c in paper.items()},
            "score_paper_difference": {L: c["score_paper"]["difference"] for L, c in paper.items()},
            "paper_metric_and_control_agree": agree,
            "dlm_wins_matched": {a: [L for L, c in per_layer.items() if c[a].get("verdict") == "DLM"] for a in alphas},
            "ar_wins_matched": {a: [L for L, c in per_layer.items() if c[a].get("verdict") == "AR"] for a in alphas},
            "composite_verdicts_matched": {a: {L: c[a].get("composite_verdict") for L, c in per_layer.items()}
                                           for a in alphas},
            "layers": list(per_layer), "reproduced": verdict}


#: how a sign-agnostic or ceiling-read verdict of the library maps onto the demo's wording (never "reproduced")
_CONSISTENT = {"association": "consistent", "consistent": "consistent", "partly": "partly consistent"}


def order_finding(results: dict) -> dict | None:
    """*SAE feature dynamics track decoding quality* (the paper's conjecture, docs/reference.md §6; it has no sign
    and no metric in the paper): the job's sign-agnostic verdict (``result["conjecture"]``,
    :func:`dlmscope.analysis.order.conjecture_verdict`) on the within-group correlation over the order-sensitive
    tasks between the pre-decode stability at the guide layer and exact match: "consistent" when more than half
    of the orders with an r have one whose interval excludes 0 (either sign; ``sign`` says which), "partly
    consistent" when some do, not reproduced when none does.

    Pre-specified: each SAE-guided order against its own base order (``sae_vs_base``, paired over the
    order-sensitive tasks; better / worse / tie with its denominator). The comparison with the best confidence
    order is post hoc (the comparator is picked on the same tasks) and labelled so. None without an order
    section."""
    r = results.get("orders")
    if not r:
        return None
    conj = r.get("conjecture") or {}
    pre = {f"{o}/{st}": {"base_order": c["base_order"], "verdict": c["verdict"], "difference": c["difference"],
                         "denominator": c["denominator"]}
           for o, by in r.get("sae_vs_base", {}).items() for st, c in by.items() if st != "one"}
    post = {f"{o}/{st}": c["verdict"] if "verdict" in c else
            side_of_zero(c["difference"], "better", "worse", "tie")
            for o, by in r.get("sae_vs_best_confidence", {}).items() for st, c in by.items() if st != "one"}
    return {"statistic": conj.get("statistic"), "positive": conj.get("positive", []),
            "negative": conj.get("negative", []), "orders": conj.get("orders", []), "sign": conj.get("sign"),
            "conjecture": conj.get("verdict"), "verdict": conj.get("verdict"), "text": conj.get("text"),
            "reproduced": _CONSISTENT.get(conj.get("verdict"), False),
            "sae_vs_base": pre, "guided_vs_best_confidence_post_hoc": post}


def transfer_finding(results: dict) -> dict | None:
    """*SAE features stay stable from base to instruct* (the paper's claim without code, docs/reference.md §7): the
    job's pre-specified verdict per layer (``summary[L]["verdict"]``, :func:`dlmscope.analysis.transfer
    .transfer_verdict`): the base SAE against the instruct SAE read against two base SAEs of different init seeds
    (the ceiling) and a random SAE (the null), on pre-training text and on the fine-tune's own Q&A text
    (``own_verdict``). "consistent" when every layer is consistent on every text, "partly consistent" when some
    are, else not shown; never "reproduced" (the ceiling is two seeds, the paper has no number). None without a
    transfer section."""
    r = results.get("transfer")
    if not r:
        return None
    sm = r["summary"]
    texts = [""] + (["own_"] if any("own_verdict" in s for s in sm.values()) else [])
    per = {L: {t or "pretraining_": s.get(f"{t}verdict") for t in texts} for L, s in sm.items()}
    ok = [L for L, s in sm.items() if all(s.get(f"{t}verdict") == "consistent" for t in texts)]
    some = [L for L, s in sm.items() if any(s.get(f"{t}verdict") == "consistent" for t in texts)]
    verdict = "consistent" if ok and len(ok) == len(sm) else "partly consistent" if some else False
    return {"layers": list(sm), "stable_layers": ok, "verdicts": per, "reproduced": verdict,
            "words": {L: {t or "pretraining_": s.get(f"{t}verdict_words") for t in texts} for L, s in sm.items()}}


def concept_margins(results: dict, cfg: DemoConfig) -> dict:
    """Per run, concept view and layer at ``k_ref``: the trained SAE's held-out median F1 (the k sweep's seed, and
    over init seeds with its min–max), the random SAEs' (mean and percentile range over 5 untrained SAEs with the
    trained b_dec) and the best single residual dimension's, and the margins against both."""
    out: dict = {}
    for key, by_layer in results.get("concept_baselines", {}).items():
        for L, views in by_layer.items():
            for view, base in views.items():
                if not isinstance(base, dict) or "random_sae" not in base:
                    continue
                rand, dim = base["random_sae"]["median_f1"], base["best_dimension"]["median_f1"]
                by_seed = seed_entries(results, key, L, cfg.k_ref)
                f1 = [None if e.get("failed") else e[view]["median_f1"] for e in by_seed.values() if view in e]
                sp = spread(f1)
                out.setdefault(key, {}).setdefault(view, {})[L] = {
                    "trained": get(results, key, L, cfg.k_ref, view, "median_f1"), "trained_over_seeds": sp,
                    "random_sae": rand, "best_dimension": dim,
                    "margin_random": spread(None if v is None else v - rand["mean"] for v in f1),
                    "margin_best_dimension": spread(None if v is None else v - dim for v in f1)}
    return out


def _margin_cells(m: dict, layers) -> str:
    """``L0 0.62 (+0.10 / −0.03)``: the trained median F1 and its margins over the random SAEs' mean and over the
    best single dimension (mean over seeds)."""
    return ", ".join(f"L{L} {m[str(L)]['trained']:.2f} ({_signed(m[str(L)]['margin_random']['mean'])} / "
                     f"{_signed(m[str(L)]['margin_best_dimension']['mean'])})" for L in layers if str(L) in m)


def _signed(v) -> str:
    return "n/a" if v is None or v != v else f"{v:+.2f}"


def observations(results: dict, cfg: DemoConfig) -> list[str]:
    """Bullet lines on what else the numbers show (each one states the comparison it is computed from)."""
    pairs = [(L, k) for L in cfg.layers for k in cfg.ks]
    twins = [key for key in AR_TWINS if key in results["runs"]]
    keys = ("dlm/mask", "dlm/unmask", *twins)
    ok = [(L, k) for L, k in pairs if not any(_failed(results, key, L, k) for key in keys)]
    unmask_hurts = [L for L, k in pairs if get(results, "dlm/unmask", L, k, "delta", "mask_delta")
                    > get(results, "dlm/mask", L, k, "delta", "mask_delta")]
    seeds = results.get("findings", {}).get("seeds") or seed_summary(results, list(cfg.layers), cfg.k_ref)
    gaps = seeds["gaps"]
    n_seeds = len(seeds["init_seeds"])
    lines = []
    for key in twins:
        name = key.split("/")[0]
        better = sum(get(results, key, L, k, "fve") > max(get(results, "dlm/mask", L, k, "fve"),
                                                          get(results, "dlm/unmask", L, k, "fve")) for L, k in ok)
        lines.append(
            f"- The {AR_TWINS[key]}: its SAEs reconstruct better than both DLM SAEs at {better} of {len(ok)} "
            f"(layer, k) pairs where no SAE failed (of {len(pairs)}). At k = {cfg.k_ref} over {n_seeds} init seeds "
            "(mean over layers, mean [min, max] over seeds; failed SAEs out): FVE Unmask-SAE − this twin "
            + _range(gaps.get(f"unmask_minus_{name}")) + ", Mask-SAE − this twin "
            + _range(gaps.get(f"mask_minus_{name}")) + ".")
    lines += [
        f"- Spliced in at every position, the Unmask-SAE raises L_mask more than the Mask-SAE at {len(unmask_hurts)} "
        f"of {len(pairs)} pairs (per layer: " + ", ".join(f"L{L} {unmask_hurts.count(L)}/{len(cfg.ks)}"
                                                          for L in cfg.layers) + ").",
    ]
    margins = results.get("findings", {}).get("concepts") or concept_margins(results, cfg)
    explain = (f"held-out median best-latent F1 at k = {cfg.k_ref}; in parentheses its margin over 5 untrained SAEs "
               "with the trained b_dec (their mean) and over the best single residual dimension, each the mean over "
               "init seeds")
    if "concepts_masked" in margins.get("dlm/mask", {}):
        lines.append(
            f"- Masked positions (t = {cfg.concept_t}), scored against the *hidden* token's concept ({explain}): "
            f"Mask-SAE {_margin_cells(margins['dlm/mask']['concepts_masked'], cfg.layers)}; Unmask-SAE (never "
            f"trained on masked positions) {_margin_cells(margins['dlm/unmask']['concepts_masked'], cfg.layers)}.")
    if all("concepts_clean" in margins.get(key, {}) for key in keys):
        lines.append(f"- Clean text ({explain}): " + "; ".join(
            f"{label} {_margin_cells(margins[key]['concepts_clean'], cfg.layers)}"
            for key, label in zip(keys, ("Mask-SAE", "Unmask-SAE", "AR init twin", "matched AR twin"))) + ".")
    return lines


def _range(sp: dict | None) -> str:
    if not sp:
        return "n/a"
    m = sp["mean_over_layers"]
    return f"{_signed(m['mean'])} [{_signed(m['low'])}, {_signed(m['high'])}] ({m['n']} seeds)"
