"""The ``dlmscope dashboard`` job: a feature report of one SAE, its planted-concept F1 per latent (embedded
world), auto-interp scores, and the static dashboard.

:func:`build_report` runs :func:`dlmscope.interp.features.feature_report` on held-out text, adds each latent's best
planted concept and its F1 (:mod:`dlmscope.interp.concepts`) when the text is the world's, and scores the latents
with an explainer and a judge (:mod:`dlmscope.interp.autointerp`). The ``dlmscope dashboard`` verb
(:func:`add_parser`, :func:`run_from_args`) writes it as ``report.json`` with the HTML dashboard
(:func:`dlmscope.interp.dashboard.write_dashboard`) and, optionally, Neuronpedia batch files.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path

from dlmscope.interp.autointerp import OpenAIExplainer, PlantedExplainer, score_report
from dlmscope.interp.concepts import labelled_activations, score_concepts
from dlmscope.interp.dashboard import write_dashboard
from dlmscope.interp.features import feature_report
from dlmscope.interp.judges import JudgeRejected, JudgeUnreachable, OpenAIJudge, PlantedJudge
from dlmscope.interp.neuronpedia import export_neuronpedia
from dlmscope.util import atomic
from dlmscope.world import CONCEPTS, concept_id_table
from .options import add_option, add_text_options, load_model_layer_sae, out_dir, positive_int, text_from_args
from .sources import WORLD

__all__ = ["add_planted_concepts", "build_report", "auto_interp", "masking_rate", "add_parser", "run_from_args"]


def add_planted_concepts(report: dict, adapter, sae, layer: int, token_batches: Sequence) -> None:
    """``latents[id]["concept"] = {"name", "f1"}``: the planted concept each latent detects best on clean
    ``token_batches`` (F1 of "the latent fires" vs "the token is a word of the concept")."""
    names, table = concept_id_table(adapter.tokenizer)
    acts, labels = labelled_activations(adapter, token_batches, layer, table, "clean")
    f1 = score_concepts(sae, acts, labels, names).f1_matrix                      # [n_latents, n_concepts]
    for key, entry in report["latents"].items():
        row = f1[int(key)]
        best = int(row.argmax())
        entry["concept"] = {"name": names[best], "f1": float(row[best])}


def build_report(adapter, sae, layer: int, token_batches: Sequence, *, sample: int | None = 50,
                 masked_t: float | None = 0.3, explainer=None, judge=None, planted: bool = True, seed: int = 0,
                 policy: str = "", model_name: str = "") -> dict:
    """The feature report with planted concepts (``planted``: world text) and auto-interp scores (the planted
    explainer and judge by default on world text; pass others for real models, or ``explainer=False`` to
    skip auto-interp)."""
    if explainer is None and not planted:
        raise ValueError("auto-interp outside the embedded world needs an explainer and a judge "
                         "(dlmscope.interp.autointerp.HFExplainer / OpenAIExplainer with an HF / OpenAI judge)")
    report = feature_report(adapter, sae, layer, token_batches, sample=sample, masked_t=masked_t, seed=seed,
                            policy=policy, model_name=model_name)
    if planted:
        add_planted_concepts(report, adapter, sae, layer, token_batches)
    if explainer is not False:
        auto_interp(report, explainer, judge, seed=seed)
    return report


def auto_interp(report: dict, explainer=None, judge=None, *, seed: int = 0) -> dict:
    """:func:`dlmscope.interp.autointerp.score_report` of ``report`` with ``explainer`` and ``judge``, the planted
    ones (the embedded world's concepts) for those not given."""
    return score_report(report, explainer or PlantedExplainer(concepts=CONCEPTS),
                        judge or PlantedJudge(concepts=CONCEPTS), seed=seed)


def masking_rate(text: str) -> float:
    """argparse ``type``: a masking rate ``t`` in (0, 1]."""
    try:
        t = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < t <= 1:                                              # NaN fails this too
        raise argparse.ArgumentTypeError(f"a masking rate must be in (0, 1], got {text}")
    return t


# ------------------------------------------------------------------------------------------------- the verb
def add_parser(subparsers) -> argparse.ArgumentParser:
    """``dlmscope dashboard``: the feature report of one SAE, auto-interp, the static dashboard."""
    b = subparsers.add_parser("dashboard", help="feature report + auto-interp + a static HTML dashboard of one SAE")
    add_text_options(b)
    add_option(b, "--sae")
    add_option(b, "--layer")
    b.add_argument("--batches", type=positive_int, default=40, help="held-out LM batches read")
    b.add_argument("--sample", type=positive_int, default=50, help="alive latents in the report")
    b.add_argument("--masked-t", type=masking_rate, default=0.3,
                   help="masking rate of the DLM's masked-position pass, in (0, 1]")
    b.add_argument("--judge", default="planted", choices=("planted", "openai", "none"),
                   help="auto-interp: planted (world ground truth), openai ($OPENAI_BASE_URL …), none")
    b.add_argument("--neuronpedia", default=None, help="also export the features for Neuronpedia into this dir")
    b.add_argument("--neuronpedia-model", default=None)
    b.add_argument("--neuronpedia-sae", default=None)
    add_option(b, "--out")
    b.set_defaults(func=run_from_args)
    return b


def run_from_args(args: argparse.Namespace) -> int:
    """Build the report on ``--batches`` held-out batches; write ``report.json`` and the dashboard under ``--out``.

    The output folders, the judge's cache and (``--judge openai``) its endpoint are checked before the work. The
    judge's calls and failures are reported at the end (and kept in ``report.json`` as ``judge_calls``); exit 1
    when every judge call failed. A judge that stops answering part-way (unreachable, refusing) still leaves the
    report of what was computed, then fails the run with its one-line error."""
    out = out_dir(args.out)
    if args.neuronpedia:
        out_dir(args.neuronpedia, "--neuronpedia")
    world = args.corpus == WORLD
    client = None
    if args.judge == "openai":
        client = OpenAIJudge(cache_path=str(out / "judge_cache.json"))
        client.check()
        explainer, judge = OpenAIExplainer(client), client
    elif args.judge == "none":
        explainer, judge = False, None
    else:
        if not world:
            raise ValueError("--judge planted needs --corpus world (the planted concepts); use openai or none")
        explainer, judge = None, None
    adapter, layer, sae = load_model_layer_sae(args)
    _, held = text_from_args(adapter, args)
    held = list(itertools.islice(held, args.batches))               # read only the batches used
    report = build_report(adapter, sae, layer, held, sample=args.sample, masked_t=args.masked_t, explainer=False,
                          planted=world, seed=args.seed, policy=str(sae.cfg.meta.get("policy", "")),
                          model_name=args.model)
    failed: Exception | None = None
    if explainer is not False:
        try:
            auto_interp(report, explainer, judge, seed=args.seed)
        except (JudgeRejected, JudgeUnreachable) as exc:           # written below, then raised
            failed = exc
            report["interp_error"] = str(exc)
    if client is not None:
        report["judge_calls"] = client.stats()
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "report.json", report)
    index = write_dashboard(report, out)
    if args.neuronpedia:
        files = export_neuronpedia(report, args.neuronpedia, model_id=args.neuronpedia_model or Path(args.model).name,
                                   sae_id=args.neuronpedia_sae or f"dlmscope-{layer}", overwrite=True)
        print(f"wrote {len(files)} Neuronpedia batch file(s) under {args.neuronpedia}")
    s = report.get("interp_summary")
    if s and s.get("accuracy"):
        print(f"auto-interp over {s['n']} latents: accuracy {s['accuracy']['mean']:.3f} (balanced "
              f"{s['balanced_accuracy']['mean']:.3f}; an explainer that says 'none' gets {s['chance_accuracy']:.3f})")
    print(f"wrote {out / 'report.json'} and the dashboard {index}")
    if failed is not None:
        raise failed
    if client is not None and client.calls:
        return _judge_verdict(client.stats())
    return 0


def _judge_verdict(stats: dict) -> int:
    """Print the judge's calls and failures (stderr when any failed); 1 when every call failed, else 0."""
    reasons = ", ".join(f"{why}: {n}" for why, n in sorted(stats["reasons"].items(), key=lambda kv: -kv[1]))
    if stats["failed"] == stats["calls"]:
        print(f"dlmscope dashboard: error: every one of the {stats['calls']} judge calls failed ({reasons}); the "
              "report above has no auto-interp scores", file=sys.stderr)
        return 1
    line = f"judge: {stats['calls']} calls, {stats['failed']} failed"
    print(f"{line} ({reasons})" if stats["failed"] else line, file=sys.stderr if stats["failed"] else sys.stdout)
    return 0
