"""Decoding orders on the embedded world: every order, 1 / ⌈G/2⌉ / G steps, three run seeds, on every scored
task (600: arithmetic, chains, counting, facts, Q&A, held-out three-step chains), with the DLM's Mask-SAEs at
blocks 2, 4 and 6 (the guide reads block 4) from several SAE init seeds. Writes docs/order.json,
docs/order_results.md (the tables) and docs/order_*.png; docs/order.md discusses them.

Every SAE init seed gets its own :func:`dlmscope.jobs.order.run_order` (the SAE-guided orders and every replay
depend on the SAE; the other orders do not). The pre-specified comparison is each SAE-guided order against its
own base order (:data:`~dlmscope.jobs.order.BASE_ORDER`), per seed (interval over tasks, the job's
``sae_vs_base``) and over seeds (a crossed bootstrap over SAE seeds × tasks,
:func:`dlmscope.util.bootstrap.paired_difference`). The comparison with the best confidence order is kept,
marked post hoc (the comparator is picked on the same tasks).

    python docs/order_study.py [--policy mask] [--sae-seeds 3] [--out docs] [--from-json]
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from dlmscope.util import atomic
from dlmscope.util.bootstrap import paired_difference, side_of_zero, spread
from dlmscope.demo import DemoConfig, load_world_model, train_layer_saes
from dlmscope.demo.report import conjecture_words
from dlmscope.demo.run import sweep_spec
from dlmscope.jobs.order import BASE_ORDER, ORDERS, SAE_ORDERS, STEPS, OrderSpec, run_order
from dlmscope.jobs.plots import plot_order
from dlmscope.jobs.train import heldout_activations
from dlmscope.sae.metrics import MAX_DEAD_FRACTION, evaluate_sae, training_failure
from dlmscope.world import ASSETS_DIR, world_batches
from dlmscope.world.tasks import SCORED_KINDS, load_tasks

LAYERS = (2, 4, 6)
GUIDE_LAYER = 4
#: what every interval in order.json and order_results.md is over
INTERVALS = {
    "accuracy": "95% bootstrap over tasks (the denominator names them); SAE-guided orders: one SAE seed per cell",
    "sae_vs_base (top level and by_sae_seed)": "95% bootstrap over the order-sensitive tasks, one SAE seed",
    "sae_vs_base_over_seeds": "95% crossed bootstrap over SAE init seeds × order-sensitive tasks (both resampled); "
                              "seed_spread: min–max of the per-seed means",
    "sae_vs_best_confidence*": "as sae_vs_base*, post hoc: the comparator is the best confidence order on these "
                               "same tasks",
    "correlations*": "Pearson r, 95% bootstrap over the order-sensitive tasks replayed at G steps, one SAE seed; "
                     "groups whose exact match does not vary left out (denominator)",
}


def train_saes(dlm, cfg: DemoConfig, policy: str) -> tuple[dict, dict]:
    """``{init seed: {layer: SAE}}`` at ``cfg.k_ref`` (the k sweep's seed, then the extra ones, all on one
    harvest) and ``{init seed: {layer: held-out FVE, dead fraction, failed}}``."""
    train, held = world_batches(dlm.tokenizer, cfg.sentences, cfg.seq_len, cfg.lm_batch, cfg.seed)
    cache = Path(tempfile.mkdtemp(prefix="order-study-"))
    try:
        trained = train_layer_saes(dlm, train, policy, cfg, layers=list(LAYERS), cache_dir=cache,
                                   extra_seeds=cfg.init_seeds[1:])
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    acts = heldout_activations(dlm, held, sweep_spec(cfg, policy, LAYERS), tokens=cfg.eval_tokens)
    saes: dict = {s: {} for s in cfg.init_seeds}
    quality: dict = {s: {} for s in cfg.init_seeds}
    for L, row in trained.items():
        for seed, sae in zip(cfg.init_seeds, row):
            e = evaluate_sae(sae, acts[L])
            saes[seed][L] = sae
            quality[seed][L] = {"fve": e["fve"], "dead_fraction": e["dead_fraction"],
                                "failed": training_failure(e["fve"], e["dead_fraction"])}
    return saes, quality


def _row(r: dict, order: str, st: str) -> list:
    """Exact match per task of one (order, steps) run; the SAE-guided and confidence orders are not seeded, so
    the job ran them once."""
    runs = r["per_task"]["correct"][order][st]
    if len(runs) != 1:
        raise ValueError(f"{order} at {st} steps ran {len(runs)} run seeds; the comparison expects one")
    return next(iter(runs.values()))


def over_seeds(runs: dict, kept: list, key: str, comparator: str) -> dict:
    """Each SAE-guided order − its comparator (``comparator``: the field of the job's ``key`` naming it) over
    the kept SAE seeds: the job's per-seed comparison, and a crossed bootstrap over seeds × order-sensitive
    tasks of the per-task differences (each seed's SAE order paired with that run's comparator)."""
    first = runs[kept[0]]
    multi = [a > 1 for a in first["per_task"]["answers"]]
    out: dict = {}
    for o, by in first[key].items():
        for st in by:
            if st == "one":          # every order commits everything at once: identical by construction
                continue
            base = {s: runs[s][key][o][st][comparator] for s in kept}
            A = [[v for v, m in zip(_row(runs[s], o, st), multi) if m] for s in kept]
            B = [[v for v, m in zip(_row(runs[s], base[s], st), multi) if m] for s in kept]
            iv = paired_difference(B, A, axes=("sae_seeds", "tasks"))
            per = {str(s): runs[s][key][o][st] for s in kept}
            n = sum(any(a[t] is not None and b[t] is not None for a, b in zip(A, B)) for t in range(len(A[0])))
            out.setdefault(o, {})[st] = {
                comparator: sorted(set(base.values())), "difference": asdict(iv),
                "verdict": side_of_zero(iv, "better", "worse", "tie"),
                "denominator": f"over {n} order-sensitive tasks × {len(kept)} SAE seeds {kept}",
                "per_seed": {s: {"difference": c["difference"], "verdict": c["verdict"]} for s, c in per.items()},
                "seed_spread": spread(c["difference"]["mean"] for c in per.values())}
    return out


def conjecture_over_seeds(runs: dict, kept: list) -> dict:
    """The job's sign-agnostic conjecture verdict per SAE seed, and per order the spread of its r over seeds."""
    per = {str(s): runs[s]["conjecture"] for s in kept}
    key = runs[kept[0]]["conjecture"]["statistic"]
    r = {o: spread(runs[s]["correlations_within_group"][o][key]["mean"] for s in kept)
         for o in runs[kept[0]]["correlations_within_group"]}
    return {"statistic": key, "scope": "within task groups", "per_seed": per,
            "verdicts": {s: c["verdict"] for s, c in per.items()}, "r_seed_spread": r}


def _num(x) -> float:
    """A number of the results, None (a NaN read back from order.json) as NaN."""
    return math.nan if x is None else float(x)


def _ci(c, f=".2f") -> str:
    if not c or _num(c.get("mean")) != _num(c.get("mean")):
        return "n/a"
    return f"{_num(c['mean']):{f}} [{_num(c['low']):{f}}, {_num(c['high']):{f}}]"


def _range(sp: dict, f: str) -> str:
    return f"{_num(sp['low']):{f}} … {_num(sp['high']):{f}}"


def _steps_name(st: str) -> str:
    return {"one": "1", "half": "⌈G/2⌉", "all": "G"}[st]


def _comparison_table(cmp: dict, comparator: str, seeds: list) -> list[str]:
    lines = ["| SAE order | steps | comparator | " + " | ".join(f"SAE seed {s}" for s in seeds)
             + " | over seeds × tasks | verdict | seed means min–max |", "|---" * (len(seeds) + 6) + "|"]
    for o, by in cmp.items():
        for st, c in by.items():
            sp = c["seed_spread"]
            lines.append(f"| {o} | {_steps_name(st)} | {', '.join(c[comparator])} | "
                         + " | ".join(f"{_ci(c['per_seed'][str(s)]['difference'], '+.3f')} "
                                      f"{c['per_seed'][str(s)]['verdict']}" for s in seeds)
                         + f" | {_ci(c['difference'], '+.3f')} | {c['verdict']} | {_range(sp, '+.3f')} |")
    lines += ["", "Denominators: " + "; ".join(sorted({c["denominator"] for by in cmp.values()
                                                        for c in by.values()})) + ".", ""]
    return lines


def tables(r: dict, wall_s: float) -> list[str]:
    seeds, kept, q = r["sae_seeds"]["init_seeds"], r["sae_seeds"]["kept"], r["sae_seeds"]["saes"]
    N, M = r["n_tasks"], r["n_order_sensitive"]
    lines = ["# Decoding-order study: tables", "",
             f"Generated by `docs/order_study.py` in {wall_s / 60:.1f} min. The world DLM fills {N} scored tasks "
             f"at temperature 0 under each order; {M} of them have more than one answer (the order-sensitive "
             f"tasks). {r['policy']}-policy SAEs (n = 512, k = {r['sae_seeds']['k']}) at blocks {list(LAYERS)}, "
             f"init seeds {seeds} (one harvest; only the initialisation differs), top-{r['spec']['top_k']} latents "
             f"per position; the SAE-guided orders read block {r['spec']['guide_layer']}. Exact match (every answer "
             f"right); `random` and `origin` are averaged over run seeds {list(r['spec']['seeds'])} per task, the "
             "other orders are deterministic. Dream's confidence orders commit LLaDA's counts per step "
             f"(dream_schedule = {r['spec']['dream_schedule']}). Task groups (kind/answers): "
             + ", ".join(f"{g} {n}" for g, n in r["groups"].items()) + ".", "",
             "What each interval is over:", ""] + [f"- `{k}`: {v}" for k, v in INTERVALS.items()] + [
             "", "## SAEs (held-out FVE / dead fraction)", "",
             "| init seed | " + " | ".join(f"block {L}" for L in LAYERS) + " | failed |",
             "|---" * (len(LAYERS) + 2) + "|"]
    for s in seeds:
        fails = [f"block {L}: {q[str(s)][str(L)]['failed']}" for L in LAYERS if q[str(s)][str(L)]["failed"]]
        lines.append(f"| {s} | " + " | ".join(f"{_num(q[str(s)][str(L)]['fve']):.3f} / "
                                            f"{_num(q[str(s)][str(L)]['dead_fraction']):.2f}" for L in LAYERS)
                     + f" | {'; '.join(fails) or 'no'} |")
    lines += ["", f"A failed SAE (more than {MAX_DEAD_FRACTION:.0%} of latents dead; one k, so the FVE-vs-k rule "
              f"does not apply) takes its seed out of the over-seed rows. Seeds kept: {kept}.", "",
              f"## Order-sensitive tasks: exact match vs steps (SAE-guided orders: SAE seed {seeds[0]})", "",
              "| order | " + " | ".join(f"{_steps_name(s)} step(s)" for s in STEPS) + " | held-out, G steps |",
              "|---" * (len(STEPS) + 2) + "|"]
    for order, by in r["accuracy"].items():
        lines.append(f"| {order} | " + " | ".join(_ci((by.get(s) or {}).get("order_sensitive")) for s in STEPS)
                     + f" | {_ci(by.get('all', {}).get('heldout'))} |")
    cell = r["accuracy"]["low_confidence"]["all"]
    lines += ["", f"Denominators: order-sensitive {cell['order_sensitive']['denominator']}; held-out "
              f"{cell['heldout']['denominator']}.", "",
              "SAE-guided orders per SAE seed (order-sensitive tasks):", "",
              "| order | steps | " + " | ".join(f"SAE seed {s}" for s in seeds) + " |", "|---" * (len(seeds) + 2) + "|"]
    for o in SAE_ORDERS:
        for st in STEPS:
            lines.append(f"| {o} | {_steps_name(st)} | " + " | ".join(
                _ci(r["by_sae_seed"][str(s)]["accuracy"][o][st]["order_sensitive"]) for s in seeds) + " |")
    kinds = sorted({k for by in r["accuracy"].values() for c in by.values() if c for k in c["by_kind"]})
    lines += ["", f"## By task kind, G steps (one answer per step; SAE seed {seeds[0]})", "",
              "| order | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for order, by in r["accuracy"].items():
        kb = by["all"]["by_kind"]
        lines.append(f"| {order} | " + " | ".join(f"{kb[k]['mean']:.2f}" if k in kb else "—" for k in kinds) + " |")
    kb = r["accuracy"]["low_confidence"]["all"]["by_kind"]
    lines += ["", "Tasks per kind: " + "; ".join(f"{k} {kb[k]['denominator']}" for k in kinds if k in kb) + ".", "",
              "## Pre-specified: each SAE-guided order − its own base order (paired per task)", ""]
    lines += _comparison_table(r["sae_vs_base_over_seeds"], "base_order", kept)
    lines += ["## Post hoc: SAE-guided order − the best confidence order picked on these same tasks", "",
              "The comparator is chosen on the tasks it is then compared on, so these differences favour it.", ""]
    lines += _comparison_table(r["sae_vs_best_confidence_over_seeds"], "best_confidence_order", kept)
    conj = r["conjecture_over_seeds"]
    key = conj["statistic"]
    lines += ["## Feature dynamics vs exact match (G steps, order-sensitive tasks)", "",
              f"Pre-specified statistic `{key}` (a task's mean pre-decode top-{r['spec']['top_k']} Jaccard over its "
              "answer positions), Pearson r with exact match within task groups (both centred per kind/answers "
              "group), per SAE seed; the verdict is sign-agnostic (an interval excluding 0 of either sign counts).",
              "", "| order | " + " | ".join(f"SAE seed {s}" for s in kept) + " | seed min–max |",
              "|---" * (len(kept) + 2) + "|"]
    for o, sp in conj["r_seed_spread"].items():
        lines.append(f"| {o} | " + " | ".join(
            _ci(r["by_sae_seed"][str(s)]["correlations_within_group"][o][key], "+.2f") for s in kept)
            + f" | {_range(sp, '+.2f')} |")
    c0 = r["by_sae_seed"][str(kept[0])]["correlations_within_group"]["low_confidence"][key]
    lines += ["", f"Denominator (e.g. low_confidence, SAE seed {kept[0]}): {c0['denominator']}.", "",
              "Verdict per SAE seed: " + "; ".join(f"seed {s}: {conjecture_words(c)}"
                                                   for s, c in conj["per_seed"].items()) + ".", "",
              f"### Every statistic, SAE seed {seeds[0]}", "",
              "Pearson r between a task's statistic (mean over its answer positions) and its exact match, 95% "
              "bootstrap interval over tasks.", ""]
    keys = sorted({k for c in r["correlations"].values() for k in c})
    for title, table in (("Pooled over task groups:", r["correlations"]),
                         ("Within task groups (statistic and exact match centred per kind/answers group):",
                          r["correlations_within_group"])):
        lines += [title, "", "| order | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for o, c in table.items():
            lines.append(f"| {o} | " + " | ".join(_ci(c.get(k), "+.2f") for k in keys) + " |")
        lines += ["", f"Denominator: {next(iter(table.values()))[keys[0]]['denominator']}.", ""]
    lines += [f"## Per-position statistics (G steps, SAE seed {seeds[0]}), mean over tasks and positions", ""]
    for group in sorted({g for s in r["statistics"].values() for g in s}):
        lines += [f"{group}:", "", "| order | " + " | ".join(f"pre-stability L{L}" for L in LAYERS)
                  + " | " + " | ".join(f"lock L{L}" for L in LAYERS) + " | "
                  + " | ".join(f"post-drift L{L}" for L in LAYERS) + " |", "|---" * (1 + 3 * len(LAYERS)) + "|"]
        for o, s in r["statistics"].items():
            if group in s:
                m = s[group]["mean"]
                lines.append(f"| {o} | " + " | ".join(
                    "n/a" if v is None or v != v else f"{v:.3f}"
                    for name in ("pre_stability", "lock_ratio", "post_drift") for v in m[name]) + " |")
        lines.append("")
    lines += ["## Commits per step at G steps (arith_chain/3, chain3/5)", "",
              "| order | arith_chain/3 | chain3/5 |", "|---|---|---|"]
    for o, by in r["schedules"].items():
        g = by.get("all", {})
        lines.append(f"| {o} | {g.get('arith_chain/3')} | {g.get('chain3/5')} |")
    lines += ["", f"Trace memory: {r.get('bytes_per_state_position_layer', 0)} bytes per (state × position × "
              "layer) (int32 ids + float16 values).", ""]
    return lines


def plot_seeds(r: dict, path: Path) -> Path:
    """Each SAE-guided order − its base order (pre-specified) and − the best confidence order (post hoc), per
    SAE seed (interval over tasks) and over seeds × tasks."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    for ax, (key, title) in zip(axes, (("sae_vs_base_over_seeds", "− own base order (pre-specified)"),
                                       ("sae_vs_best_confidence_over_seeds", "− best confidence order (post hoc)"))):
        labels, y = [], 0
        for o, by in r[key].items():
            for st, c in by.items():
                seeds = list(c["per_seed"].values())
                step = 0.6 / max(1, len(seeds))                 # the pooled row, then one row per seed
                for i, p in enumerate([c] + seeds):
                    d = {k: _num(v) for k, v in p["difference"].items() if k in ("mean", "low", "high")}
                    pooled = i == 0
                    label = None if labels or i > 1 else "over SAE seeds × tasks" if pooled else \
                        "per SAE seed (over tasks)"
                    ax.errorbar(d["mean"], y - 0.3 + step * i, xerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]],
                                fmt="s" if pooled else "o", ms=5 if pooled else 3, color="C3" if pooled else "0.6",
                                capsize=3 if pooled else 2, label=label)
                labels.append(f"{o}\n{_steps_name(st)} steps")
                y += 1
        ax.axvline(0, color="k", lw=0.6)
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("Δ exact match, order-sensitive tasks (95% CI)", fontsize=7)
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=6, loc="outside lower center", ncols=2)
    fig.savefig(path, dpi=110)
    return path


def _in_order(x):
    """``x`` with every dict keyed by orders or step labels put in the job's order (order.json sorts keys)."""
    if isinstance(x, list):
        return [_in_order(v) for v in x]
    if not isinstance(x, dict):
        return x
    rank = {k: i for i, k in enumerate(ORDERS + tuple(STEPS))}
    items = [(k, _in_order(v)) for k, v in x.items()]
    if items and all(k in rank for k, _ in items):
        items.sort(key=lambda kv: rank[kv[0]])
    return dict(items)


def write_outputs(r: dict, root: Path) -> None:
    """order_results.md and the plots from the results (in memory, or read back from order.json)."""
    r = _in_order(r)
    plot_order(r, root / "order")
    plot_seeds(r, root / "order_sae_seeds.png")
    atomic.write_text(root / "order_results.md", "\n".join(tables(r, r["wall_s"])) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(Path(__file__).resolve().parent), help="default: beside this script")
    p.add_argument("--policy", default="mask")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="run seeds (random / origin orders)")
    p.add_argument("--sae-seeds", type=int, default=3, help="SAE init seeds at k = 8 (the first is the k sweep's)")
    p.add_argument("--from-json", action="store_true", help="redraw the tables and plots from --out's order.json")
    a = p.parse_args(argv)
    root = Path(a.out)
    if a.from_json:
        write_outputs(atomic.read_json(root / "order.json"), root)
        return 0
    t0 = time.perf_counter()
    torch.manual_seed(0)
    cfg = dataclasses.replace(DemoConfig(), ks=(8,), k_ref=8, train_tokens=100_000, sentences=30_000,
                              sae_seeds=a.sae_seeds)
    dlm = load_world_model("dlm")
    saes, quality = train_saes(dlm, cfg, a.policy)
    t_train = time.perf_counter() - t0
    tasks, held = load_tasks(Path(ASSETS_DIR) / "tasks.jsonl")
    keep = [i for i, t in enumerate(tasks) if t.kind in SCORED_KINDS]
    spec = OrderSpec(orders=ORDERS, steps=STEPS, seeds=tuple(a.seeds), guide_layer=GUIDE_LAYER, top_k=8)
    # the extra SAE seeds run `random` and `origin` with the first run seed only: their exact match does not
    # depend on the SAE, and the job replays (for the correlations) the first run seed's fills only
    runs = {s: run_order(dlm, saes[s], [tasks[i] for i in keep], [held[i] for i in keep],
                         spec if s == cfg.init_seeds[0] else dataclasses.replace(spec, seeds=spec.seeds[:1]))
            for s in cfg.init_seeds}
    kept = [s for s in cfg.init_seeds if not any(q["failed"] for q in quality[s].values())]
    if not kept:
        raise SystemExit("every SAE seed has a failed SAE; nothing to compare")
    r = runs[cfg.init_seeds[0]]
    r["sae_seeds"] = {
        "k": cfg.k_ref, "init_seeds": list(cfg.init_seeds), "kept": kept, "layers": list(LAYERS),
        "top_level": f"the top-level fields are the run with the SAEs of init seed {cfg.init_seeds[0]}",
        "shared": "the harvest, data order and corruption; only the SAE initialisation differs between seeds",
        "failed_rule": f"more than {MAX_DEAD_FRACTION:.0%} of latents dead on held-out tokens (one k: the FVE-vs-k "
                       "rule does not apply); a seed with a failed SAE is kept out of the over-seed rows",
        "saes": {str(s): {str(L): q for L, q in quality[s].items()} for s in cfg.init_seeds}}
    r["intervals"] = INTERVALS
    r["by_sae_seed"] = {str(s): {
        "accuracy": {o: runs[s]["accuracy"][o] for o in SAE_ORDERS},
        "per_task": {o: runs[s]["per_task"]["correct"][o] for o in SAE_ORDERS + tuple(BASE_ORDER.values())},
        "sae_vs_base": runs[s]["sae_vs_base"], "sae_vs_best_confidence": runs[s]["sae_vs_best_confidence"],
        "correlations_within_group": runs[s]["correlations_within_group"], "conjecture": runs[s]["conjecture"]}
        for s in cfg.init_seeds}
    r["sae_vs_base_over_seeds"] = over_seeds(runs, kept, "sae_vs_base", "base_order")
    r["sae_vs_best_confidence_over_seeds"] = over_seeds(runs, kept, "sae_vs_best_confidence", "best_confidence_order")
    r["conjecture_over_seeds"] = conjecture_over_seeds(runs, kept)
    wall = time.perf_counter() - t0
    r["wall_s"], r["train_s"], r["policy"] = wall, t_train, a.policy
    atomic.write_json(root / "order.json", r)
    write_outputs(r, root)
    print(f"wrote {root}/order.json, order_results.md and the plots in {wall / 60:.1f} min "
          f"(SAE training {t_train / 60:.1f} min)")
    for o, by in r["sae_vs_base_over_seeds"].items():
        for st, c in by.items():
            print(f"{o} − {c['base_order']} at {st}: {_ci(c['difference'], '+.3f')} {c['verdict']} "
                  f"{c['denominator']}")
    print("conjecture per seed:", r["conjecture_over_seeds"]["verdicts"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
