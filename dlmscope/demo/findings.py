"""The paper's findings checked on a demo run's numbers, and other observations the tables support.

Every function takes the ``results`` dict :func:`dlmscope.demo.run.run_demo` builds (``results.json``) and
its :class:`~dlmscope.demo.config.DemoConfig`.
"""
from __future__ import annotations

from .config import DemoConfig

__all__ = ["PAPER_FVE_MASK", "PAPER_FVE_UNMASK", "PAPER_MASK_UNMASK_GAP", "get", "findings", "steering_finding",
           "order_finding", "transfer_finding", "observations"]


def get(results, run_key, layer, k, *path):
    """``results["runs"][run_key][layer][k]`` and then the keys ``path`` (e.g. ``"delta", "mask_delta"``)."""
    node = results["runs"][run_key][str(layer)][str(k)]
    for p in path:
        node = node[p]
    return node


#: The paper's FVE of a Mask-SAE and an Unmask-SAE (LLaDA-8B layer 16, k = 50) and their gap.
PAPER_FVE_MASK, PAPER_FVE_UNMASK = 0.711, 0.857
PAPER_MASK_UNMASK_GAP = PAPER_FVE_MASK - PAPER_FVE_UNMASK


def _significant_negatives(results, keys, pairs, dkey) -> list:
    """``[[run, layer, k, Δ, se]]`` where Δ < −2·SE (SE over the ΔLM batches): negative beyond batch noise."""
    out = []
    for key in keys:
        for L, k in pairs:
            d = get(results, key, L, k, "delta")
            se = d.get(f"{dkey}_se", 0.0)
            se = 0.0 if se is None or se != se else se  # NaN / null (one batch): no noise estimate
            if d[dkey] < -2 * se:
                out.append([key.split("/")[1], L, k, d[dkey], se])
    return out


def findings(results: dict, cfg: DemoConfig) -> dict:
    """The paper's claims, checked on this run's numbers.

    ``mask_vs_unmask``: Mask-SAEs reconstruct worse than Unmask-SAEs (:data:`PAPER_FVE_MASK` vs
    :data:`PAPER_FVE_UNMASK` in the paper).
    ``negative_delta``: splicing a DLM SAE in can *lower* the masked-diffusion loss at early layers (the first
    quarter of the blocks, at least block 0); a Δ counts as negative when it is below −2 standard errors.
    ``ar_contrast``: that effect is weaker or absent for the AR twin (relative to each model's clean loss);
    not testable (``reproduced: None``) when the DLM shows no negative Δ.
    ``steering``: :func:`steering_finding` (None when the run did not steer).
    """
    pairs = [(layer, k) for layer in cfg.layers for k in cfg.ks]
    gaps = [get(results, "dlm/mask", L, k, "fve") - get(results, "dlm/unmask", L, k, "fve") for L, k in pairs]
    mask_worse = sum(g < 0 for g in gaps)
    mean_gap = sum(gaps) / len(gaps)
    dlm_keys = ("dlm/mask", "dlm/unmask")
    neg = _significant_negatives(results, dlm_keys, pairs, "mask_delta")
    neg_unmask_objective = _significant_negatives(results, dlm_keys, pairs, "unmask_delta")
    ar_neg = _significant_negatives(results, ("ar/clean",), pairs, "delta")
    rel = {}
    for L in cfg.layers:
        d = get(results, "dlm/mask", L, cfg.k_ref, "delta")
        a = get(results, "ar/clean", L, cfg.k_ref, "delta")
        rel[str(L)] = {"dlm_rel_delta": d["mask_delta"] / d["mask_clean"], "ar_rel_delta": a["delta"] / a["clean"],
                       "dlm_recovered": d.get("mask_recovered", float("nan")),
                       "ar_recovered": a.get("recovered", float("nan"))}
    early = [L for L in cfg.layers if L < max(1.0, results["num_layers"] / 4)]
    neg_layers = sorted({L for _, L, _, _, _ in neg})
    # scale-free: the smallest Δ/clean over every (layer, k) of the Mask-SAEs and of the AR twin's SAEs
    dlm_min = min(get(results, "dlm/mask", L, k, "delta", "mask_delta")
                  / get(results, "dlm/mask", L, k, "delta", "mask_clean") for L, k in pairs)
    ar_min = min(get(results, "ar/clean", L, k, "delta", "delta") / get(results, "ar/clean", L, k, "delta", "clean")
                 for L, k in pairs)
    early_neg = [L for L in neg_layers if L in early]
    return {
        "mask_vs_unmask": {"mask_worse": mask_worse, "pairs": len(pairs), "mean_gap": mean_gap,
                           "min_gap": min(gaps), "max_gap": max(gaps), "paper_gap": PAPER_MASK_UNMASK_GAP,
                           "reproduced": mask_worse > len(pairs) / 2 and mean_gap < 0},
        "negative_delta": {"dlm": neg, "ar": ar_neg, "dlm_unmask_objective": neg_unmask_objective,
                           "dlm_layers": neg_layers, "early_layers": early, "reproduced": bool(early_neg)},
        "steering": steering_finding(results),
        "orders": order_finding(results),
        "transfer": transfer_finding(results),
        "ar_contrast": {"per_layer": rel, "dlm_min_rel_delta": dlm_min, "ar_min_rel_delta": ar_min,
                        "reproduced": (len(_significant_negatives(results, ("ar/clean",), [(L, k) for L in early_neg
                                                                                           for k in cfg.ks], "delta"))
                                       < len([n for n in neg if n[1] in early_neg])) if early_neg else None},
    }


def steering_finding(results: dict) -> dict | None:
    """*SAE features steer the DLM more than the AR model* (the paper's headline, docs/reference.md §5), per
    steered layer: the DLM's mean concept-rate change minus the AR twin's over the same prompts and concepts,
    at the paper's strengths (DLM 2.0, AR 1.2) and at matched α, with paired 95% intervals. Reproduced when
    the paper-strength difference is positive beyond its interval at every steered layer, partly when at some.
    None without a steering section."""
    st = results.get("steering")
    if not st:
        return None
    per_layer = st["dlm_minus_ar"]
    wins = [L for L, cell in per_layer.items() if cell["paper"]["low"] > 0]
    losses = [L for L, cell in per_layer.items() if cell["paper"]["high"] < 0]
    alphas = [a for a in next(iter(per_layer.values())) if a != "paper"]
    matched = {a: [L for L, cell in per_layer.items() if cell[a]["low"] > 0] for a in alphas}
    matched_losses = {a: [L for L, cell in per_layer.items() if cell[a]["high"] < 0] for a in alphas}
    verdict = len(wins) == len(per_layer) or ("partly" if wins else False)
    return {"dlm_wins_paper_alpha": wins, "ar_wins_paper_alpha": losses, "dlm_wins_matched": matched,
            "ar_wins_matched": matched_losses, "layers": list(per_layer), "reproduced": verdict}


def order_finding(results: dict) -> dict | None:
    """*SAE feature dynamics track decoding quality* (the paper's conjecture, docs/reference.md §6): per order, the
    within-group correlation over tasks between the pre-decode stability at the guide layer and exact match
    (:func:`dlmscope.jobs.order.run_order`); supported when
    it is positive beyond its interval for more than half of the orders that have one, partly when for more
    orders than it is negative beyond its interval, not otherwise.
    Also whether each SAE-guided order beats, ties or loses to the best confidence order at G and ⌈G/2⌉ steps
    (paired intervals). None without an order section."""
    r = results.get("orders")
    if not r:
        return None
    key = f"pre_stability/{r['spec']['guide_layer']}"
    rs = {o: c[key] for o, c in r["correlations_within_group"].items()
          if key in c and c[key]["mean"] == c[key]["mean"]}
    positive = [o for o, c in rs.items() if c["low"] > 0]
    negative = [o for o, c in rs.items() if c["high"] < 0]
    verdict = (len(positive) > len(rs) / 2) or ("partly" if len(positive) > len(negative) else False)
    guided = {}
    for o, by in r["sae_vs_best_confidence"].items():
        for st in ("half", "all"):
            if st in by:
                d = by[st]["difference"]
                guided[f"{o}/{st}"] = "better" if d["low"] > 0 else "worse" if d["high"] < 0 else "tie"
    return {"statistic": key, "positive": positive, "negative": negative, "orders": list(rs),
            "reproduced": verdict, "guided_vs_best_confidence": guided}


#: the bar for "the base SAE still works on the instruct model": FVE ratio and median latent correlation
TRANSFER_FVE_RATIO, TRANSFER_CORR = 0.9, 0.8


def transfer_finding(results: dict) -> dict | None:
    """*SAE features stay stable from base to instruct* (the paper's claim, docs/reference.md §7): reproduced at a
    layer when the base SAE keeps ≥ :data:`TRANSFER_FVE_RATIO` of the instruct SAE's FVE on instruct activations
    and its latents' median activation correlation across the two models is ≥ :data:`TRANSFER_CORR`; the
    verdict is every layer / some (partly) / none. None without a transfer section."""
    r = results.get("transfer")
    if not r:
        return None
    ok = [L for L, sm in r["summary"].items()
          if sm["fve_ratio"] >= TRANSFER_FVE_RATIO and sm["corr_median"] >= TRANSFER_CORR]
    verdict = len(ok) == len(r["summary"]) or ("partly" if ok else False)
    return {"layers": list(r["summary"]), "stable_layers": ok, "reproduced": verdict}


def observations(results: dict, cfg: DemoConfig) -> list[str]:
    """Bullet lines on what else the numbers show (each one states the comparison it is computed from)."""
    pairs = [(L, k) for L in cfg.layers for k in cfg.ks]
    ar_better = sum(get(results, "ar/clean", L, k, "fve") > max(get(results, "dlm/mask", L, k, "fve"),
                                                                  get(results, "dlm/unmask", L, k, "fve"))
                    for L, k in pairs)
    unmask_hurts = [L for L, k in pairs if get(results, "dlm/unmask", L, k, "delta", "mask_delta")
                    > get(results, "dlm/mask", L, k, "delta", "mask_delta")]
    base = results.get("concept_baselines", {})
    med = {(key, view): [get(results, key, L, cfg.k_ref, view, "median_f1") for L in cfg.layers]
           for key in ("dlm/mask", "dlm/unmask", "ar/clean") for view in ("concepts_clean", "concepts_masked")
           if view in results["runs"][key][str(cfg.layers[0])][str(cfg.k_ref)]}
    margin = {kv: [v - base[kv[0]][str(L)][kv[1]] for L, v in zip(cfg.layers, vals)] for kv, vals in med.items()}
    lines = [
        f"- The AR twin's SAEs reconstruct better than both DLM SAEs at {ar_better} of {len(pairs)} (layer, k) pairs.",
        f"- Spliced in at every position, the Unmask-SAE raises L_mask more than the Mask-SAE at {len(unmask_hurts)} "
        f"of {len(pairs)} pairs (per layer: " + ", ".join(f"L{L} {unmask_hurts.count(L)}/{len(cfg.ks)}"
                                                          for L in cfg.layers) + ").",
    ]
    if ("dlm/mask", "concepts_masked") in med:
        m, u = ("dlm/mask", "concepts_masked"), ("dlm/unmask", "concepts_masked")
        lines.append(
            f"- Masked positions (t = {cfg.concept_t}), scored against the *hidden* token's concept (held-out median "
            f"best-latent F1, k = {cfg.k_ref}; in parentheses the margin over an untrained SAE): Mask-SAE "
            + ", ".join(f"L{L} {v:.2f} ({d:+.2f})" for L, v, d in zip(cfg.layers, med[m], margin[m]))
            + "; Unmask-SAE (never trained on masked positions) "
            + ", ".join(f"L{L} {v:.2f} ({d:+.2f})" for L, v, d in zip(cfg.layers, med[u], margin[u])) + ".")
    lines.append(
        f"- Clean text (held-out median best-latent F1, k = {cfg.k_ref}; margin over an untrained SAE): "
        + "; ".join(f"{label} " + ", ".join(f"L{L} {v:.2f} ({d:+.2f})" for L, v, d in
                                           zip(cfg.layers, med[(key, 'concepts_clean')], margin[(key, 'concepts_clean')]))
                    for key, label in (("dlm/mask", "Mask-SAE"), ("dlm/unmask", "Unmask-SAE"), ("ar/clean", "AR twin")))
        + ".")
    return lines


