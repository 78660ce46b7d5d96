"""The ``dlmscope steer`` job: a sweep of steering scores over α × scope × schedule for some features, with
paired bootstrap intervals over prompts, written as JSON and plots.

Features are explicit latent ids (judged for one ``concept``) or, on the embedded world, the best latent of each
planted concept (:mod:`dlmscope.interp.concepts`, chosen on held-out world text at the steered layer). Prompts are the
world's neutral prompts or a text file (one prompt per line). The sampler's settings are the same for the
baseline and every steered run, and so is the seed: the baseline is generated once and every steered run is
compared with it prompt by prompt.

The ``dlmscope steer`` verb (:func:`add_parser`, :func:`run_from_args`) runs one sweep, and optionally the same
concepts on a second model (e.g. the AR twin), and writes ``steer.json``, ``steer.png`` and ``tradeoff.png``.
"""
from __future__ import annotations

import argparse
import functools
import statistics
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
from dlmscope.util.bootstrap import paired_difference
from dlmscope.analysis.steering import steering_baseline, steering_score
from dlmscope.world import CONCEPTS, LM_BATCH, SEQ_LEN, asset, concept_id_table, world_batches
from dlmscope.world.tasks import load_tasks
from .options import add_option, load_model_layer_sae, out_dir
from .plots import condition_label, plot_sweep, plot_tradeoff

__all__ = ["SteerSpec", "neutral_prompts", "concept_features", "run_steer", "summarise", "condition_label",
           "summary_row", "concept_deltas", "compare_models", "without_per_prompt", "add_parser", "run_from_args"]


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


def _median_ratio(after, before) -> float:
    """The median over prompts of ``after / before`` (NaN, an empty generation, skipped)."""
    r = [a / b for a, b in zip(after, before) if a == a and b == b]
    return statistics.median(r) if r else float("nan")


def _nanmedian(xs) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def summarise(sweeps: Sequence[list[dict]], *, threshold: float = 0.1, seed: int = 0) -> dict:
    """Across features (each a list of runs over the same prompts, one per condition and α, in the same order):
    per run index, the mean concept-rate change with a paired bootstrap interval over prompts (all features'
    values of a prompt resampled together), how many features rose by ≥ ``threshold`` with an interval that
    excludes 0, the median of per-feature median perplexity ratios, and the mean score."""
    rows = []
    for runs in zip(*sweeps):
        before = [r["concepts_before"] for r in runs]
        after = [r["concepts_after"] for r in runs]
        per_feature = [paired_difference(b, a, seed=seed) for b, a in zip(before, after)]
        ratios = [_median_ratio(r["ppls_after"], r["ppls_before"]) for r in runs]
        rows.append({"scope": runs[0]["scope"], "schedule": runs[0]["schedule"], "alpha": runs[0]["alpha"],
                     "concept_delta": asdict(paired_difference(before, after, seed=seed)),
                     "features_up": sum(i.mean >= threshold and i.low > 0 for i in per_feature),
                     "n_features": len(runs), "ppl_ratio_median": _nanmedian(ratios),
                     "score_mean": statistics.fmean(r["score"] for r in runs)})
    return {"threshold": threshold, "rows": rows}


def run_steer(adapter, sae, prompts, features: Sequence[tuple[str, int]], spec: SteerSpec, ref_lm,
              judge=None, *, keep_generations: int | None = None, progress: bool = True) -> dict:
    """``{"spec", "n_prompts", "features": {"concept/latent": {"concept", "feature", "sweep": [one run per
    (scope, schedule, α): SteeringResult as a dict, with its paired interval "concept_delta"]}}, "summary"}``.
    ``features`` lists (the concept a latent is judged on, the latent id); the unsteered baseline runs once.
    ``judge`` defaults to the planted judge of the world's concepts. ``keep_generations`` trims the stored texts
    (the means and intervals use all of them)."""
    adapter.check_layer(spec.layer)
    judge = judge or PlantedJudge(concepts=CONCEPTS)
    if isinstance(judge, PlantedJudge):  # an unknown concept fails here, not after the first generations
        for concept, _ in features:
            check_choice("planted concept", concept, sorted(judge.vocab), valid="concepts")
    generate = _generator(spec)
    conditions = _conditions(spec)
    out = {"spec": asdict(spec) | {"scopes": [repr(s) if not isinstance(s, str) else s for s in spec.scopes],
                                   "schedules": [repr(s) for s in spec.schedules]},
           "n_prompts": len(prompts), "features": {}}
    baseline = steering_baseline(adapter, prompts, generate, spec.gen_length, ref_lm, seed=spec.seed)
    bar = tqdm(total=len(features) * len(conditions) * len(spec.alphas), desc=f"steer layer {spec.layer}",
               unit="run", disable=not progress)
    for concept, f in features:
        sweep = []
        for scope, schedule in conditions:
            for a in spec.alphas:
                r = steering_score(adapter, prompts, generate, spec.gen_length, spec.layer, sae, f, a, concept,
                                   judge, ref_lm, seed=spec.seed, baseline=baseline, scope=scope,
                                   schedule=schedule, strength=spec.strength)
                run = {"scope": scope if isinstance(scope, str) else repr(scope),
                       "schedule": repr(schedule) if callable(schedule) else schedule,
                       "alpha": a} | asdict(r)
                run["concept_delta"] = asdict(paired_difference(r.concepts_before, r.concepts_after,
                                                                seed=spec.seed))
                if keep_generations is not None:
                    run["generations_before"] = run["generations_before"][:keep_generations]
                    run["generations_after"] = run["generations_after"][:keep_generations]
                sweep.append(run)
                bar.update()
        out["features"][f"{concept}/{f}"] = {"concept": concept, "feature": f, "sweep": sweep}
    bar.close()
    out["summary"] = summarise([e["sweep"] for e in out["features"].values()], seed=spec.seed)
    return out


def _matches(run: dict, alpha: float, scope, schedule) -> bool:
    return (run["alpha"] == alpha and run["scope"] == scope
            and condition_label(run["scope"], run["schedule"]) == condition_label(scope, schedule))


def summary_row(result: dict, alpha: float, scope="all", schedule="all") -> dict:
    """The summary row of one (scope, schedule, α) of a :func:`run_steer` result."""
    return next(r for r in result["summary"]["rows"] if _matches(r, alpha, scope, schedule))


def concept_deltas(result: dict, alpha: float, scope="all", schedule="all") -> list[list]:
    """``[feature, prompt]``: the concept-rate change of each feature's run at (scope, schedule, α); None
    where a judgement failed."""
    out = []
    for entry in result["features"].values():
        run = next(r for r in entry["sweep"] if _matches(r, alpha, scope, schedule))
        out.append([None if a is None or b is None else a - b
                    for a, b in zip(run["concepts_after"], run["concepts_before"])])
    return out


def compare_models(result: dict, other: dict, alpha: float, other_alpha: float | None = None, *,
                   seed: int = 0) -> dict:
    """The mean concept-rate change of ``result`` at ``alpha`` minus ``other``'s at ``other_alpha`` (default
    the same: matched α), scope all, with a bootstrap interval pairing the prompts (both runs must have used
    the same prompts and concepts, e.g. a DLM and its AR twin)."""
    mine, theirs = concept_deltas(result, alpha), concept_deltas(other, alpha if other_alpha is None else other_alpha)
    if len(mine) != len(theirs) or len(mine[0]) != len(theirs[0]):
        raise ValueError(f"the runs differ in features or prompts: {len(mine)}×{len(mine[0])} vs "
                         f"{len(theirs)}×{len(theirs[0])}")
    return asdict(paired_difference(theirs, mine, seed=seed))


PER_PROMPT = ("concepts_before", "concepts_after", "ppls_before", "ppls_after")


def without_per_prompt(result: dict) -> dict:
    """A copy of a :func:`run_steer` result without the per-prompt lists (for storing: the means, intervals
    and summary stay; :func:`concept_deltas` and :func:`compare_models` need the full result)."""
    out = dict(result, features={})
    for key, entry in result["features"].items():
        out["features"][key] = dict(entry, sweep=[{k: v for k, v in run.items() if k not in PER_PROMPT}
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
    s.add_argument("--ref-model", default=None, help="causal LM for perplexity (default: the world's AR twin)")
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


def _print_summary(name: str, result: dict) -> None:
    for row in result["summary"]["rows"]:
        ci = row["concept_delta"]
        print(f"{name}{condition_label(row['scope'], row['schedule'])}, α={row['alpha']:g}: Δconcept "
              f"{ci['mean']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}], up {row['features_up']}/{row['n_features']}, "
              f"ppl ×{row['ppl_ratio_median']:.2f}, score {row['score_mean']:+.3f}")


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
    return out


def run_from_args(args: argparse.Namespace) -> int:
    """Run the sweep (and the ``--compare-model`` one), write the JSON and plots under ``--out``."""
    out = _check_args(args)
    adapter, layer, sae = load_model_layer_sae(args)
    ref = models.load(args.ref_model) if args.ref_model else models.load(asset("models", "ar"))
    features = _features_from_args(adapter, sae, layer, args)
    spec = SteerSpec(layer=layer, alphas=args.alpha, sampler=args.sampler, gen_length=args.gen_length,
                     steps=args.steps, temperature=args.temperature, scopes=args.scope,
                     schedules=[_schedule_arg(s) for s in args.schedule], seed=args.seed)
    prompts = neutral_prompts(adapter.tokenizer, args.n_prompts, args.prompts)
    results = {"": run_steer(adapter, sae, prompts, features, spec, ref)}
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
            other.tokenizer, args.n_prompts, args.prompts), other_features, other_spec, ref)}
        atomic.write_json(out / "steer_compare.json", results["compare"])
    plot_tradeoff(results, out / "tradeoff.png")
    for name, result in results.items():
        _print_summary(f"{name}: " if name else "", result)
    print(f"wrote {out}/steer.json, steer.png, tradeoff.png" + (", steer_compare.json" if args.compare_model else ""))
    return 0
