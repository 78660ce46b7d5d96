"""The demo's ``report.md``: one function per section, joined in :data:`SECTIONS` order.

A section is ``(results, cfg) -> list[str]`` (markdown lines, ending with a blank line); adding one to the
report is writing such a function and listing it in :data:`SECTIONS`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from dlmscope.util import atomic
from dlmscope.data.noise import T_MAX, T_MIN
from dlmscope.jobs.order import STEPS
from dlmscope.sae.metrics import FVE_TOLERANCE, MAX_DEAD_FRACTION
from .config import AR_TWINS, RUN_LABELS, DemoConfig
from .claims import paper_findings
from .findings import PAPER_FVE_MASK, PAPER_FVE_UNMASK, get
from .formatting import ci, conjecture_words, fmt, over, signed, signed_spread, spread_text
from .seeds import seed_summary

__all__ = ["SECTIONS", "write_report"]

Section = Callable[[dict, DemoConfig], list[str]]


def header(results: dict, cfg: DemoConfig) -> list[str]:
    """Title and the run's settings."""
    n_eval = [e["n_tokens"] for run in results["runs"].values() for layer in run.values() for e in layer.values()]
    min_eval, max_eval = min(n_eval), max(n_eval)
    deltas = [e["delta"] for run in results["runs"].values() for layer in run.values() for e in layer.values()]
    deltas += [e["delta"] for run in results.get("seed_runs", {}).values() for layer in run.values()
               for e in layer.values()]
    met = sum(bool(d.get("se_target_met")) for d in deltas)
    twins = [f"{RUN_LABELS[k].removesuffix(' SAE')} ({why})" for k, why in AR_TWINS.items() if k in results["runs"]]
    lines = ["# dlmscope demo — DLM-Scope on the embedded world", "",
             f"Embedded world: LLaDA-format masked DLM and its Llama AR twins ({results['num_layers']} blocks, d_model "
             f"{results.get('d_model', '?')}, {results.get('n_params', 0) / 1e6:.2f}M params each), "
             f"trained on the planted-concept corpus. AR twins: {'; '.join(twins)}. SAEs: Top-K, "
             f"n = {cfg.n_latents}, k ∈ {list(cfg.ks)}, "
             f"{cfg.train_tokens:,} kept training tokens per (model, policy, layer), lr {cfg.lr}, batch "
             f"{cfg.sae_batch}; held-out FVE on {min_eval:,}–{max_eval:,} tokens of the same policy (dead = never "
             "fired on them); ΔLM on held-out LM batches of "
             f"{cfg.lm_batch}×{cfg.seq_len} tokens in rounds of {cfg.delta_batches}, up to {cfg.delta_max_batches}, "
             f"until every ΔLM of the SAE has SE < {cfg.delta_rel_se:g}·|Δ| (met by {met} of {len(deltas)} SAEs; "
             "◦ marks the others) "
             f"(t stratified over [{T_MIN}, {T_MAX}] per round, the same corruption for every SAE and layer; the "
             "paper's pooled estimator, ± its SE over batches: for a DLM over collapsed strata, adjacent-t pairs "
             "of a round; for an AR twin over independent batches). "
             f"SAE seeds: {cfg.sae_seeds} init seeds at k = {cfg.k_ref} for every "
             "run and layer (the same harvest and data order; the other k one seed); spreads over seeds are min–max. "
             f"A failed SAE (more than {MAX_DEAD_FRACTION:.0%} of latents dead, or FVE more than {FVE_TOLERANCE} "
             "below a smaller k's) is marked † and kept out of every mean and count. Wall time "
             f"{results['timings_s']['total'] / 60:.1f} min on {results['threads']} threads "
             f"(torch {results['torch']}).",
             ""]
    return lines


def reconstruction(results: dict, cfg: DemoConfig) -> list[str]:
    """Held-out FVE, L0 and dead fraction per (layer, k) and run; FVE and the gaps over init seeds at k_ref."""
    runs = [key for key in RUN_LABELS if key in results["runs"]]
    lines = ["## Reconstruction: held-out FVE (L0, dead fraction)", "",
             "| layer | k | " + " | ".join(RUN_LABELS[k] for k in runs) + " |", "|---|---|" + "---|" * len(runs)]
    for L in cfg.layers:
        for k in cfg.ks:
            cells = []
            for key in runs:
                e = results["runs"][key][str(L)][str(k)]
                mark = "†" if e.get("failed") else ""
                cells.append(f"{e['fve']:.3f}{mark} ({e['l0']:.1f}, {e['dead_fraction']:.2f})")
            lines.append(f"| {L} | {k} | " + " | ".join(cells) + " |")
    sm = results.get("findings", {}).get("seeds") or seed_summary(results, list(cfg.layers), cfg.k_ref)
    n = len(sm["init_seeds"])
    lines += ["", f"At k = {cfg.k_ref}, over {n} init seeds {sm['init_seeds']} (mean [min, max] (seeds that did not "
              "fail); the gaps pair seed i of one run with seed i of the other):", "",
              "| layer | " + " | ".join(RUN_LABELS[k] for k in runs) + " | Mask − Unmask | Unmask − AR init twin | "
              "Unmask − matched AR |", "|---|" + "---|" * (len(runs) + 3)]
    for L in cfg.layers:
        cells = [spread_text(sm["fve"][key][str(L)], 3) for key in runs]
        gaps = [spread_text(sm["gaps"][g]["per_layer"][str(L)], 3) if g in sm["gaps"] else "—"
                for g in ("mask_minus_unmask", "unmask_minus_ar", "unmask_minus_ar_matched")]
        lines.append(f"| {L} | " + " | ".join(cells + gaps) + " |")
    g = sm["gaps"]["mask_minus_unmask"]["mean_over_layers"]
    lines += ["", f"Mean FVE gap Mask − Unmask over layers at k = {cfg.k_ref}: {spread_text(g, 3)} over seeds (the paper: "
              f"{PAPER_FVE_MASK - PAPER_FVE_UNMASK:+.3f}, one SAE each at LLaDA L16, k = 50)."]
    if sm["failed"]:
        lines += ["", "Failed SAEs at k = " + f"{cfg.k_ref} (out of the means): " + "; ".join(
            f"{RUN_LABELS.get(key, key)} L{L} seed {s}: {why}" for key, L, _, s, why in sm["failed"]) + "."]
    return lines + [""]


def splice_in(results: dict, cfg: DemoConfig) -> list[str]:
    """ΔLM of each SAE spliced in at every position, and the loss recovered vs zero-ablation."""
    lines = ["## Splice-in: ΔLM loss (SAE − clean) and fraction of loss recovered vs zero-ablation", "",
             "DLM: masked-diffusion loss `L_mask` (1/t-weighted CE on masked positions) and `L_unmask`; "
             "AR: next-token CE. Negative Δ = the SAE lowers the loss. Every Δ is the paper's pooled estimator "
             "(Σ_b Σ_masked CE/t_b ÷ Σ_b #masked) ± its delta-method SE over the batches; beside it, the per-batch "
             "mean of the Mask-SAE's ΔL_mask (each batch weighted equally, not the paper's).", "",
             "| layer | k | Mask-SAE ΔL_mask | (per-batch) | Mask-SAE ΔL_unmask | Unmask-SAE ΔL_mask | "
             "Unmask-SAE ΔL_unmask | AR init twin ΔCE | matched AR ΔCE | DLM clean L_mask | AR clean CE (init / "
             "matched) | recovered (Mask-SAE / AR init / matched) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for L in cfg.layers:
        for k in cfg.ks:
            m = get(results, "dlm/mask", L, k, "delta")
            u = get(results, "dlm/unmask", L, k, "delta")
            a = get(results, "ar/clean", L, k, "delta")
            b = get(results, "ar_matched/clean", L, k, "delta") if "ar_matched/clean" in results["runs"] else None
            mark = lambda key: "†" if get(results, key, L, k).get("failed") else ""  # noqa: E731
            lines.append(f"| {L} | {k} | {_pm(m, 'mask_delta')}{mark('dlm/mask')} | "
                         f"{signed(m.get('per_batch', {}).get('mask_delta'), 4)} | {_pm(m, 'unmask_delta')} | "
                         f"{_pm(u, 'mask_delta')}{mark('dlm/unmask')} | {_pm(u, 'unmask_delta')} | "
                         f"{_pm(a, 'delta')}{mark('ar/clean')} | "
                         + (f"{_pm(b, 'delta')}{mark('ar_matched/clean')} | " if b else "— | ")
                         + f"{m['mask_clean']:.3f} | {a['clean']:.3f} / {fmt(b['clean'] if b else None)} | "
                         f"{fmt(m.get('mask_recovered'))} / {fmt(a.get('recovered'))} / "
                         f"{fmt(b.get('recovered') if b else None)} |")
    return lines + [""]


def _pm(d: dict, key: str) -> str:
    """``Δ ± SE`` of a ΔLM result (the SE over batches; n/a for one batch); ◦ when its SE stayed ≥ the target
    fraction of |Δ| after every batch."""
    unresolved = "◦" if d.get("se_target_met") is False and d.get(f"{key}_se", 0) >= d.get("se_target", 1) * abs(
        d[key]) else ""
    return f"{signed(d[key], 4)} ± {fmt(d.get(f'{key}_se'), 4)}{unresolved}"


def concepts(results: dict, cfg: DemoConfig) -> list[str]:
    """Median best-latent F1 of the planted concepts over seeds, beside random SAEs and the best single dimension."""
    margins = results.get("findings", {}).get("concepts", {})
    lines = [f"## Planted concepts: best latent's F1 (k = {cfg.k_ref})", "",
             "Clean held-out text, each token labelled by its planted concept; for the DLM SAEs also the masked "
             f"positions of text corrupted at t = {cfg.concept_t}, labelled by the hidden token (`masked`). Each "
             "concept's best latent (or rule) is chosen on one half of the held-out text and scored on the other "
             "half. Trained: median F1 over the concepts, mean [min, max] over init seeds; random SAEs: 5 untrained "
             "SAEs with the trained SAE's b_dec and row norms (mean [2.5th, 97.5th percentile]); best dimension: the "
             "best single residual coordinate thresholded; margins: trained − each, mean [min, max] over seeds.", "",
             "| layer | SAE (view) | trained | random SAEs | best dimension | − random | − best dimension |",
             "|---|---|---|---|---|---|---|"]
    series = [("dlm/mask", "concepts_clean", "Mask-SAE (clean)"), ("dlm/mask", "concepts_masked", "Mask-SAE (masked)"),
              ("dlm/unmask", "concepts_clean", "Unmask-SAE (clean)"),
              ("dlm/unmask", "concepts_masked", "Unmask-SAE (masked)"), ("ar/clean", "concepts_clean", "AR init twin"),
              ("ar_matched/clean", "concepts_clean", "matched AR twin")]
    for L in cfg.layers:
        for key, view, label in series:
            m = margins.get(key, {}).get(view, {}).get(str(L))
            if m is None:
                continue
            r = m["random_sae"]
            lines.append(f"| {L} | {label} | {spread_text(m['trained_over_seeds'])} | {fmt(r['mean'], 2)} "
                         f"[{fmt(r['low'], 2)}, {fmt(r['high'], 2)}] | {fmt(m['best_dimension'], 2)} | "
                         f"{signed_spread(m['margin_random'])} | {signed_spread(m['margin_best_dimension'])} |")
    n_concepts = len(get(results, "dlm/unmask", cfg.layers[0], cfg.k_ref, "concepts_clean", "concepts"))
    lines += ["", f"(median over the {n_concepts} concepts; per-concept values in `results.json` and "
              "`concept_f1.png`)", ""]
    return lines


def steering(results: dict, cfg: DemoConfig) -> list[str]:
    """Concept-rate change, its controls, the composite, the paper's score, fluency and intervention norm per
    (layer, model, α), and DLM − AR at the paper's and at matched strengths."""
    st = results.get("steering")
    if not st:
        return []
    first = st["runs"][f"dlm/{st['layers'][0]}"]
    row0 = first["summary"]["rows"][0]
    flu = first.get("fluency", {})
    lines = ["## Steering during generation", "",
             f"Each planted concept's best latent (chosen by detection F1 above, k = {cfg.k_ref}; DLM: Unmask-SAE, "
             f"AR init twin (AR) and matched AR twin (AR-M): their SAEs) steered with `α · m(h) · v_f` at every "
             f"position and step, on {st['n_prompts']} "
             f"neutral prompts, {st['gen_length']} tokens (DLM: LLaDA sampler, {st['gen_length']} steps; AR: sampled), "
             "temperature 0.7, the same seed for the baseline and every steered run. Δconcept: mean concept-rate "
             "change (planted judge) with its 95% interval over " + over(row0["concept_delta"]) + "; controlled: "
             "minus the change a random alive latent (or a random unit direction) of the same SAE makes at the same "
             "α and norm; composite: ΔC − 0.3·log(P_after/P_before) per cell (a robust fluency term); paper's score: "
             "ΔC̄ + 0.3·(P̄_b − P̄_a)/P̄_b per concept, averaged (no interval); ppl: median perplexity ratio; "
             "norm: ‖α·m(h)·v‖/‖h‖. Fluency judged by " + f"{flu.get('model', '?')} (independent of the steered "
             f"models: {flu.get('independent')}; {flu.get('why', 'not stated')}).", "",
             "| layer | model | α | Δconcept | − random latent | − random direction | up | ppl ×| composite "
             "| paper's score | norm |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    models = ["dlm"] + st.get("twins", ["ar"])
    for L in st["layers"]:
        for model in models:
            for r in st["runs"][f"{model}/{L}"]["summary"]["rows"]:
                ctl = r.get("controlled", {})
                lines.append(
                    f"| {L} | {_MODEL[model]} | {r['alpha']:g} | {ci(r['concept_delta'])} | "
                    + " | ".join(ci(ctl[k]) if k in ctl else "—" for k in ("random_latent", "random_direction"))
                    + f" | {r['features_up']}/{r['n_features']} | ×{fmt(r['ppl_ratio_median'], 3)} | "
                    f"{ci(r['composite']) if 'composite' in r else '—'} | {signed(r['score_mean'], 3)} | "
                    f"{fmt(r.get('norm_ratio'), 3)} |")
    lines += ["", "Best concept gain at matched fluency (median perplexity ratio ≤ 2; α picked by the gain): "
              + "; ".join(
        f"L{L} {_MODEL[model]} " + ", ".join(
            (f"α {m['alpha']:g}: {ci(m['concept_delta'])}" if m.get("alpha") is not None else "no α")
            for m in st["runs"][f"{model}/{L}"]["summary"].get("matched_fluency", []))
        for L in st["layers"] for model in models) + "."]
    for twin in models[1:]:
        lines += _steering_pair(st, twin)
    return lines + [""]


#: how the steering tables name the steered models
_MODEL = {"dlm": "DLM", "ar": "AR", "ar_matched": "AR-M"}


def _steering_pair(st: dict, twin: str) -> list[str]:
    """The pre-specified DLM − AR table of one pair (``twin``: ``"ar"`` or ``"ar_matched"``)."""
    pair = st[f"dlm_minus_{twin}"]
    keys = [k for k in next(iter(pair.values())) if k != "paper"]
    cell0 = pair[str(st["layers"][0])]["paper"]
    lines = ["", f"DLM − {_MODEL[twin]} ({AR_TWINS[twin + '/clean']}), pre-specified: the difference of the "
             f"controlled effect (steered − random-latent control), 95% interval over {over(cell0)}, → DLM if above "
             "0, AR if below, else no difference; the same rule on the composite; the paper's score difference "
             "beside it (no interval); norm DLM / AR.", "",
             "| layer | α (DLM vs AR) | controlled effect → verdict | composite → verdict | paper's score DLM / AR "
             "(difference) | uncontrolled Δconcept | norm DLM / AR |", "|---|---|---|---|---|---|---|"]
    for L, cell in pair.items():
        for name in ["paper"] + keys:
            c = cell[name]
            sp, nr = c.get("score_paper", {}), c.get("norm_ratio", {})
            label = "paper's (2.0 vs 1.2)" if name == "paper" else f"matched {name}"
            lines.append(f"| {L} | {label} | {ci(c)} → {c.get('verdict')} | "
                         f"{ci(c['composite']) if 'composite' in c else '—'} → {c.get('composite_verdict')} | "
                         f"{signed(sp.get('DLM'), 3)} / {signed(sp.get('AR'), 3)} "
                         f"({signed(sp.get('difference'), 3)}) | "
                         f"{ci(c['concept_delta']) if 'concept_delta' in c else '—'} | "
                         f"{fmt(nr.get('DLM'), 3)} / {fmt(nr.get('AR'), 3)} |")
    return lines + [""]


def decoding_orders(results: dict, cfg: DemoConfig) -> list[str]:
    """Exact match per order and steps on the order-sensitive tasks, each SAE-guided order against its own base
    order (pre-specified) and against the best confidence order (post hoc), and the stability–accuracy
    correlations with their sign and denominator."""
    r = results.get("orders")
    if not r:
        return []
    steps = [s for s in STEPS if s in next(iter(r["accuracy"].values()))]
    lines = ["## Decoding orders", "",
             f"The DLM fills {r['n_tasks']} order-sensitive world tasks (" + ", ".join(f"{g}: {n}" for g, n in
                                                                             r["groups"].items())
             + ") at temperature 0 under each order, with 1, ⌈G/2⌉ or G steps for G answers; exact match "
             f"(all answers right), mean over sampling seeds {r['spec']['seeds']} per task, 95% interval over tasks. "
             f"`sae_stable*` commit first the masked positions whose top-{r['spec']['top_k']} Mask-SAE latents at "
             f"block {r['spec']['guide_layer']} did not change since the previous step (confidence breaks ties). "
             f"The Mask-SAEs are one SAE init seed each (the k sweep's, k = {cfg.k_ref}); the order study "
             "(docs/order.md) repeats the SAE-guided comparisons over three SAE init seeds.", "",
             "| order | " + " | ".join(f"{s} step(s)" for s in steps) + " | held out (G steps) |",
             "|---|" + "---|" * (len(steps) + 1)]
    for order, by in r["accuracy"].items():
        lines.append(f"| {order} | " + " | ".join(_ci01(by[s]["order_sensitive"]) for s in steps)
                     + f" | {_ci01(by['all']['heldout'] if 'all' in by else None)} |")
    cell = next((c for by in r["accuracy"].values() for c in by.values() if c.get("order_sensitive")), None)
    if cell and cell["order_sensitive"].get("denominator"):
        lines += ["", f"(order-sensitive accuracy {cell['order_sensitive']['denominator']})"]
    lines += ["", "Pre-specified — each SAE-guided order − the confidence order it re-ranks (same tasks, paired): "
              + "; ".join(f"{o} − {c['base_order']} at {st} steps {ci(c['difference'])} {c['verdict']} "
                          f"({c['denominator']})"
                          for o, by in r.get("sae_vs_base", {}).items() for st, c in by.items() if st != "one") + ".",
              "", "Post hoc (the comparator is the best confidence order on these same tasks) — SAE-guided − best: "
              + "; ".join(f"{o} at {st} steps vs {c['best_confidence_order']} {ci(c['difference'])}"
                          for o, by in r["sae_vs_best_confidence"].items() for st, c in by.items() if st != "one")
              + ".", ""]
    best = []
    for o, c in r["correlations_within_group"].items():
        finite = {k: v for k, v in c.items() if v["mean"] is not None and v["mean"] == v["mean"]}
        if finite:
            k, v = max(finite.items(), key=lambda kv: abs(kv[1]["mean"]))
            best.append(f"{o} {k} r = {ci(v)} ({v.get('sign', 'n/a')}, {v.get('denominator', 'n/a')})")
    lines += ["Feature dynamics vs accuracy (Pearson r over tasks at G steps, within task groups, groups with no "
              "variance in exact match left out; per order the statistic with the largest |r|, chosen post hoc): "
              + "; ".join(best) + ".", ""]
    conj = r.get("conjecture")
    if conj:
        per = "; ".join(f"{o} r = {ci(c[conj['statistic']])} ({c[conj['statistic']].get('denominator', 'n/a')})"
                        for o, c in r["correlations_within_group"].items() if o in conj["orders"])
        lines += [f"Pre-specified statistic {conj['statistic']} ({conj.get('scope', 'within task groups')}), "
                  f"sign-agnostic: {conjecture_words(conj)}. Per order: {per}.", ""]
    return lines


def transfer(results: dict, cfg: DemoConfig) -> list[str]:
    """Base-DLM SAEs on the instruct twin, per layer, read against the seed-to-seed ceiling and a random-SAE null,
    on pre-training text and on the fine-tune's own text, with the AR twin as the different-model reference."""
    r = results.get("transfer")
    if not r:
        return []
    lines = ["## Base → instruct transfer", "",
             f"Unmask-policy SAEs (n = {r['config']['n_latents']}, k = {r['config']['k']}) trained on the base DLM "
             "(two, from different init seeds: the seed-to-seed ceiling), the instruct twin and (clean text) the AR "
             "twin, each from its own init seed; evaluated on the same held-out tokens of pre-training text and of "
             "the instruct twin's own Q&A text. FVE ratio = base SAE on instruct / instruct SAE on instruct (ceiling: "
             "base SAE / second base SAE on base)"
             + (f", mean [min–max] over {r['config']['seeds']} seed replicates (each its own base, second-base and "
                "instruct init seeds; the verdict's FVE measure is the worst replicate's)"
                if r["config"].get("seeds", 1) > 1 else "")
             + "; matched r = median correlation of each base latent with its Hungarian partner on the other "
             "model's tokens; Hungarian cos = signed decoder cosine after one-to-one matching (chance: a random SAE centred like the base SAE). The verdict is pre-specified: each measure "
             "against the ceiling and the null, 'consistent with stability' at best (intervals over latents).", "",
             "| layer | text | FVE base→base / base→instruct / instruct→instruct | ratio (ceiling, null) | matched r "
             "(ceiling) | median latent r | Hungarian cos (ceiling, chance) | recovered base / instruct SAE "
             "| verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for L, sm in r["summary"].items():
        for prefix, text in (("", "pre-training"), ("own_", "own Q&A")):
            g = lambda key: sm.get(prefix + key, math.nan)  # noqa: E731
            if prefix and prefix + "fve_ratio" not in sm:
                continue
            lines.append(
                f"| {L} | {text} | {fmt(g('fve_base_on_base'))} / {fmt(g('fve_base_on_target'))} / "
                f"{fmt(g('fve_target_on_target'))} | {_ratio_cell(sm, prefix)} | {fmt(g('matched_corr_median'), 2)} "
                f"({fmt(g('ceiling_matched_corr_median'), 2)}) | {fmt(g('corr_median'), 2)} | "
                f"{fmt(g('hungarian_mean'), 2)} ({fmt(g('ceiling_hungarian_mean'), 2)}, "
                f"{fmt(g('chance_hungarian_mean'), 2)}) | {fmt(g('recovered_base_in_target'), 2)} / "
                f"{fmt(g('recovered_target_in_target'), 2)} | {sm.get(prefix + 'verdict_words', 'n/a')} |")
    lines += ["", "AR twin as a different-model reference (base DLM SAE on the AR twin's clean activations): "
              + "; ".join(
        f"L{L} FVE ratio {fmt(sm.get('control_fve_ratio', math.nan), 2)}, median latent r "
        f"{fmt(sm.get('control_corr_median', math.nan), 2)}" for L, sm in r["summary"].items()) + "."]
    if any("init_hungarian_mean" in sm for sm in r["summary"].values()):
        lines += ["", "Shared initialisation (base vs its start): " + "; ".join(
            f"L{L} Hungarian cos {fmt(sm['init_hungarian_mean'], 2)}" for L, sm in r["summary"].items()
            if "init_hungarian_mean" in sm) + "."]
    return lines + [""]


def crosscoder(results: dict, cfg: DemoConfig) -> list[str]:
    """The crosscoder diff (base DLM vs instruct twin, placebo twin as the count null), per layer: reconstruction,
    exclusive latents per side against the placebo and across seeds, their firing on the Q&A text, the verdict."""
    r = results.get("crosscoder")
    if not r:
        return []
    c = r["config"]
    lines = ["## Crosscoder diff: what the instruct fine-tune created or removed", "",
             f"{c['seeds']} crosscoders per layer ({c['rule']}, n = {c['n_latents']}, k = {c['k']}, one decoder per "
             f"model) on paired {c['policy']}-policy activations of the base DLM and the instruct twin (one forward "
             f"of each on the same corrupted tokens; pre-training text and Q&A prompts 1:1, the instruct twin's SFT "
             f"mix; {c['train_tokens']:,} tokens, {c['epochs']} epochs; init seeds differ, data order shared), and "
             f"the same between the base DLM and the placebo twin (fine-tuned with the same recipe on base text "
             f"only). Scored on {c['eval_tokens']:,} held-out tokens each of pre-training and Q&A text. Exclusive: "
             f"alive ({c['min_fires']} or more fires) with relative decoder norm ρ of {c['low']} or less (base "
             f"only: removed) or {c['high']} or more (instruct only: created), not flagged by Latent Scaling (ν ≤ {c['max_nu']}). "
             f"Pre-specified verdict per side: replicated across every ordered seed pair (one-sided p < "
             f"{c['alpha']} against labels at random), more than the placebo in every seed, and firing more on the "
             "Q&A text than the shared latents (interval over latents, every seed).", "",
             "| layer | FVE base / instruct (Q&A) | alive | ρ sd (placebo) | created (placebo) | removed (placebo) "
             "| corr(ρ, Q&A specificity) (placebo) | verdict created / removed |",
             "|---|---|---|---|---|---|---|---|"]
    for L, e in r["layers"].items():
        runs, null = e["runs"], e.get("placebo", {}).get("runs", [])
        rng = lambda vals, d=3: f"{fmt(min(vals), d)}–{fmt(max(vals), d)}"  # noqa: E731
        fve = " / ".join(f"{rng([x['fve']['text'][s] for x in runs])} ({rng([x['fve']['own'][s] for x in runs])})"
                         if "own" in runs[0]["fve"] else rng([x["fve"]["text"][s] for x in runs]) for s in (0, 1))
        sides = {side: f"{rng([x['sides'][side]['robust'] for x in runs], 0)} "
                       f"({rng([x['sides'][side]['robust'] for x in null], 0) if null else '—'})"
                 for side in ("created", "removed")}
        lean = (f"{rng([x['lean_specificity_corr']['mean'] for x in runs], 2)} "
                f"({rng([x['lean_specificity_corr']['mean'] for x in null], 2) if null else '—'})"
                if "lean_specificity_corr" in runs[0] else "—")
        sd = f"{rng([x['rho_sd'] for x in runs])} ({rng([x['rho_sd'] for x in null]) if null else '—'})"
        lines.append(f"| {L} | {fve} | {rng([x['alive'] for x in runs], 0)} | {sd} | {sides['created']} | "
                     f"{sides['removed']} | {lean} | {e['verdict']['created']['outcome']} / "
                     f"{e['verdict']['removed']['outcome']} |")
    lines += [""] + [f"- L{L} {side}: {v['words']}." for L, e in r["layers"].items()
                     for side, v in e["verdict"].items()]
    lines += ["- The threshold-free reading (per seed, correlation over alive latents of ρ with the log firing-rate "
              "ratio Q&A / pre-training text; an interval per seed): " + "; ".join(
                  f"L{L} {e['lean']['target']} (placebo: {e['lean']['placebo']})" for L, e in r["layers"].items())
              + ".", ""]
    return lines


def _ratio_cell(sm: dict, prefix: str) -> str:
    """The FVE ratio (ceiling, null); with seed replicates, each as its mean and min–max over them."""
    g = lambda key: sm.get(prefix + key, math.nan)  # noqa: E731
    if prefix + "seeds" not in sm:
        return f"{fmt(g('fve_ratio'), 2)} ({fmt(g('ceiling_fve_ratio'), 2)}, {fmt(g('null_fve_ratio'), 2)})"
    r = lambda key: (f"{fmt(g(key + '_seeds_mean'), 3)} [{fmt(g(key + '_seeds_low'), 3)}–"  # noqa: E731
                     f"{fmt(g(key + '_seeds_high'), 3)}]")
    return f"{r('fve_ratio')} ({r('ceiling_fve_ratio')}, {fmt(g('null_fve_ratio_seeds_mean'), 2)})"


def _ci01(c) -> str:
    return "—" if not c else f"{fmt(c['mean'], 2)} [{fmt(c['low'], 2)}, {fmt(c['high'], 2)}]"


def plot_gallery(results: dict, cfg: DemoConfig) -> list[str]:
    """The PNGs written next to the report (see :mod:`dlmscope.demo.plots`); only when they were written."""
    lines = ["## Plots", "", "![FVE vs k](fve_vs_k.png)", "", "![delta LM](delta_lm.png)", "",
             "![concept F1](concept_f1.png)", ""]
    for key, name in (("steering", "steering.png"), ("orders", "order_accuracy.png"), ("orders", "order_dynamics.png"),
                      ("orders", "order_progress.png"),
                      ("transfer", "transfer.png"), ("crosscoder", "crosscoder.png")):
        if results.get(key):
            lines += [f"![{name[:-4]}]({name})", ""]
    return lines


plot_gallery.needs_plots = True

#: The report's sections, in order; a section with ``needs_plots = True`` is left out of a run without plots.
SECTIONS: tuple[Section, ...] = (header, reconstruction, splice_in, concepts, steering, decoding_orders, transfer,
                                 crosscoder, plot_gallery, paper_findings)


def write_report(results: dict, cfg: DemoConfig, out: Path, *, plots: bool = True,
                 sections: tuple[Section, ...] = SECTIONS) -> Path:
    """Write ``out/report.md`` from ``sections`` (those that show plots only when ``plots``); returns its path."""
    lines: list[str] = []
    for section in sections:
        if plots or not getattr(section, "needs_plots", False):
            lines += section(results, cfg)
    path = out / "report.md"
    atomic.write_text(path, "\n".join(lines))
    return path
