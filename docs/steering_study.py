"""Steering on the embedded world: each planted concept's best latent, the DLM against each of its two AR twins,
three SAE init seeds per (model, block), with the library's controls, scores and verdict. Writes
docs/steering.json, docs/steering_results.md (the tables) and docs/steering_*.png; docs/steering.md discusses them.

Pairs (:data:`PAIRS`): the DLM against the AR init twin (``ar``: 1200 steps, the DLM's initialisation) and against
the budget-matched AR twin (``ar_matched``: the init twin continued for the DLM's own 4500 + 1000 steps on the
DLM's data). Every DLM-vs-AR number is stored and printed under its pair.

Fluency (:data:`JUDGE`): each pair is judged by the other AR twin, a model that is neither of the pair; neither
judge is independent of the pair (the world has no causal LM outside the family: every model starts from the init
twin, and the matched twin was trained on the DLM's data). The DLM is swept once per judge with the same sampler
and seed, so its generations are the same in both sweeps and only the perplexities differ.

Statistics, all from the library (:mod:`dlmscope.analysis.steering_stats`, :func:`dlmscope.jobs.steer.compare_models`,
:func:`dlmscope.util.bootstrap.bootstrap_crossed`): per SAE seed, every pooled number has its 95% interval over
concepts × prompts; across seeds, the same per-cell DLM − twin differences stacked ``[seeds, concepts, prompts]``
get a three-level crossed bootstrap, beside the min–max of the seed means. The verdict rule (:data:`RULE`) is fixed
before the run.

    python docs/steering_study.py [--prompts 60] [--layers 1 4 6] [--seeds 3]
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import torch

from dlmscope.analysis import steering_stats as stats
from dlmscope.demo import DemoConfig, load_world_model, train_layer_saes
from dlmscope.demo.run import sweep_spec
from dlmscope.jobs.plots import plot_by_layer, plot_tradeoff
from dlmscope.jobs.steer import (SteerSpec, compare_models, concept_features, condition_cells, fluency_reference,
                                 neutral_prompts, run_steer, summary_row, without_per_prompt)
from dlmscope.jobs.train import heldout_activations
from dlmscope.sae.metrics import evaluate_sae, training_failure
from dlmscope.util import atomic
from dlmscope.util.bootstrap import bootstrap_crossed
from dlmscope.world import CONCEPTS, world_batches

#: the steered models: (SAE harvest policy, sampler)
MODELS = {"dlm": ("unmask", "llada"), "ar": ("clean", "ar"), "ar_matched": ("clean", "ar")}
#: each AR twin -> the pair it makes with the DLM, as every line names it
PAIRS = {"ar": "DLM vs AR init twin (1200 steps)",
         "ar_matched": "DLM vs budget-matched AR twin (6700 steps, same data)"}
#: each AR twin's pair -> the model that judges that pair's fluency (the other twin)
JUDGE = {"ar": "ar_matched", "ar_matched": "ar"}
JUDGE_WHY = {"ar": "the budget-matched AR twin judges the DLM vs AR-init pair: neither model of the pair, but it "
                   "starts from the init twin and was trained on the DLM's data, so it is not independent of either",
             "ar_matched": "the AR init twin judges the DLM vs matched-AR pair: neither model of the pair, but it is "
                           "the initialisation of both, so it is not independent of either"}
#: the paper's strengths (docs/reference.md §5): DLM 2.0 vs AR 1.2
PAPER_ALPHA = {"dlm": 2.0, "ar": 1.2}
#: the α each model is swept at: the paper's (DLM 2.0, AR 1.2), the DLM's 2.0 for the twins too (matched α), and
#: 4.0 for every model (a strong push, past where fluency breaks at most blocks)
ALPHAS = {"dlm": (2.0, 4.0), "ar": (1.2, 2.0, 4.0)}
#: matched-α pairings (both sides at the same α)
MATCHED = (2.0, 4.0)
TRADEOFF_LAYER = 4
GEN, STEPS = 8, 8
AXES = ("seeds", "concepts", "prompts")
RULE = ("per pair and block at the paper's strengths (DLM α 2.0, AR α 1.2): 'reproduced' when the DLM − twin "
        "difference of the controlled effect (steered − random-latent control concept-rate change) has its 95% "
        "interval over seeds × concepts × prompts above 0 AND the paper's score (REFERENCE §5, on prompt means) "
        "favours the DLM at every SAE seed; 'consistent with' when one of the two favours the DLM and the other "
        "does not favour the twin (interval covering 0, or the paper's score split across seeds); 'not "
        "reproduced' otherwise. Failed SAEs (more than 50% dead latents) are kept out. The log-ratio composite's "
        "verdict is reported beside it and is not part of the rule.")


def _twin_kind(name: str) -> str:
    return "dlm" if name == "dlm" else "ar"


def _key(name: str, layer, seed) -> str:
    """The run key of a model's sweep under the judge of its first pair (the DLM's: the matched twin)."""
    return f"{name}/{layer}/{seed}/{'ar' if name == 'ar_matched' else 'ar_matched'}"


# --------------------------------------------------------------------------------------------------- running
def train_saes(name: str, model, cfg: DemoConfig, layers) -> tuple[dict, dict]:
    """``({layer: [SAE per init seed]}, {layer: [held-out FVE, dead fraction, failed per seed]})``: one harvest
    per model, the SAEs of every init seed trained on it (only the initialisation differs)."""
    policy = MODELS[name][0]
    train, held = world_batches(model.tokenizer, cfg.sentences, cfg.seq_len, cfg.lm_batch, cfg.seed)
    cache = Path(tempfile.mkdtemp(prefix=f"steer-study-{name}-"))
    try:
        saes = train_layer_saes(model, train, policy, cfg, layers=layers, cache_dir=cache, label=name,
                                extra_seeds=cfg.init_seeds[1:])
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    acts = heldout_activations(model, held, sweep_spec(cfg, policy, layers), tokens=cfg.eval_tokens)
    health = {}
    for L in layers:
        health[str(L)] = []
        for seed, sae in zip(cfg.init_seeds, saes[L]):
            e = evaluate_sae(sae, acts[L])
            health[str(L)].append({"init_seed": seed, "fve": e["fve"], "dead_fraction": e["dead_fraction"],
                                   "failed": training_failure(e["fve"], e["dead_fraction"])})
    return saes, health


def sweep(name: str, model, sae, layer: int, prompts, lms: dict) -> dict:
    """``{judge: run_steer result}``: the model's sweep at ``layer``, once per fluency judge of its pairs."""
    feats = list(concept_features(model, sae, layer, list(CONCEPTS)).items())
    spec = SteerSpec(layer=layer, alphas=ALPHAS[_twin_kind(name)], sampler=MODELS[name][1], gen_length=GEN,
                     steps=STEPS, temperature=0.7, seed=0)
    judges = {JUDGE[t]: t for t in PAIRS} if name == "dlm" else {JUDGE[name]: name}
    out = {}
    for j, pair in judges.items():
        # the judge by its world name: the adapter's source is an absolute path
        ref = fluency_reference(lms[j], model, independent=False, why=JUDGE_WHY[pair], name=j)
        out[j] = run_steer(model, sae, prompts, feats, spec, lms[j], keep_generations=2, progress=False,
                           reference=ref)
    return out


# ---------------------------------------------------------------------------------------------- statistics
def _cells(result: dict, alpha: float) -> dict:
    """``{"controlled", "composite"}``: ``[concepts, prompts]`` cells of one sweep at α, scope all (the cells
    :func:`compare_models` differences; controlled = minus the primary control)."""
    cells = condition_cells(result, alpha)
    return {"controlled": cells[stats.PRIMARY_CONTROL], "composite": cells["composite"]}


def _pairings() -> dict:
    """``{key: (DLM α, twin α)}``: the paper's strengths and the matched ones."""
    return {"paper": (PAPER_ALPHA["dlm"], PAPER_ALPHA["ar"])} | {f"{a:g}": (a, a) for a in MATCHED}


def contrast(dlm: dict[int, dict], twin: dict[int, dict], seeds: list[int]) -> dict:
    """One pair at one block, given each seed's DLM and twin sweeps (judged by the pair's judge): per pairing, the
    per-seed :func:`compare_models` cell (interval over concepts × prompts), and pooled over the seeds that did
    not fail: the three-level interval (seeds × concepts × prompts) of the controlled and the composite
    difference with their verdicts, the min–max of the seed means, and the paper's score difference per seed."""
    if not seeds:
        raise ValueError("every SAE seed of this pair and block failed: nothing to compare")
    out = {}
    for key, (a, b) in _pairings().items():
        per_seed = {str(s): compare_models(dlm[s], twin[s], a, b) for s in seeds}
        pooled = {}
        for part in ("controlled", "composite"):
            cells = [stats.difference_cells(_cells(dlm[s], a)[part], _cells(twin[s], b)[part]) for s in seeds]
            # a tensor: bootstrap_crossed reads nested lists only up to two levels deep
            interval = dataclasses.asdict(bootstrap_crossed(torch.tensor(cells, dtype=torch.float64), AXES))
            means = [(per_seed[str(s)] if part == "controlled" else per_seed[str(s)]["composite"])["mean"]
                     for s in seeds]
            pooled[part] = interval | {"verdict": stats.verdict(interval), "seed_means": means,
                                       "seed_range": [min(means), max(means)]}
        score = [per_seed[str(s)]["score_paper"]["difference"] for s in seeds]
        out[key] = {"dlm_alpha": a, "twin_alpha": b, "per_seed": per_seed, "pooled": pooled,
                    "score_paper_difference": score}
    return out


def study_verdict(cell: dict) -> str:
    """:data:`RULE` on one pair and block at the paper's strengths."""
    control, score = cell["pooled"]["controlled"]["verdict"], cell["score_paper_difference"]
    control_dlm, control_twin = control == "DLM", control == "AR"
    score_dlm, score_twin = all(x > 0 for x in score), all(x < 0 for x in score)
    if control_dlm and score_dlm:
        return "reproduced"
    if (control_dlm and not score_twin) or (score_dlm and not control_twin):
        return "consistent with"
    return "not reproduced"


# ------------------------------------------------------------------------------------------------- tables
def _ci(c: dict, spec: str = "+.3f") -> str:
    return f"{c['mean']:{spec}} [{c['low']:{spec}}, {c['high']:{spec}}]"


def _fmt(x, spec: str = ".3g") -> str:
    return "—" if x is None or x != x else f"{x:{spec}}"


def health_table(out: dict) -> list[str]:
    lines = ["## SAE seeds", "", "Held-out FVE and dead fraction of every SAE the study steers with (k = 8, n = 512; "
             "the seeds share the harvest and data order, only the initialisation differs). Failed: more than 50% "
             "of latents dead (such an SAE is kept out of the pooled numbers).", "",
             "| model | block | " + " | ".join(f"seed {s}: FVE, dead" for s in out["seeds"]) + " | failed |",
             "|---" * (3 + len(out["seeds"])) + "|"]
    for name in MODELS:   # the JSON's keys come back sorted: the tables keep the study's own order
        for L in out["layers"]:
            entries = out["sae_health"][name][str(L)]
            lines.append(f"| {name} | {L} | " + " | ".join(f"{e['fve']:.3f}, {e['dead_fraction']:.2f}" for e in entries)
                         + f" | {', '.join(str(e['init_seed']) for e in entries if e['failed']) or 'none'} |")
    return lines + [""]


def sweep_tables(out: dict) -> list[str]:
    lines = ["## Sweeps (scope all, every step)", "",
             "Δconcept: mean concept-rate change over the 10 concepts, 95% interval over concepts × prompts; − random "
             "latent / − random direction: the controlled effect (steered − control change, same α and norm, same "
             "interval); up: concepts up by ≥ 0.1 with a per-concept interval over prompts above 0; ppl ×: median "
             "perplexity ratio steered / unsteered under the judge; composite: ΔC − 0.3·log(P_after/P_before) per "
             "cell, same interval; paper: the paper's score ΔC̄ + 0.3·(P̄_b − P̄_a)/P̄_b per concept, averaged (no "
             "interval); norm: ‖α·m(h)·v‖/‖h‖.", ""]
    head = ("| block | seed | α | Δconcept | − random latent | − random direction | up | ppl × | composite | paper "
            "| norm |")
    for key, label in (("dlm@ar_matched", "DLM, fluency judged by the matched AR twin"),
                       ("dlm@ar", "DLM, fluency judged by the AR init twin (concept columns as above: same texts)"),
                       ("ar@ar_matched", "AR init twin, fluency judged by the matched AR twin"),
                       ("ar_matched@ar", "Matched AR twin, fluency judged by the AR init twin")):
        lines += [f"### {label}", "", head, "|---" * 11 + "|"]
        name, judge = key.split("@")
        for L in out["layers"]:
            for s in out["seeds"]:
                res = out["runs"][f"{name}/{L}/{s}/{judge}"]
                for a in ALPHAS[_twin_kind(name)]:
                    r = summary_row(res, a)
                    ctl = r["controlled"]
                    lines.append(f"| {L} | {s} | {a:g} | {_ci(r['concept_delta'])} | {_ci(ctl['random_latent'])} | "
                                 f"{_ci(ctl['random_direction'])} | {r['features_up']}/{r['n_features']} | "
                                 f"{_fmt(r['ppl_ratio_median'])} | {_ci(r['composite'])} | "
                                 f"{r['score_mean']:+.3f} | {r['norm_ratio']:.3f} |")
        lines.append("")
    return lines


def matched_fluency_table(out: dict) -> list[str]:
    lines = ["## Best concept gain at matched fluency", "", "Per sweep, the α with the largest mean concept-rate "
             "change among those whose median perplexity ratio is ≤ 2 (fluency gates, the gain picks; "
             "`steering_stats.matched_fluency`), its Δconcept and controlled effect, intervals over concepts × "
             "prompts.", "", "| model (judge) | block | " + " | ".join(f"seed {s}" for s in out["seeds"]) + " |",
             "|---" * (2 + len(out["seeds"])) + "|"]
    for key in ("dlm@ar_matched", "dlm@ar", "ar@ar_matched", "ar_matched@ar"):
        name, judge = key.split("@")
        for L in out["layers"]:
            cells = []
            for s in out["seeds"]:
                m = out["runs"][f"{name}/{L}/{s}/{judge}"]["summary"]["matched_fluency"][0]
                cells.append("no α" if m["alpha"] is None else
                             f"α {m['alpha']:g}: {_ci(m['concept_delta'], '+.2f')}, controlled "
                             f"{_ci(m['controlled']['random_latent'], '+.2f')}")
            lines.append(f"| {name} ({judge}) | {L} | " + " | ".join(cells) + " |")
    return lines + [""]


def contrast_tables(out: dict) -> list[str]:
    lines = ["## DLM − AR, per pair", "", "Controlled effect (steered − random-latent control concept-rate change), "
             "DLM minus twin, cell by cell (same concept, same prompt). Per seed: the mean and 95% interval over "
             "concepts × prompts, → verdict (`compare_models`). Pooled: the 95% interval over seeds × concepts × "
             "prompts (three-level crossed bootstrap of the same cells; with 3 seeds the seed axis is coarse) → "
             "verdict, and the min–max of the seed means. Composite: the log-ratio composite difference, pooled the "
             "same way. Paper's score: its DLM − twin difference per seed (no interval). Study verdict: the rule "
             "below, at the paper's strengths only.", "", f"Rule: {RULE}", ""]
    for twin, label in PAIRS.items():
        judge = JUDGE[twin]
        judged = "the matched AR twin" if judge == "ar_matched" else "the AR init twin"
        lines += [f"### {label}; fluency judged by {judged}",
                  "", "| block | α DLM vs twin | " + " | ".join(f"seed {s}" for s in out["seeds"])
                  + " | pooled (seeds × concepts × prompts) | seed range | composite pooled | paper's score Δ per seed "
                  "| study verdict |", "|---" * (8 + len(out["seeds"]) - 1) + "|"]
        for L in out["layers"]:
            for key in _pairings():
                c = out["contrasts"][twin][str(L)][key]
                p, comp = c["pooled"]["controlled"], c["pooled"]["composite"]
                seeds = " | ".join(f"{_ci(c['per_seed'][str(s)])} → {c['per_seed'][str(s)]['verdict']}"
                                   if str(s) in c["per_seed"] else "failed" for s in out["seeds"])
                lines.append(f"| {L} | {c['dlm_alpha']:g} vs {c['twin_alpha']:g} | {seeds} | {_ci(p)} → {p['verdict']} "
                             f"| [{p['seed_range'][0]:+.3f}, {p['seed_range'][1]:+.3f}] | {_ci(comp)} → "
                             f"{comp['verdict']} | " + ", ".join(f"{x:+.3f}" for x in c["score_paper_difference"])
                             + f" | {out['verdicts'][twin][str(L)] if key == 'paper' else ''} |")
        lines.append("")
    return lines


def concept_table(out: dict) -> list[str]:
    lines = ["## Per concept at α = 4 (scope all)", "", "Each cell: the concept-rate change of that seed's best latent "
             "for the concept (latent id in brackets), mean over prompts; the DLM's texts are the same under both "
             "judges.", ""]
    names = ("dlm", "ar", "ar_matched")
    for L in out["layers"]:
        lines += [f"Block {L}:", "", "| concept | " + " | ".join(f"{n} s{s}" for n in names for s in out["seeds"])
                  + " |", "|---" * (1 + len(names) * len(out["seeds"])) + "|"]
        rows: dict = {}
        for n in names:
            for s in out["seeds"]:
                res = out["runs"][_key(n, L, s)]
                for e in res["features"].values():
                    r = next(r for r in e["sweep"] if r["alpha"] == 4.0)
                    rows.setdefault(e["concept"], []).append(f"{r['concept_delta']['mean']:+.2f} ({e['feature']})")
        lines += [f"| {c} | " + " | ".join(rows[c]) + " |" for c in CONCEPTS if c in rows] + [""]
    return lines


def tables(out: dict) -> list[str]:
    lines = ["# Steering study: tables", "",
             f"Generated by `docs/steering_study.py` in {out['wall_s'] / 60:.1f} min: {out['n_prompts']} neutral "
             f"prompts, {GEN} tokens in {STEPS} steps at temperature 0.7 (LLaDA sampler for the DLM, `ar_generate` for "
             "the AR twins), sampling seed 0 for the baseline, every steered run and every control; blocks "
             f"{', '.join(map(str, out['layers']))}; per (model, block) {len(out['seeds'])} Top-K SAEs (n = 512, "
             f"k = 8, {out['train_tokens']:,} training tokens; DLM: Unmask policy; AR twins: clean text) from init "
             f"seeds {', '.join(map(str, out['seeds']))}; each planted concept's best latent of each SAE (detection "
             "F1 on held-out text, not its steering result); `strength=max_act`; one random-latent and one "
             "random-direction control per (α, SAE) at the steered α (matched intervention norm). Fluency: the "
             "perplexity of the generation under the pair's judge, the other AR twin (neither model of the pair; not "
             "independent of either).", ""]
    return (lines + health_table(out) + contrast_tables(out) + matched_fluency_table(out) + sweep_tables(out)
            + concept_table(out))


# -------------------------------------------------------------------------------------------------- plots
def plot_contrasts(out: dict, path: Path) -> None:
    """Per pair (columns) and pairing of α (rows): the controlled DLM − twin difference per block, each seed with
    its interval over concepts × prompts (small markers) and pooled with its interval over seeds × concepts ×
    prompts (black)."""
    from matplotlib.figure import Figure

    keys = list(_pairings())
    fig = Figure(figsize=(9, 2.3 * len(keys)))
    axes = fig.subplots(len(keys), len(PAIRS), squeeze=False, sharey="row")
    for j, (twin, label) in enumerate(PAIRS.items()):
        for i, key in enumerate(keys):
            ax = axes[i, j]
            for x, L in enumerate(out["layers"]):
                c = out["contrasts"][twin][str(L)][key]
                for n, (s, cell) in enumerate(c["per_seed"].items()):
                    ax.errorbar(x - 0.2 + 0.1 * n, cell["mean"], yerr=[[cell["mean"] - cell["low"]],
                                [cell["high"] - cell["mean"]]], fmt="o", ms=3, capsize=2, color=f"C{int(s)}",
                                label=f"seed {s} (concepts × prompts)" if x == 0 else None)
                p = c["pooled"]["controlled"]
                ax.errorbar(x + 0.2, p["mean"], yerr=[[p["mean"] - p["low"]], [p["high"] - p["mean"]]], fmt="s",
                            ms=4, capsize=3, color="black", label="pooled (seeds × concepts × prompts)" if x == 0
                            else None)
            ax.axhline(0, color="grey", lw=0.6)
            ax.set_xticks(range(len(out["layers"])), [f"block {L}" for L in out["layers"]], fontsize=7)
            alphas = "α 2.0 vs 1.2 (paper's)" if key == "paper" else f"matched α {key}"
            ax.set_title(f"{label}\n{alphas}" if i == 0 else alphas, fontsize=7)
        axes[0, 0].legend(fontsize=5)
    for i in range(len(keys)):
        axes[i, 0].set_ylabel("DLM − twin, controlled", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_outputs(out: dict, root: Path) -> None:
    """The plots and the tables from the study's JSON (``out``, as written to steering.json). The sweep plots
    show SAE seed 0, each model's perplexity under the judge of its first pair (the DLM's and the init twin's:
    the matched twin; the matched twin's: the init twin)."""
    labels = {"dlm": "DLM", "ar": "AR init twin", "ar_matched": "matched AR twin"}
    layers = out["layers"]
    plot_by_layer({labels[n]: {L: out["runs"][_key(n, L, out["seeds"][0])] for L in layers} for n in MODELS},
                  root / "steering_layers.png")
    if TRADEOFF_LAYER in layers:
        plot_tradeoff({labels[n]: out["runs"][_key(n, TRADEOFF_LAYER, out["seeds"][0])] for n in MODELS},
                      root / "steering_tradeoff.png")
    plot_contrasts(out, root / "steering_contrasts.png")
    atomic.write_text(root / "steering_results.md", "\n".join(tables(out)) + "\n")


# --------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(Path(__file__).resolve().parent), help="default: beside this script")
    p.add_argument("--prompts", type=int, default=60)
    p.add_argument("--layers", type=int, nargs="+", default=[1, 4, 6])
    p.add_argument("--seeds", type=int, default=3, help="SAE init seeds per (model, block)")
    p.add_argument("--train-tokens", type=int, default=100_000)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    cfg = dataclasses.replace(DemoConfig(), ks=(8,), k_ref=8, train_tokens=a.train_tokens, sentences=30_000,
                              sae_seeds=a.seeds)
    lms = {name: load_world_model(name) for name in MODELS}
    prompts = neutral_prompts(lms["ar"].tokenizer, a.prompts)
    seeds = list(cfg.init_seeds)
    out: dict = {"layers": a.layers, "seeds": seeds, "train_tokens": cfg.train_tokens, "alphas": ALPHAS,
                 "paper_alpha": PAPER_ALPHA, "gen_length": GEN, "steps": STEPS, "n_prompts": len(prompts),
                 "pairs": PAIRS, "fluency_judges": {PAIRS[t]: {"judge": JUDGE[t], "why": JUDGE_WHY[t]} for t in PAIRS},
                 "intervals": {"per seed": "95% percentile bootstrap over concepts × prompts (both resampled)",
                               "pooled": "95% percentile bootstrap over seeds × concepts × prompts (crossed, each "
                                         "axis resampled; the seeds are SAE init seeds on one harvest)",
                               "seed_range": "min–max of the per-seed means",
                               "per concept": "over prompts"},
                 "rule": RULE, "sae_health": {}, "runs": {}, "contrasts": {}, "verdicts": {}}
    for name, model in lms.items():
        saes, out["sae_health"][name] = train_saes(name, model, cfg, a.layers)
        print(f"{name}: SAEs trained ({time.perf_counter() - t0:.0f}s)", flush=True)
        for L in a.layers:
            for s, sae in zip(seeds, saes[L]):
                for judge, res in sweep(name, model, sae, L, prompts, lms).items():
                    out["runs"][f"{name}/{L}/{s}/{judge}"] = res
            print(f"{name} block {L} swept ({time.perf_counter() - t0:.0f}s)", flush=True)
    for twin in PAIRS:
        judge = JUDGE[twin]
        out["contrasts"][twin], out["verdicts"][twin] = {}, {}
        for L in a.layers:
            failed = {e["init_seed"] for n in ("dlm", twin) for e in out["sae_health"][n][str(L)] if e["failed"]}
            ok = [s for s in seeds if s not in failed]
            dlm = {s: out["runs"][f"dlm/{L}/{s}/{judge}"] for s in ok}
            other = {s: out["runs"][f"{twin}/{L}/{s}/{judge}"] for s in ok}
            cell = contrast(dlm, other, ok)
            out["contrasts"][twin][str(L)] = cell
            out["verdicts"][twin][str(L)] = study_verdict(cell["paper"])
    out["wall_s"] = time.perf_counter() - t0
    out["runs"] = {key: without_per_prompt(r) for key, r in out["runs"].items()}   # the JSON stays small
    root = Path(a.out)
    atomic.write_json(root / "steering.json", out)
    write_outputs(out, root)
    print(f"wrote {root}/steering.json, steering_results.md and the plots in {out['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
