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
Accuracy is exact match (every answer right), averaged over seeds per task, with bootstrap intervals over
tasks; the SAE orders are compared with the best confidence order on the same tasks (paired). At ``all``
steps the runs are replayed with the SAEs (:func:`dlmscope.analysis.order.replay`) for the per-position statistics,
their correlation with accuracy per order (pooled, and within task groups), and the order-sensitive features
against ``low_confidence``.

Dream's schedule commits ``int(n · (1 − s/t))`` per step: at G steps for G = 3 answers that is 0, 1, 2, not
one per step, so Dream's orders at "G steps" are not one answer per step (LLaDA's are).

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
from dlmscope.analysis.order import SAEStabilityGuide, order_sensitive_features, order_statistics, replay
from dlmscope.models.sampling import dream_fill, llada_fill
from dlmscope.sae.topk import TopKSAE
from dlmscope.util.bootstrap import bootstrap_mean, correlation, paired_difference
from dlmscope.world import asset
from dlmscope.world.tasks import SCORED_KINDS, load_tasks
from .options import add_option, out_dir, positive_int
from .plots import SAE_ORDERS, STEPS, plot_order

__all__ = ["ORDERS", "CONFIDENCE_ORDERS", "SAE_ORDERS", "STEPS", "OrderSpec", "task_groups", "fill_with_order",
           "run_order", "add_parser", "run_from_args"]

# SAE_ORDERS and STEPS are defined in .plots, whose figures draw them, and exported from here
CONFIDENCE_ORDERS = ("low_confidence", "maskgit_plus", "topk_margin", "entropy")
ORDERS = ("low_confidence", "random", "left_to_right", "origin", "maskgit_plus", "topk_margin", "entropy") + SAE_ORDERS
#: orders whose result depends on the seed at temperature 0
SEEDED = ("random", "origin")
#: per-task statistics correlated with accuracy (means over the task's answer positions)
STATS = ("pre_stability", "lock_ratio", "post_drift")


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


def _steps(label: str, G: int) -> int:
    return {"one": 1, "half": math.ceil(G / 2), "all": G}[label]


def task_groups(tasks, tokenizer) -> dict[tuple[str, int], list[int]]:
    """Task indices by (kind, number of answers): the rows of one fill share a commit schedule."""
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, t in enumerate(tasks):
        groups[(t.kind, len(t.answer_positions))].append(i)
    return dict(groups)


def fill_with_order(adapter, canvas, order: str, steps: int, *, seed: int = 0, guide_sae=None, guide_layer=None,
                    top_k: int = 8, history: bool = False):
    """One fill of ``canvas`` (rows with the same number ``G`` of masks) under ``order``; None where the order
    cannot run at these steps (``left_to_right`` needs ``steps == G``)."""
    check_choice("order", order, ORDERS)
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
    return dream_fill(adapter, canvas, alg=alg, guide=guide, **kw)


def _canvas_and_targets(tasks, idx, tokenizer):
    enc = [tasks[i].encode(tokenizer) for i in idx]
    answers = torch.tensor([[tgt[p] for p in pos] for _, tgt, pos in enc])
    return [inp for inp, _, _ in enc], answers


def _centred(values, groups) -> list[float]:
    """``values`` minus the (NaN-skipping) mean of their group; NaN stays NaN."""
    v = torch.tensor([float("nan") if x is None else float(x) for x in values], dtype=torch.float64)
    out = v.clone()
    for g in set(groups):
        sel = torch.tensor([gg == g for gg in groups])
        out[sel] = v[sel] - torch.nanmean(v[sel])
    return out.tolist()


def _interval(x) -> dict:
    return asdict(bootstrap_mean(x))


def run_order(adapter, saes: Mapping[int, object], tasks, heldout: Sequence[bool], spec: OrderSpec, *,
              progress: bool = True) -> dict:
    """Accuracy per (order, steps) and per kind, SAE order vs the best confidence order, and at ``all`` steps
    the per-position statistics, their correlation with accuracy, and the order-sensitive features. JSON-able."""
    for o in spec.orders:
        check_choice("order", o, ORDERS)
    for s in spec.steps:
        check_choice("steps", s, STEPS)
    if any(o in SAE_ORDERS for o in spec.orders) and spec.guide_layer not in saes:
        raise ValueError(f"guide_layer {spec.guide_layer} has no SAE; SAEs are at layers {sorted(saes)}")
    tok = adapter.tokenizer
    groups = task_groups(tasks, tok)
    correct: dict = {}          # (order, steps) -> [task] mean exact match over seeds (NaN: not run)
    stats_rows: dict = defaultdict(lambda: defaultdict(list))    # order -> stat/layer -> per task values
    feature_runs: dict = {}     # order -> {group: trace}, at 'all' steps, for order-sensitive features
    per_group_stats: dict = defaultdict(dict)
    jobs = [(o, st) for o in spec.orders for st in spec.steps]
    bar = tqdm(total=len(jobs) * len(groups), desc="decoding orders", unit="fill", disable=not progress)
    for order, steps_label in jobs:
        acc = torch.full((len(tasks),), float("nan"), dtype=torch.float64)
        for (kind, G), idx in groups.items():
            steps = _steps(steps_label, G)
            seeds = spec.seeds if order in SEEDED else spec.seeds[:1]
            for start in range(0, len(idx), spec.batch):
                chunk = idx[start:start + spec.batch]
                canvas, answers = _canvas_and_targets(tasks, chunk, tok)
                scores = []
                for seed in seeds:
                    want_history = steps_label == "all" and seed == seeds[0] and bool(saes) and G > 1
                    gen = fill_with_order(adapter, canvas, order, steps, seed=seed, guide_sae=saes.get(spec.guide_layer),
                                          guide_layer=spec.guide_layer, top_k=spec.top_k, history=want_history)
                    if gen is None:
                        break
                    right = (gen.generated().cpu() == answers).all(1).double()      # [b] exact match
                    scores.append(right)
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
                if scores:
                    acc[chunk] = torch.stack(scores).mean(0)
            bar.update()
        correct[(order, steps_label)] = acc
    bar.close()
    return _summarise(tasks, heldout, groups, correct, stats_rows, per_group_stats, feature_runs, saes, spec)


def _summarise(tasks, heldout, groups, correct, stats_rows, per_group_stats, feature_runs, saes, spec) -> dict:
    kinds = sorted({t.kind for t in tasks})
    held = torch.tensor(list(heldout), dtype=torch.bool)
    multi = torch.tensor([len(t.answer_positions) > 1 for t in tasks])
    kind_of = [t.kind for t in tasks]
    out: dict = {"spec": asdict(spec), "n_tasks": len(tasks), "groups": {f"{k}/{G}": len(v) for (k, G), v in
                                                                          groups.items()},
                 "accuracy": {}, "sae_vs_best_confidence": {}, "statistics": dict(per_group_stats),
                 "correlations": {}, "order_sensitive_features": {}}
    for (order, st), acc in correct.items():
        cell: dict = {}
        for name, sel in (("all", torch.ones_like(multi)), ("order_sensitive", multi), ("heldout", held),
                          ("in_distribution", ~held)):
            vals = acc[sel & ~torch.isnan(acc)]
            cell[name] = _interval(vals) if vals.numel() else None
        cell["by_kind"] = {k: _interval(acc[[i for i, kk in enumerate(kind_of) if kk == k]]) for k in kinds
                           if not torch.isnan(acc[[i for i, kk in enumerate(kind_of) if kk == k]]).all()}
        out["accuracy"].setdefault(order, {})[st] = cell
    # each SAE order against the best confidence order at the same steps, on the order-sensitive tasks (paired)
    for st in spec.steps:
        conf = [o for o in CONFIDENCE_ORDERS if (o, st) in correct]
        if not conf:
            continue
        best = max(conf, key=lambda o: float(torch.nanmean(correct[(o, st)][multi])))
        for o in SAE_ORDERS:
            if (o, st) in correct:
                out["sae_vs_best_confidence"].setdefault(o, {})[st] = {
                    "best_confidence_order": best,
                    "difference": asdict(paired_difference(correct[(best, st)][multi], correct[(o, st)][multi]))}
    # the paper's conjecture: do the feature dynamics track accuracy? (per order, over order-sensitive tasks;
    # pooled, and within task groups — both sides centred per group, so kinds that differ in difficulty and
    # in step count do not make a correlation on their own)
    for order, rows in stats_rows.items():
        groups_of = rows["group"]
        keys = [k for k in rows if k not in ("correct", "group")]
        out["correlations"][order] = {key: asdict(correlation(rows[key], rows["correct"])) for key in keys}
        y = _centred(rows["correct"], groups_of)
        out.setdefault("correlations_within_group", {})[order] = {
            key: asdict(correlation(_centred(rows[key], groups_of), y)) for key in keys}
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
                     top_k=args.top_k)
    result = run_order(adapter, saes, [tasks[i] for i in keep], [heldout[i] for i in keep], spec)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "order.json", result)
    paths = plot_order(result, out / "order")
    for order, by_steps in result["accuracy"].items():
        print(f"{order:>20}: " + ", ".join(f"{st} {c['order_sensitive']['mean']:.2f}" for st, c in by_steps.items()
                                          if c["order_sensitive"]))
    print(f"wrote {out / 'order.json'} and " + ", ".join(p.name for p in paths))
    return 0
