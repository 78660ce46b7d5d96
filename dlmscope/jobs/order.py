"""The ``dlmscope order`` job: decoding orders compared on fill-in tasks with right answers, and their SAE
feature dynamics.

Each world task (:mod:`dlmscope.world.tasks`: arithmetic, two- and three-step chains, counting, facts, Q&A)
is a canvas with its answers masked; every order fills it with the same model at temperature 0 and the same
number of steps, so the orders differ only in *which* masked positions each step commits:

``low_confidence`` / ``random``        LLaDA's remasking (one block)
``left_to_right``                      LLaDA with one-token blocks (strictly left to right; steps = answers)
``origin`` / ``maskgit_plus`` / ``topk_margin`` / ``entropy``   Dream's algorithms
``sae_stable``                         LLaDA's confidence re-ranked by
                                       :class:`~dlmscope.analysis.order.SAEStabilityGuide`
``sae_stable_entropy``                 Dream's entropy re-ranked the same way

Steps per task are ``one`` (everything at once), ``half`` (⌈answers / 2⌉) or ``all`` (one answer per step).

Matched commits. Dream's own schedule commits ``int(n · (1 − t_{s+1}/t_s))`` on ``t = linspace(1, eps, S + 1)``:
at S = n steps the first step's share is ``1 − eps`` < 1, floored to 0, and the last step takes two (``[0, 1, 2]``
for 3 answers); no (S, eps) gives one per step for n ≥ 2. With ``dream_schedule="matched"`` (the default) Dream's
confidence orders run in LLaDA's loop ranked by Dream's measure
(:class:`~dlmscope.analysis.order.DreamConfidence`), so every confidence order commits the same counts per step;
``"dream"`` keeps Dream's schedule. ``origin`` reveals at random (counts differ by row); ``random`` is its
matched twin. ``order.json`` records each run's commit counts (``schedules``).

Comparisons. Pre-specified (:data:`BASE_ORDER`): each SAE-guided order against its own base order
(``sae_stable`` − ``low_confidence``, ``sae_stable_entropy`` − ``entropy``), paired over the order-sensitive
(multi-answer) tasks, seeds crossed where both have several (``sae_vs_base``). The SAE orders against the best
of the confidence orders on the same tasks are kept as ``sae_vs_best_confidence``, marked post hoc (the
comparator is picked on the test data). Accuracy is exact match (every answer right), averaged over seeds per
task, with bootstrap intervals over tasks; per-task correctness per (order, steps, seed) is stored
(``per_task``) for paired tests elsewhere. Every number names its denominator ("over 6 order-sensitive tasks
of 10").

At ``all`` steps the runs are replayed with the SAEs (:func:`dlmscope.analysis.order.replay`) for the
per-position statistics and their correlation with exact match per order over the order-sensitive tasks
(:func:`~dlmscope.analysis.order.group_correlation`: pooled, and within task groups; groups with zero outcome
variance out), reported with sign; the paper's conjecture (no sign) gets a sign-agnostic verdict
(``conjecture``). The order-sensitive features are scored against ``low_confidence``.

The ``dlmscope order`` verb (:func:`add_parser`, :func:`run_from_args`) runs the world's tasks (or a
``tasks.jsonl``) and writes ``order.json`` and the plots.
"""
from __future__ import annotations

import argparse
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from dlmscope import models
from dlmscope.util import atomic
from dlmscope.util.choices import check_choice
from dlmscope.analysis.order import (DreamConfidence, LogitsTap, SAEStabilityGuide, conjecture_verdict,
                                     group_correlation, order_sensitive_features, order_statistics, replay)
from dlmscope.models.sampler_rules import dream_counts, step_counts
from dlmscope.models.sampling import dream_fill, llada_fill
from dlmscope.sae.topk import TopKSAE
from dlmscope.util.bootstrap import bootstrap_mean, paired_difference, side_of_zero
from dlmscope.world import asset
from dlmscope.world.tasks import SCORED_KINDS, load_tasks
from .options import add_option, out_dir, positive_int
from .plots import SAE_ORDERS, STEPS, plot_order

__all__ = ["ORDERS", "CONFIDENCE_ORDERS", "SAE_ORDERS", "STEPS", "BASE_ORDER", "DREAM_SCHEDULES", "OrderSpec",
           "task_groups", "commit_schedule", "fill_with_order", "run_order", "add_parser", "run_from_args"]

# SAE_ORDERS and STEPS are defined in .plots, whose figures draw them, and exported from here
CONFIDENCE_ORDERS = ("low_confidence", "maskgit_plus", "topk_margin", "entropy")
ORDERS = ("low_confidence", "random", "left_to_right", "origin", "maskgit_plus", "topk_margin", "entropy") + SAE_ORDERS
#: the pre-specified comparison of each SAE-guided order: the confidence order it re-ranks
BASE_ORDER = {"sae_stable": "low_confidence", "sae_stable_entropy": "entropy"}
#: Dream's confidence orders: at matched commits (LLaDA's counts per step) or on Dream's own schedule
DREAM_SCHEDULES = ("matched", "dream")
DREAM_CONFIDENCE_ORDERS = ("maskgit_plus", "topk_margin", "entropy", "sae_stable_entropy")
#: orders whose result depends on the seed at temperature 0
SEEDED = ("random", "origin")
#: per-task statistics correlated with accuracy (means over the task's answer positions)
STATS = ("pre_stability", "lock_ratio", "post_drift")
#: Dream's eps (the last timestep), as :func:`dlmscope.models.sampling.dream_fill` defaults
DREAM_EPS = 1e-3


@dataclass
class OrderSpec:
    orders: Sequence[str] = ORDERS
    steps: Sequence[str] = STEPS
    seeds: Sequence[int] = (0, 1, 2)
    #: the SAE layers replayed; the guide reads ``guide_layer`` (one of them)
    guide_layer: int = 4
    #: latents kept per position in the replay and compared by the guide
    top_k: int = 8
    batch: int = 128
    #: "matched": Dream's confidence orders commit LLaDA's counts per step; "dream": Dream's own schedule
    dream_schedule: str = "matched"


def _steps(label: str, G: int) -> int:
    return {"one": 1, "half": math.ceil(G / 2), "all": G}[label]


def task_groups(tasks, tokenizer) -> dict[tuple[str, int], list[int]]:
    """Task indices by (kind, number of answers): the rows of one fill share a commit schedule."""
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, t in enumerate(tasks):
        groups[(t.kind, len(t.answer_positions))].append(i)
    return dict(groups)


def commit_schedule(order: str, G: int, steps: int, dream_schedule: str = "matched") -> list[int] | str | None:
    """Answers committed per step by ``order`` for ``G`` answers in ``steps`` steps; a sentence for
    ``origin`` (random counts per row); None where the order cannot run at these steps."""
    check_choice("order", order, ORDERS)
    check_choice("dream_schedule", dream_schedule, DREAM_SCHEDULES)
    if order == "left_to_right":
        return [1] * G if steps == G else None
    if order == "origin":
        return "random: each masked answer revealed with probability 1 − t_{s+1}/t_s (Dream's origin)"
    if order in DREAM_CONFIDENCE_ORDERS and dream_schedule == "dream":
        return dream_counts(G, steps, DREAM_EPS)
    return step_counts(G, steps)


def fill_with_order(adapter, canvas, order: str, steps: int, *, seed: int = 0, guide_sae=None, guide_layer=None,
                    top_k: int = 8, history: bool = False, dream_schedule: str = "matched"):
    """One fill of ``canvas`` (rows with the same number ``G`` of masks) under ``order``; None where the order
    cannot run at these steps (``left_to_right`` needs ``steps == G``). Dream's confidence orders commit
    :func:`commit_schedule`'s counts (``dream_schedule``)."""
    check_choice("order", order, ORDERS)
    check_choice("dream_schedule", dream_schedule, DREAM_SCHEDULES)
    G = int((torch.as_tensor(canvas[0]) == adapter.mask_token_id).sum())
    guide = None
    if order in SAE_ORDERS:
        if guide_sae is None:
            raise ValueError(f"order {order!r} needs guide_sae (the SAE at guide_layer)")
        guide = SAEStabilityGuide(guide_sae, guide_layer, top_k=min(top_k, guide_sae.k))
    kw = dict(steps=steps, seed=seed, history=history)
    if order in ("low_confidence", "random", "sae_stable"):
        return llada_fill(adapter, canvas, remasking="random" if order == "random" else "low_confidence",
                          guide=guide, **kw)
    if order == "left_to_right":
        return llada_fill(adapter, canvas, block_length=1, **kw) if steps == G else None
    alg = "entropy" if order == "sae_stable_entropy" else order
    if alg != "origin" and dream_schedule == "matched":
        tap = LogitsTap(adapter)
        return llada_fill(tap, canvas, guide=DreamConfidence(tap, alg, then=guide), **kw)
    return dream_fill(adapter, canvas, alg=alg, guide=guide, **kw)


def _canvas_and_targets(tasks, idx, tokenizer):
    enc = [tasks[i].encode(tokenizer) for i in idx]
    answers = torch.tensor([[tgt[p] for p in pos] for _, tgt, pos in enc])
    return [inp for inp, _, _ in enc], answers


def run_order(adapter, saes: Mapping[int, object], tasks, heldout: Sequence[bool], spec: OrderSpec, *,
              progress: bool = True) -> dict:
    """Accuracy per (order, steps) and per kind, each SAE order against its base order (and, post hoc, the
    best confidence order), per-task correctness, and at ``all`` steps the per-position statistics, their
    correlation with exact match, and the order-sensitive features. JSON-able."""
    for o in spec.orders:
        check_choice("order", o, ORDERS)
    for s in spec.steps:
        check_choice("steps", s, STEPS)
    check_choice("dream_schedule", spec.dream_schedule, DREAM_SCHEDULES)
    if any(o in SAE_ORDERS for o in spec.orders) and spec.guide_layer not in saes:
        raise ValueError(f"guide_layer {spec.guide_layer} has no SAE; SAEs are at layers {sorted(saes)}")
    tok = adapter.tokenizer
    groups = task_groups(tasks, tok)
    correct: dict = {}          # (order, steps) -> [seeds run, task] exact match (NaN: not run)
    schedules: dict = defaultdict(dict)     # order -> steps -> group -> commit counts
    stats_rows: dict = defaultdict(lambda: defaultdict(list))    # order -> stat/layer -> per task values
    feature_runs: dict = {}     # order -> {group: trace}, at 'all' steps, for order-sensitive features
    per_group_stats: dict = defaultdict(dict)
    jobs = [(o, st) for o in spec.orders for st in spec.steps]
    bar = tqdm(total=len(jobs) * len(groups), desc="decoding orders", unit="fill", disable=not progress)
    for order, steps_label in jobs:
        seeds = list(spec.seeds if order in SEEDED else spec.seeds[:1])
        acc = torch.full((len(seeds), len(tasks)), float("nan"), dtype=torch.float64)
        for (kind, G), idx in groups.items():
            steps = _steps(steps_label, G)
            schedules[order].setdefault(steps_label, {})[f"{kind}/{G}"] = commit_schedule(
                order, G, steps, spec.dream_schedule)
            for start in range(0, len(idx), spec.batch):
                chunk = idx[start:start + spec.batch]
                canvas, answers = _canvas_and_targets(tasks, chunk, tok)
                for si, seed in enumerate(seeds):
                    want_history = steps_label == "all" and si == 0 and bool(saes) and G > 1
                    gen = fill_with_order(adapter, canvas, order, steps, seed=seed,
                                          guide_sae=saes.get(spec.guide_layer), guide_layer=spec.guide_layer,
                                          top_k=spec.top_k, history=want_history,
                                          dream_schedule=spec.dream_schedule)
                    if gen is None:
                        break
                    right = (gen.generated().cpu() == answers).all(1).double()      # [b] exact match
                    acc[si, chunk] = right
                    if want_history:
                        trace = replay(adapter, gen, saes, top_k=spec.top_k)
                        st = order_statistics(trace)
                        for name in STATS:
                            for li, L in enumerate(st.layers):
                                stats_rows[order][f"{name}/{L}"].extend(
                                    torch.nanmean(getattr(st, name)[li], dim=1).tolist())
                        stats_rows[order]["correct"].extend(right.tolist())
                        stats_rows[order]["group"].extend([f"{kind}/{G}"] * len(chunk))
                        if start == 0:
                            per_group_stats[order][f"{kind}/{G}"] = st.as_dict()
                            feature_runs.setdefault(order, {})[f"{kind}/{G}"] = trace
            bar.update()
        correct[(order, steps_label)] = (seeds, acc)
    bar.close()
    out = _summarise(tasks, heldout, groups, correct, stats_rows, per_group_stats, feature_runs, saes, spec)
    out["schedules"] = dict(schedules)
    return out


def _accuracy_cell(acc: torch.Tensor, sel: torch.Tensor, label: str, n_total: int) -> dict | None:
    """Exact match over the tasks ``sel`` that ran (seed means per task), bootstrap over tasks."""
    per_task = acc.nanmean(0) if acc.shape[0] > 1 else acc[0]
    vals = per_task[sel & ~torch.isnan(per_task)]
    if not vals.numel():
        return None
    seeds = f", mean of {acc.shape[0]} seeds per task" if acc.shape[0] > 1 else ""
    return asdict(bootstrap_mean(vals, unit="tasks")) | {
        "denominator": f"over {vals.numel()} {label}tasks of {n_total}{seeds}"}


def _paired_vs(before, after, sel: torch.Tensor) -> dict | None:
    """``after − before`` over the tasks ``sel`` both ran, paired by task; seeds crossed (paired by seed index,
    a one-seed side repeated) where either side has several."""
    (_, b), (_, a) = before, after
    b, a = b[:, sel], a[:, sel]
    if b.shape[0] != a.shape[0]:
        if min(b.shape[0], a.shape[0]) != 1:
            b, a = b.nanmean(0, keepdim=True), a.nanmean(0, keepdim=True)
        else:
            S = max(b.shape[0], a.shape[0])
            b, a = b.expand(S, -1), a.expand(S, -1)
    ran = ~(torch.isnan(b).all(0) | torch.isnan(a).all(0))
    b, a = b[:, ran], a[:, ran]
    if not b.shape[1]:
        return None
    if b.shape[0] > 1:
        iv = paired_difference(b, a, axes=("seeds", "tasks"))
    else:
        iv = paired_difference(b[0], a[0], unit="tasks")
    verdict = side_of_zero(iv, "better", "worse", "tie")
    seeds = f" × {b.shape[0]} seeds" if b.shape[0] > 1 else ""
    return {"difference": asdict(iv), "verdict": verdict, "n_tasks": int(b.shape[1]),
            "denominator": f"over {b.shape[1]} order-sensitive tasks{seeds}"}


def _per_task(tasks, heldout, correct) -> dict:
    """Exact match per (order, steps, seed) and task (null: not run), with each task's kind, answers and split."""
    rows: dict = {}
    for (order, st), (seeds, acc) in correct.items():
        rows.setdefault(order, {})[st] = {str(seed): [None if v != v else v for v in acc[si].tolist()]
                                          for si, seed in enumerate(seeds)}
    return {"kind": [t.kind for t in tasks], "answers": [len(t.answer_positions) for t in tasks],
            "heldout": [bool(h) for h in heldout], "correct": rows}


def _summarise(tasks, heldout, groups, correct, stats_rows, per_group_stats, feature_runs, saes, spec) -> dict:
    N = len(tasks)
    kinds = sorted({t.kind for t in tasks})
    held = torch.tensor(list(heldout), dtype=torch.bool)
    multi = torch.tensor([len(t.answer_positions) > 1 for t in tasks])
    kind_of = [t.kind for t in tasks]
    n_multi = int(multi.sum())
    out: dict = {"spec": asdict(spec), "n_tasks": N, "n_order_sensitive": n_multi,
                 "groups": {f"{k}/{G}": len(v) for (k, G), v in groups.items()},
                 "accuracy": {}, "sae_vs_base": {}, "sae_vs_best_confidence": {}, "statistics": dict(per_group_stats),
                 "correlations": {}, "correlations_within_group": {}, "order_sensitive_features": {}}
    for (order, st), (_, acc) in correct.items():
        cell: dict = {}
        for name, sel, label in (("all", torch.ones_like(multi), ""),
                                 ("order_sensitive", multi, "order-sensitive (multi-answer) "),
                                 ("heldout", held, "held-out "), ("in_distribution", ~held, "in-distribution ")):
            cell[name] = _accuracy_cell(acc, sel, label, N)
        by_kind = {k: _accuracy_cell(acc, torch.tensor([kk == k for kk in kind_of]), f"{k} ", N) for k in kinds}
        cell["by_kind"] = {k: c for k, c in by_kind.items() if c is not None}
        out["accuracy"].setdefault(order, {})[st] = cell
    # pre-specified: each SAE order against the confidence order it re-ranks, same tasks and steps (paired)
    for o, base in BASE_ORDER.items():
        for st in spec.steps:
            if (o, st) in correct and (base, st) in correct:
                cmp = _paired_vs(correct[(base, st)], correct[(o, st)], multi)
                if cmp is not None:
                    out["sae_vs_base"].setdefault(o, {})[st] = {"base_order": base, "pre_specified": True} | cmp
    # post hoc: against the best confidence order on these same tasks (the comparator is picked on the test data)
    for st in spec.steps:
        conf = [o for o in CONFIDENCE_ORDERS if (o, st) in correct]
        if not conf:
            continue
        best = max(conf, key=lambda o: float(torch.nanmean(correct[(o, st)][1][:, multi])))
        for o in SAE_ORDERS:
            if (o, st) in correct:
                cmp = _paired_vs(correct[(best, st)], correct[(o, st)], multi)
                if cmp is not None:
                    out["sae_vs_best_confidence"].setdefault(o, {})[st] = {
                        "best_confidence_order": best, "post_hoc": True} | cmp
    out["per_task"] = _per_task(tasks, heldout, correct)
    # the paper's conjecture: do the feature dynamics track accuracy? Per order, over the order-sensitive tasks
    # replayed at 'all' steps; pooled, and within task groups (kinds that differ in difficulty and step count do
    # not make a correlation on their own); groups whose exact match does not vary out of r
    for order, rows in stats_rows.items():
        keys = [k for k in rows if k not in ("correct", "group")]
        for name, within in (("correlations", False), ("correlations_within_group", True)):
            units = "order-sensitive tasks replayed at 'all' steps"  # group_correlation adds "of <replayed>"
            out[name][order] = {key: group_correlation(rows[key], rows["correct"], rows["group"], within=within,
                                                       units=units) for key in keys}
    layers = sorted({int(k.split("/")[1]) for c in out["correlations_within_group"].values() for k in c})
    if layers:
        L = spec.guide_layer if spec.guide_layer in layers else layers[0]
        key = f"pre_stability/{L}"
        out["conjecture"] = {"statistic": key, "scope": "within task groups"} | conjecture_verdict(
            {o: c[key] for o, c in out["correlations_within_group"].items() if key in c})
    ref = feature_runs.get("low_confidence", {})
    n_latents = max((s.n for s in saes.values()), default=0)
    for order, traces in feature_runs.items():
        if order == "low_confidence":
            continue
        for group, trace in traces.items():
            if group in ref and ref[group].ids.shape[1:4] == trace.ids.shape[1:4]:
                out["order_sensitive_features"].setdefault(order, {})[group] = {
                    str(L): top for L, top in order_sensitive_features(ref[group], trace, n_latents).items()}
    any_trace = next((t for traces in feature_runs.values() for t in traces.values()), None)
    if any_trace is not None:
        out["bytes_per_state_position_layer"] = any_trace.bytes_per_cell
    return out


# ------------------------------------------------------------------------------------------------- the verb
def add_parser(subparsers) -> argparse.ArgumentParser:
    """``dlmscope order``: decoding orders on fill-in tasks, replayed with SAEs."""
    o = subparsers.add_parser("order", help="decoding orders on fill-in tasks: accuracy, SAE feature dynamics, an "
                                            "SAE-guided order; JSON + plots")
    add_option(o, "--model", help="a masked DLM (LLaDA / Dream format)")
    o.add_argument("--sae", nargs="+", required=True, metavar="LAYER=DIR", help="SAEs to replay with, per layer")
    o.add_argument("--tasks", default=None, help="a tasks.jsonl (default: the embedded world's)")
    o.add_argument("--kinds", nargs="+", default=None, help="task kinds to use (default: every scored kind)")
    o.add_argument("--max-tasks", type=positive_int, default=None)
    o.add_argument("--orders", nargs="+", default=list(ORDERS), help=" | ".join(ORDERS))
    o.add_argument("--steps", nargs="+", default=list(STEPS), help="one | half | all (of the answers per step)")
    o.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    o.add_argument("--guide-layer", type=int, default=4, help="the layer the SAE-guided orders read")
    o.add_argument("--top-k", type=positive_int, default=8, help="latents kept per position (replay and guide)")
    o.add_argument("--dream-schedule", default="matched", help="matched (Dream's confidence orders commit LLaDA's "
                   "counts per step) | dream (Dream's own schedule, which commits nothing at the first of G steps)")
    add_option(o, "--out")
    o.set_defaults(func=run_from_args)
    return o


def _layer_saes(specs: list[str]) -> dict[int, TopKSAE]:
    """``["2=DIR", "4=DIR"]`` -> ``{2: sae, 4: sae}``."""
    out = {}
    for spec in specs:
        layer, sep, path = spec.partition("=")
        if not sep or not layer.strip().isdigit():
            raise ValueError(f"--sae takes LAYER=DIR, got {spec!r}")
        out[int(layer)] = TopKSAE.load(path)
    return out


def run_from_args(args: argparse.Namespace) -> int:
    """Run the orders on the chosen tasks; write ``order.json`` and the plots under ``--out``."""
    out = out_dir(args.out)
    for order in args.orders:
        check_choice("--orders", order, ORDERS)
    for steps in args.steps:
        check_choice("--steps", steps, STEPS)
    check_choice("--dream-schedule", args.dream_schedule, DREAM_SCHEDULES)
    adapter = models.load(args.model)
    adapter.require_mask_token()
    saes = _layer_saes(args.sae)
    adapter.check_layers(list(saes))
    tasks, heldout = load_tasks(args.tasks or asset("tasks.jsonl"))
    kinds = args.kinds or list(SCORED_KINDS)
    keep = [i for i, t in enumerate(tasks) if t.kind in kinds][: args.max_tasks]
    if not keep:
        raise ValueError(f"no tasks of kinds {kinds} in {args.tasks or 'the world tasks'}")
    spec = OrderSpec(orders=args.orders, steps=args.steps, seeds=args.seeds, guide_layer=args.guide_layer,
                     top_k=args.top_k, dream_schedule=args.dream_schedule)
    result = run_order(adapter, saes, [tasks[i] for i in keep], [heldout[i] for i in keep], spec)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "order.json", result)
    paths = plot_order(result, out / "order")
    for order, by_steps in result["accuracy"].items():
        print(f"{order:>20}: " + ", ".join(f"{st} {c['order_sensitive']['mean']:.2f}" for st, c in by_steps.items()
                                          if c["order_sensitive"]))
    for o, by_steps in result["sae_vs_base"].items():
        print(f"{o} − {BASE_ORDER[o]} (pre-specified): " + "; ".join(
            f"{st} {c['difference']['mean']:+.3f} [{c['difference']['low']:+.3f}, {c['difference']['high']:+.3f}] "
            f"{c['verdict']} {c['denominator']}" for st, c in by_steps.items()))
    if "conjecture" in result:
        print(f"conjecture ({result['conjecture']['statistic']}, within groups): {result['conjecture']['text']}")
    print(f"wrote {out / 'order.json'} and " + ", ".join(p.name for p in paths))
    return 0
