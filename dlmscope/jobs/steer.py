"""The ``dlmscope steer`` job: a sweep of steering scores over α × scope × schedule for some features, with
controls, written as JSON and plots.

Each (scope, schedule, α) reports the concept-rate change, the paper's score and a composite with a robust
(log-ratio) fluency term, a random-latent and a random-direction control at the same α (the same intervention
norm: ``‖α·m(h)·v‖ / ‖h‖`` is reported), the controlled effect (steered − control) and, per condition, the best
gain at matched fluency (median perplexity ratio ≤ 2). Numbers pooled over features have intervals over
features × prompts; a feature's own over prompts (:mod:`dlmscope.analysis.steering_stats`). Two models are
compared by :func:`compare_models` with a pre-specified verdict.

Features are explicit latent ids (judged for one ``concept``) or, on the embedded world, the best latent of each
planted concept (:mod:`dlmscope.interp.concepts`, chosen on held-out world text at the steered layer). Prompts are the
world's neutral prompts or a text file (one prompt per line). The sampler's settings are the same for the
baseline and every steered run, and so is the seed: the baseline is generated once and every steered run is
compared with it prompt by prompt.

The ``dlmscope steer`` verb (:func:`add_parser`, :func:`run_from_args`) runs one sweep, and optionally the same
concepts on a second model (e.g. the AR twin), and writes ``steer.json``, ``steer.png`` and ``tradeoff.png``
(with a second model: ``steer_compare.json``, its sweep and the ``comparison``). ``fluency`` says which model
judged fluency and whether it is neither twin.
"""
from __future__ import annotations

import argparse
import functools
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from dlmscope import models
from dlmscope.interp.concepts import labelled_activations, score_concepts
from dlmscope.interp.judges import PlantedJudge
from dlmscope.models.sampling import ar_generate, dream_generate, llada_generate
from dlmscope.sae.topk import TopKSAE
from dlmscope.util import atomic
from dlmscope.util.choices import check_choice
from dlmscope.analysis import steering_stats as stats
from dlmscope.analysis.steering import control_runs, steering_baseline, steering_score
from dlmscope.world import ASSETS_DIR, CONCEPTS, LM_BATCH, SEQ_LEN, asset, concept_id_table, world_batches
from dlmscope.world.tasks import load_tasks
from .options import add_option, load_model_layer_sae, out_dir
from .plots import condition_label, plot_sweep, plot_tradeoff

__all__ = ["SteerSpec", "neutral_prompts", "concept_features", "run_steer", "summarise", "condition_label",
           "summary_row", "concept_deltas", "condition_cells", "compare_models", "without_per_prompt", "fluency_reference", "add_parser",
           "run_from_args"]


@dataclass
class SteerSpec:
    """One steering sweep: every (scope, schedule) × α, on one layer, the same sampler and seed throughout."""

    layer: int
    alphas: Sequence[float]
    sampler: str = "llada"
    gen_length: int = 8
    steps: int = 8
    temperature: float = 0.7
    scopes: Sequence = ("all",)
    schedules: Sequence = ("all",)
    strength: str = "max_act"
    seed: int = 0
    extra: dict = field(default_factory=dict)
    #: the control runs at each (condition, α) (:data:`dlmscope.analysis.steering_stats.CONTROLS`)
    controls: Sequence[str] = stats.CONTROLS
    #: random latents / directions drawn per control kind (their judgements are averaged per prompt)
    control_draws: int = 1
    #: matched fluency: the largest median perplexity ratio an α may have to count as fluent
    max_ppl_ratio: float = stats.MAX_PPL_RATIO


def neutral_prompts(tokenizer, n: int, path: str | None = None) -> list[list[int]]:
    """``n`` prompts as token ids (``[BOS]`` + words): the lines of ``path``, or the world's neutral prompts
    (``tasks.jsonl``, the words before the open slot)."""
    if path:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
        texts = lines[:n]
    else:
        tasks, _ = load_tasks(asset("tasks.jsonl"))
        texts = [" ".join(t.words[:t.answer_positions[0]]) for t in tasks if t.kind == "neutral"]
        texts = texts[:n]
    if not texts:
        raise ValueError(f"no prompts found in {path or 'the world tasks'}")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def concept_features(adapter, sae, layer: int, concepts: Sequence[str], *, sentences: int = 20_000,
                     batches: int = 8, seq_len: int = SEQ_LEN, lm_batch: int = LM_BATCH, seed: int = 0
                     ) -> dict[str, int]:
    """The best latent of each planted concept at ``layer``: chosen on one half of the first ``batches`` held-out
    world batches ``[lm_batch, seq_len]`` (of ``sentences`` drawn with ``seed``), as the demo's concept scores
    are (see :func:`dlmscope.interp.concepts.score_concepts`)."""
    names, table = concept_id_table(adapter.tokenizer)
    bad = [c for c in concepts if c not in names]
    if bad:
        raise ValueError(f"unknown planted concept(s) {bad}; expected some of {names}")
    _, held = world_batches(adapter.tokenizer, sentences, seq_len, lm_batch, seed)
    held = held[:batches]
    choose = labelled_activations(adapter, held[0::2], layer, table, "clean")
    scores = score_concepts(sae, *labelled_activations(adapter, held[1::2], layer, table, "clean"), names,
                            select_on=choose)
    return {c: scores.best_latent[names.index(c)] for c in concepts}


def _generator(spec: SteerSpec):
    if spec.sampler == "llada":
        return functools.partial(llada_generate, gen_length=spec.gen_length, steps=spec.steps,
                                 temperature=spec.temperature, **spec.extra)
    if spec.sampler == "dream":
        return functools.partial(dream_generate, max_new_tokens=spec.gen_length, steps=spec.steps,
                                 temperature=spec.temperature, **spec.extra)
    if spec.sampler == "ar":
        return functools.partial(ar_generate, max_new_tokens=spec.gen_length, temperature=spec.temperature)
    raise ValueError(f"unknown sampler {spec.sampler!r}; expected 'llada', 'dream' or 'ar'")


def _conditions(spec: SteerSpec) -> list[tuple]:
    return [(scope, schedule) for scope in spec.scopes for schedule in spec.schedules]


def summarise(sweeps: Sequence[list[dict]], *, concepts: Sequence[str] | None = None, threshold: float = 0.1,
              max_ppl_ratio: float = stats.MAX_PPL_RATIO, seed: int = 0) -> dict:
    """Across features (each a list of runs over the same prompts, one per condition and α, in the same order;
    ``concepts``: each feature's concept, which names the features axis): one row per run index
    (:func:`dlmscope.analysis.steering_stats.summarise_condition`: intervals over features × prompts for the
    pooled numbers, over prompts per feature) and the best gain at matched fluency per condition."""
    concepts = list(concepts) if concepts is not None else [str(i) for i in range(len(sweeps))]
    rows = [stats.summarise_condition(runs, concepts, threshold=threshold, seed=seed) for runs in zip(*sweeps)]
    return {"threshold": threshold, "rows": rows, "unit": f"{stats.feature_axis(concepts)} × prompts",
            "composite": f"ΔC − {stats.FLUENCY_WEIGHT} · log(P_after / P_before) per (feature, prompt) cell",
            "score_mean": "the paper's score, ΔC̄ + 0.3 · (P̄_before − P̄_after) / P̄_before per feature, averaged",
            "matched_fluency": stats.matched_fluency(rows, max_ratio=max_ppl_ratio)}


def fluency_reference(ref_lm, adapter, independent: bool | None = None, why: str | None = None,
                      name: str | None = None) -> dict:
    """What judges fluency: the reference LM (``name``, default its source) and whether it is independent of the
    steered models (neither the steered model nor its twin); ``why`` says how that is known, or why no independent
    one. Give ``name`` where the output is published: the source is a path on the machine that ran it."""
    if ref_lm is adapter or getattr(ref_lm, "source", None) == getattr(adapter, "source", object()):
        independent, why = False, "the reference LM is the steered model itself"
    return {"model": name or getattr(ref_lm, "source", repr(ref_lm)), "independent": independent,
            "why": why or "not stated by the caller"}


def run_steer(adapter, sae, prompts, features: Sequence[tuple[str, int]], spec: SteerSpec, ref_lm,
              judge=None, *, keep_generations: int | None = None, progress: bool = True,
              reference: dict | None = None) -> dict:
    """``{"spec", "n_prompts", "fluency", "features": {"concept/latent": {"concept", "feature", "sweep": [one run
    per (scope, schedule, α): SteeringResult as a dict, its interval over prompts "concept_delta" and its
    controls' per-prompt scores "controls"]}}, "controls", "summary"}``.
    ``features`` lists (the concept a latent is judged on, the latent id); the unsteered baseline runs once, and
    each control of ``spec.controls`` once per (condition, α), judged for every feature's concept.
    ``judge`` defaults to the planted judge of the world's concepts. ``reference``: :func:`fluency_reference` of
    ``ref_lm`` (default: unknown unless ``ref_lm`` is the steered model). ``keep_generations`` trims the stored
    texts (the means and intervals use all of them)."""
    adapter.check_layer(spec.layer)
    judge = judge or PlantedJudge(concepts=CONCEPTS)
    if isinstance(judge, PlantedJudge):  # an unknown concept fails here, not after the first generations
        for concept, _ in features:
            check_choice("planted concept", concept, sorted(judge.vocab), valid="concepts")
    for kind in spec.controls:
        check_choice("control", kind, stats.CONTROLS)
    generate = _generator(spec)
    conditions = _conditions(spec)
    out = {"spec": asdict(spec) | {"scopes": [repr(s) if not isinstance(s, str) else s for s in spec.scopes],
                                   "schedules": [repr(s) for s in spec.schedules]},
           "n_prompts": len(prompts), "fluency": reference or fluency_reference(ref_lm, adapter), "features": {}}
    baseline = steering_baseline(adapter, prompts, generate, spec.gen_length, ref_lm, seed=spec.seed)
    bar = tqdm(total=len(conditions) * len(spec.alphas) * (len(features) + len(spec.controls)),
               desc=f"steer layer {spec.layer}", unit="run",
               disable=not progress)
    cells = [(s, sc, a) for s, sc in conditions for a in spec.alphas]
    controls = control_runs(adapter, sae, prompts, generate, spec.gen_length, spec.layer, cells, ref_lm, baseline,
                            kinds=spec.controls, draws=spec.control_draws, exclude={f for _, f in features},
                            seed=spec.seed, strength=spec.strength, on_run=bar.update)
    keep = slice(None) if keep_generations is None else slice(keep_generations)
    out["controls"] = {"kinds": list(spec.controls), "draws": spec.control_draws, "latents": controls["latents"],
                       "latent_pool": controls["pool"], "runs": [
        {"scope": scope if isinstance(scope, str) else repr(scope), "schedule": schedule, "alpha": a}
        | {kind: ({"norm_ratio": stats.nanmean(r for _, _, r in d), "generations_after": d[0][0][keep]}
                  if isinstance(d, list) else {"skipped": d}) for kind, d in cell.items()}
        for (scope, schedule, a), cell in zip(cells, controls["runs"])]}
    for concept, f in features:
        sweep = []
        for i, (scope, schedule, a) in enumerate(cells):
            r = steering_score(adapter, prompts, generate, spec.gen_length, spec.layer, sae, f, a, concept,
                               judge, ref_lm, seed=spec.seed, baseline=baseline, scope=scope,
                               schedule=schedule, strength=spec.strength)
            run = {"scope": scope if isinstance(scope, str) else repr(scope),
                   "schedule": repr(schedule) if callable(schedule) else schedule,
                   "alpha": a} | asdict(r)
            run["concept_delta"] = asdict(stats.per_feature(r.concepts_before, r.concepts_after, seed=spec.seed))
            run["controls"] = {kind: stats.judged_control(d, judge, concept)
                               for kind, d in controls["runs"][i].items() if isinstance(d, list)}
            run["generations_before"] = run["generations_before"][keep]
            run["generations_after"] = run["generations_after"][keep]
            sweep.append(run)
            bar.update()
        out["features"][f"{concept}/{f}"] = {"concept": concept, "feature": f, "sweep": sweep}
    bar.close()
    out["summary"] = summarise([e["sweep"] for e in out["features"].values()], concepts=[c for c, _ in features],
                               max_ppl_ratio=spec.max_ppl_ratio, seed=spec.seed)
    return out


def _matches(run: dict, alpha: float, scope, schedule) -> bool:
    return (run["alpha"] == alpha and run["scope"] == scope
            and condition_label(run["scope"], run["schedule"]) == condition_label(scope, schedule))


def summary_row(result: dict, alpha: float, scope="all", schedule="all") -> dict:
    """The summary row of one (scope, schedule, α) of a :func:`run_steer` result."""
    return next(r for r in result["summary"]["rows"] if _matches(r, alpha, scope, schedule))


def _runs_at(result: dict, alpha: float, scope, schedule) -> list[dict]:
    return [next(r for r in e["sweep"] if _matches(r, alpha, scope, schedule)) for e in result["features"].values()]


def concept_deltas(result: dict, alpha: float, scope="all", schedule="all") -> list[list]:
    """``[feature, prompt]``: the concept-rate change of each feature's run at (scope, schedule, α); NaN
    where a judgement failed."""
    runs = _runs_at(result, alpha, scope, schedule)
    return stats.cell_deltas([r["concepts_before"] for r in runs], [r["concepts_after"] for r in runs])


def condition_cells(result: dict, alpha: float, scope="all", schedule="all") -> dict:
    """``{"steered", "composite", <control kind>...}``: the ``[feature, prompt]`` cells of one model's sweep at
    (scope, schedule, α) — the concept-rate change, the log-ratio composite, and per control kind the change minus
    the control's (the controlled effect) — that :func:`compare_models` differences."""
    runs = _runs_at(result, alpha, scope, schedule)
    before = [r["concepts_before"] for r in runs]
    steered = stats.cell_deltas(before, [r["concepts_after"] for r in runs])
    out = {"steered": steered, "composite": stats.composite_cells(
        before, [r["concepts_after"] for r in runs], [r["ppls_before"] for r in runs], [r["ppls_after"] for r in runs])}
    for kind in runs[0].get("controls", {}):
        control = stats.cell_deltas(before, [r["controls"][kind]["concepts_after"] for r in runs])
        out[kind] = stats.difference_cells(steered, control)
    return out


def compare_models(result: dict, other: dict, alpha: float, other_alpha: float | None = None, *, scope="all",
                   schedule="all", names: tuple[str, str] = ("DLM", "AR"), seed: int = 0) -> dict:
    """``result`` (at ``alpha``) against ``other`` (at ``other_alpha``, default the same: matched α) at one
    (scope, schedule), on the same concepts and prompts (e.g. a DLM and its AR twin); every interval is of the
    difference (result − other), resampled over concepts × prompts, each cell paired by concept and prompt.

    ``mean/low/high/n/over`` and ``verdict``: the controlled effect (steered − random-latent control change);
    ``controlled`` per control kind; ``concept_delta`` uncontrolled; ``composite`` the log-ratio composite with
    ``composite_verdict``; ``score_paper`` the paper's score of each side; ``norm_ratio`` each side's
    ``‖α·m(h)·v‖ / ‖h‖``. The rule is fixed before any data (:data:`~dlmscope.analysis.steering_stats.VERDICT_RULE`):
    ``names[0]`` if the interval lies above 0, ``names[1]`` if below, else ``"no difference"``; ``verdict`` is
    None without control runs (every effect needs a control)."""
    a2 = alpha if other_alpha is None else other_alpha
    concepts = [e["concept"] for e in result["features"].values()]
    if concepts != [e["concept"] for e in other["features"].values()]:
        raise ValueError(f"the runs steer different concepts: {concepts} vs "
                         f"{[e['concept'] for e in other['features'].values()]}")
    axis = stats.feature_axis(concepts)
    cm, ct = condition_cells(result, alpha, scope, schedule), condition_cells(other, a2, scope, schedule)
    diff = {k: stats.crossed(stats.difference_cells(cm[k], ct[k]), axis, seed=seed) for k in cm if k in ct}
    controlled = {k: v for k, v in diff.items() if k in stats.CONTROLS}
    top = diff.get(stats.PRIMARY_CONTROL)
    mine, theirs = _runs_at(result, alpha, scope, schedule), _runs_at(other, a2, scope, schedule)
    paper = [stats.nanmean(r["score"] for r in rs) for rs in (mine, theirs)]
    norms = [stats.nanmean(r.get("norm_ratio") for r in rs) for rs in (mine, theirs)]
    return dict(top or diff["steered"]) | {
        "scope": scope, "schedule": schedule, "alpha": alpha, "other_alpha": a2, "names": list(names),
        "effect": (f"controlled: steered − {stats.PRIMARY_CONTROL} control concept-rate change" if top else
                   "uncontrolled concept-rate change (no control runs)"),
        "verdict": stats.verdict(top, names), "rule": stats.VERDICT_RULE, "controlled": controlled,
        "concept_delta": diff["steered"], "composite": diff["composite"],
        "composite_verdict": stats.verdict(diff["composite"], names),
        "score_paper": {names[0]: paper[0], names[1]: paper[1], "difference": paper[0] - paper[1]},
        "norm_ratio": {names[0]: norms[0], names[1]: norms[1]}}


PER_PROMPT = ("concepts_before", "concepts_after", "ppls_before", "ppls_after")


def without_per_prompt(result: dict) -> dict:
    """A copy of a :func:`run_steer` result without the per-prompt lists (for storing: the means, intervals
    and summary stay; :func:`concept_deltas` and :func:`compare_models` need the full result)."""
    out = dict(result, features={})
    for key, entry in result["features"].items():
        out["features"][key] = dict(entry, sweep=[
            {k: v for k, v in run.items() if k not in PER_PROMPT}
            | ({"controls": {kind: {k: v for k, v in c.items() if k not in PER_PROMPT}
                             for kind, c in run["controls"].items()}} if "controls" in run else {})
            for run in entry["sweep"]])
    return out


# ------------------------------------------------------------------------------------------------- the verb
def add_parser(subparsers) -> argparse.ArgumentParser:
    """``dlmscope steer``: an α × scope × schedule sweep of some features, judged, JSON and plots."""
    s = subparsers.add_parser("steer", help="steer SAE features during generation: an α sweep, judged, JSON + plot")
    add_option(s, "--model", help="the model to steer (a DLM for llada/dream, AR for ar)")
    add_option(s, "--sae")
    add_option(s, "--layer")
    s.add_argument("--features", type=int, nargs="+", default=None, help="latent ids (with --judge-concept)")
    s.add_argument("--judge-concept", default=None, help="planted concept the --features runs are judged on")
    s.add_argument("--concepts", nargs="+", default=None, help="planted concepts: steer each one's best latent")
    s.add_argument("--alpha", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    s.add_argument("--scope", nargs="+", default=["all"],
                   help="all | generation | masked | decoded | top_active (several: each is swept)")
    s.add_argument("--schedule", nargs="+", default=["all"],
                   help="all | first:FRAC | last:FRAC | step indices 0,3,5 (several: each is swept)")
    s.add_argument("--sampler", default="llada", help="llada | dream | ar")
    s.add_argument("--gen-length", type=int, default=8)
    s.add_argument("--steps", type=int, default=8)
    s.add_argument("--temperature", type=float, default=0.7)
    s.add_argument("--prompts", default=None, help="a text file, one prompt per line (default: the world's)")
    s.add_argument("--n-prompts", type=int, default=20)
    s.add_argument("--ref-model", default=None,
                   help="causal LM for perplexity, ideally neither twin (default: the world's AR twin)")
    s.add_argument("--controls", nargs="*", default=list(stats.CONTROLS),
                   help="control runs at each condition and α: random_latent random_direction (none: no controls)")
    s.add_argument("--control-draws", type=int, default=1, help="random latents / directions per control")
    s.add_argument("--compare-model", default=None,
                   help="a second model (e.g. the AR twin) steered on the same concepts and prompts")
    s.add_argument("--compare-sae", default=None, help="the SAE of --compare-model at the same layer")
    s.add_argument("--compare-sampler", default=None, help="its sampler (default: ar for a causal model)")
    s.add_argument("--compare-alpha", type=float, nargs="+", default=None,
                   help="its α values (default: the same, i.e. matched α)")
    add_option(s, "--seed")
    add_option(s, "--out")
    s.set_defaults(func=run_from_args)
    return s


def _schedule_arg(text: str):
    """``all``, ``first:0.1``, ``last:0.5`` or ``0,3,5`` (step indices)."""
    if text == "all":
        return "all"
    which, _, frac = text.partition(":")
    if which in ("first", "last") and frac:
        return (which, float(frac))
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--schedule must be all, first:FRAC, last:FRAC or step indices like 0,3,5; got {text!r}")


def _features_from_args(adapter, sae, layer, args) -> list[tuple[str, int]]:
    if args.features:
        if not args.judge_concept:
            raise ValueError("--features needs --judge-concept (the planted concept the generations are judged on)")
        return [(args.judge_concept, f) for f in args.features]
    if args.concepts:
        return list(concept_features(adapter, sae, layer, args.concepts, seed=args.seed).items())
    raise ValueError("give --features (latent ids) or --concepts (planted concepts)")


def _ci(c: dict) -> str:
    return f"{stats.nanmean([c['mean']]):+.3f} [{stats.nanmean([c['low']]):+.3f}, {stats.nanmean([c['high']]):+.3f}]"


def _print_summary(name: str, result: dict) -> None:
    over = result["summary"].get("unit", "features × prompts")
    print(f"{name}fluency judged by {result['fluency']['model']} (independent: {result['fluency']['independent']}"
          f"; {result['fluency']['why']}); intervals over {over}, per feature over prompts")
    for row in result["summary"]["rows"]:
        controlled = ", ".join(f"− {k} {_ci(v)}" for k, v in row["controlled"].items()) or "no controls"
        print(f"{name}{condition_label(row['scope'], row['schedule'])}, α={row['alpha']:g}: Δconcept "
              f"{_ci(row['concept_delta'])}, controlled {controlled}, up {row['features_up']}/{row['n_features']}, "
              f"ppl ×{row['ppl_ratio_median']:.2f}, composite {_ci(row['composite'])}, paper's score "
              f"{row['score_mean']:+.3f}, ‖αm(h)v‖/‖h‖ {row['norm_ratio']:.3f}")
    for m in result["summary"]["matched_fluency"]:
        best = f"α={m['alpha']:g}: {_ci(m['concept_delta'])}" if m["alpha"] is not None else "no α"
        print(f"{name}{condition_label(m['scope'], m['schedule'])}, best at ppl ratio ≤ {m['max_ppl_ratio']:g}: {best}")


def _print_comparison(cells: list[dict]) -> None:
    for c in cells:
        print(f"{c['names'][0]} − {c['names'][1]} {condition_label(c['scope'], c['schedule'])}, α {c['alpha']:g} vs "
              f"{c['other_alpha']:g} ({c['effect']}, over {' × '.join(c['over'])}): {_ci(c)} → {c['verdict']}; "
              f"composite {_ci(c['composite'])} → {c['composite_verdict']}; paper's score "
              f"{c['score_paper']['difference']:+.3f}; ‖αm(h)v‖/‖h‖ " +
              ", ".join(f"{k} {v:.3f}" for k, v in c["norm_ratio"].items()))


def _check_args(args: argparse.Namespace) -> Path:
    """Every check that needs no model, made before any loads: ``--out`` (returned), the concepts the planted
    judge knows, the option pairs and the schedules."""
    out = out_dir(args.out)
    for concept in ([args.judge_concept] if args.judge_concept is not None else []) + list(args.concepts or []):
        check_choice("planted concept", concept, sorted(CONCEPTS), valid="concepts")
    if args.features and not args.judge_concept:
        raise ValueError("--features needs --judge-concept (the planted concept the generations are judged on)")
    if not args.features and not args.concepts:
        raise ValueError("give --features (latent ids) or --concepts (planted concepts)")
    if args.compare_model and not args.concepts:
        raise ValueError("--compare-model needs --concepts: the other model's SAE has its own latent ids")
    if bool(args.compare_model) != bool(args.compare_sae):
        raise ValueError("--compare-model and --compare-sae go together")
    for text in args.schedule:
        _schedule_arg(text)
    for kind in args.controls:
        check_choice("--controls", kind, stats.CONTROLS)
    if args.control_draws < 1:
        raise ValueError(f"--control-draws must be at least 1, got {args.control_draws}")
    return out


def _reference(args: argparse.Namespace) -> dict:
    """Whether the fluency model is independent of the steered ones, and why (:func:`fluency_reference`)."""
    steered = {str(Path(p).resolve()) for p in (args.model, args.compare_model) if p}
    if args.ref_model and str(Path(args.ref_model).resolve()) in steered:
        return {"independent": False, "why": "--ref-model is one of the steered models"}
    if args.ref_model:
        return {"independent": True, "why": "--ref-model, neither steered model (shared training is not checked)"}
    if any(p.startswith(str(Path(ASSETS_DIR).resolve())) for p in steered):
        return {"independent": False, "why": "no --ref-model: the world's AR twin judges fluency, as the world "
                                             "ships no causal LM that is neither twin"}
    return {"independent": True, "why": "no --ref-model: the world's AR model, unrelated to the steered models"}


def _comparison(result: dict, other: dict, spec: SteerSpec, other_spec: SteerSpec, adapter, other_adapter
                ) -> list[dict]:
    """:func:`compare_models` at every condition both sweeps ran, α paired in order (or the α both ran)."""
    kinds = ["DLM" if a.is_diffusion else "AR" for a in (adapter, other_adapter)]
    names = tuple(kinds) if kinds[0] != kinds[1] else ("model", "compare")
    pairs = (list(zip(spec.alphas, other_spec.alphas)) if len(spec.alphas) == len(other_spec.alphas)
             else [(a, a) for a in spec.alphas if a in other_spec.alphas])
    return [compare_models(result, other, a, b, scope=scope, schedule=schedule, names=names, seed=spec.seed)
            for scope, schedule in _conditions(other_spec) for a, b in pairs]


def run_from_args(args: argparse.Namespace) -> int:
    """Run the sweep (and the ``--compare-model`` one), write the JSON and plots under ``--out``."""
    out = _check_args(args)
    adapter, layer, sae = load_model_layer_sae(args)
    ref = models.load(args.ref_model) if args.ref_model else models.load(asset("models", "ar"))
    features = _features_from_args(adapter, sae, layer, args)
    spec = SteerSpec(layer=layer, alphas=args.alpha, sampler=args.sampler, gen_length=args.gen_length,
                     steps=args.steps, temperature=args.temperature, scopes=args.scope,
                     schedules=[_schedule_arg(s) for s in args.schedule], seed=args.seed, controls=args.controls,
                     control_draws=args.control_draws)
    prompts = neutral_prompts(adapter.tokenizer, args.n_prompts, args.prompts)
    reference = _reference(args)
    results = {"": run_steer(adapter, sae, prompts, features, spec, ref,
                             reference=fluency_reference(ref, adapter, **reference))}
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "steer.json", results[""])
    plot_sweep(results[""], out / "steer.png")
    if args.compare_model:
        other = models.load(args.compare_model)
        other_sae = TopKSAE.load(args.compare_sae)
        # a causal model has no masked positions: its sweep keeps the scopes that exist for it
        scopes = [s for s in spec.scopes if other.is_diffusion or s not in ("masked", "decoded")]
        if not scopes:
            raise ValueError(f"none of the scopes {list(spec.scopes)} exists for the causal --compare-model")
        other_spec = replace(spec, sampler=args.compare_sampler or ("ar" if not other.is_diffusion
                                                                    else spec.sampler),
                             alphas=args.compare_alpha or spec.alphas, scopes=scopes)
        other_features = _features_from_args(other, other_sae, layer, args)
        results = {"model": results[""], "compare": run_steer(other, other_sae, neutral_prompts(
            other.tokenizer, args.n_prompts, args.prompts), other_features, other_spec, ref,
            reference=fluency_reference(ref, other, **reference))}
        comparison = _comparison(results["model"], results["compare"], spec, other_spec, adapter, other)
        atomic.write_json(out / "steer_compare.json", results["compare"] | {"comparison": comparison})
    plot_tradeoff(results, out / "tradeoff.png")
    for name, result in results.items():
        _print_summary(f"{name}: " if name else "", result)
    if args.compare_model:
        _print_comparison(comparison)
    print(f"wrote {out}/steer.json, steer.png, tradeoff.png" + (", steer_compare.json" if args.compare_model else ""))
    return 0
