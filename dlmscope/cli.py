"""Command line: ``dlmscope train``, ``eval``, ``demo``, ``steer``, ``order``, ``transfer`` and ``dashboard``.

    dlmscope train --model DIR --layers 1 3 --policy mask --k 8 16 32 --n 512 --tokens 200000 --out runs/x
    dlmscope eval  --model DIR --sae runs/x/layer_1/k_8 --layer 1 --tokens 20000
    dlmscope demo  --out runs/demo            # the embedded-world job behind `make demo`
    dlmscope steer --model DIR --sae DIR --layer 4 --concepts food place --alpha 1 2 4 --out runs/steer
    dlmscope order --model DIR --sae 2=DIR 4=DIR --orders low_confidence entropy sae_stable --out runs/order
    dlmscope transfer --base DIR --target DIR --layers 2 5 [--control AR_DIR] --out runs/transfer
    dlmscope dashboard --model DIR --sae DIR --layer 4 --out runs/dash   # report.json + index.html

Text comes from the embedded world's corpus (``--corpus world``, default), a text file with one document per
line, or a Hugging Face dataset (data files or a dataset directory, streamed); documents are EOS-joined and
packed into ``--seq-len`` contexts, every tenth document held out (:mod:`dlmscope.jobs.sources`).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import torch

from dlmscope.util import atomic
from . import models
from dlmscope.util import distributed as D
from dlmscope.data.activations import ActivationStream
from dlmscope.interp.autointerp import OpenAIExplainer
from dlmscope.interp.dashboard import write_dashboard
from .demo import DemoConfig, run_demo
from dlmscope.interp.neuronpedia import export_neuronpedia
from dlmscope.jobs.dashboard import build_report
from dlmscope.interp.judges import OpenAIJudge
from dlmscope.jobs.order import ORDERS, STEPS, OrderSpec, plot_order, run_order
from dlmscope.jobs.train import SweepSpec, heldout_activations, train_sweep
from dlmscope.sae.topk import TopKSAE
from dlmscope.analysis.splice import ar_delta_loss, average_results, dlm_delta_loss
from dlmscope.sae.metrics import evaluate_sae
from dlmscope.jobs.steer import (SteerSpec, concept_features, condition_label, neutral_prompts, plot_sweep, plot_tradeoff,
                        run_steer)
from dlmscope.jobs.sources import token_batches
from dlmscope.train.trainer import TrainConfig
from dlmscope.train.log import LogConfig
from dlmscope.jobs.transfer import plot_transfer, run_transfer, summary_lines
from .world import ASSETS_DIR
from dlmscope.world.tasks import SCORED_KINDS, load_tasks


def _text(adapter, args):
    """``(train, heldout)`` LM batches of ``--corpus`` (see :mod:`dlmscope.jobs.sources`)."""
    return token_batches(args.corpus, adapter.tokenizer, seq_len=args.seq_len, lm_batch=args.lm_batch,
                         text_field=args.text_field, split=args.split, world_sentences=args.sentences, seed=args.seed)


def cmd_train(args) -> int:
    adapter = models.load(args.model)
    layers = adapter.check_layers(args.layers)
    train_batches, held_batches = _text(adapter, args)
    out = Path(args.out)
    spec = SweepSpec(layers=tuple(layers), ks=tuple(args.k), n_latents=args.n, policy=args.policy,
                     tokens=args.tokens, batch_size=args.batch_size, buffer_tokens=args.buffer_tokens, seed=args.seed)
    train = TrainConfig(lr=args.lr, warmup_steps=args.warmup, dead_tokens=args.dead_tokens,
                        norm_batches=args.norm_batches, backend=args.backend,
                        checkpoint_every=args.checkpoint_every)
    saes = train_sweep(adapter, train_batches, spec, train, cache_dir=out / "activation_cache",
                       checkpoint_root=out, resume=args.resume, log=LogConfig(log_every=args.log_every),
                       latent_parallel=args.latent_parallel)
    if not D.is_main():  # under torchrun, rank 0 evaluates and writes
        return 0
    # held-out activations of every layer, harvested once and shared by every SAE's evaluation
    held_acts = heldout_activations(adapter, held_batches, spec, tokens=args.eval_tokens)
    summary = {"model": args.model, "policy": args.policy, "corpus": args.corpus, "layers": {}}
    for layer, layer_saes in saes.items():
        summary["layers"][layer] = {}
        for sae in layer_saes:
            sae.save(out / f"layer_{layer}" / f"k_{sae.k}")
            metrics = evaluate_sae(sae, held_acts[layer])
            summary["layers"][layer][sae.k] = metrics
            print(f"layer {layer} k={sae.k}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    atomic.write_json(out / "summary.json", summary)
    print(f"wrote {out / 'summary.json'}")
    return 0


def _model_layer_sae(args):
    """``(adapter, layer, sae)`` from ``--model``, ``--layer`` and ``--sae``, the layer checked."""
    adapter = models.load(args.model)
    return adapter, adapter.check_layer(args.layer), TopKSAE.load(args.sae)


def cmd_eval(args) -> int:
    adapter, layer, sae = _model_layer_sae(args)
    _, held_batches = _text(adapter, args)
    policy = args.policy if args.policy is not None else \
        ("mask" if adapter.is_diffusion and adapter.mask_token_id is not None else "clean")
    stream = ActivationStream(adapter, held_batches, [layer], policy, batch_size=args.batch_size,
                              buffer_tokens=max(args.batch_size * 4, 4096), seed=args.seed, max_tokens=args.tokens,
                              drop_last=False)
    result = {"sae": args.sae, "layer": layer, "policy": policy, **evaluate_sae(sae, stream.for_layer(layer))}
    gen = torch.Generator().manual_seed(args.seed)
    batches = list(itertools.islice(held_batches, args.loss_batches))
    if adapter.is_diffusion:  # dlm_delta_loss names a missing mask token (DiffusionGemma) itself
        result["dlm_delta"] = average_results([dlm_delta_loss(adapter, sae, layer, ids, generator=gen)
                                               for ids in batches])
    else:
        result["ar_delta"] = average_results([ar_delta_loss(adapter, sae, layer, ids) for ids in batches])
    print(json.dumps(result, indent=2))
    if args.out:
        atomic.write_json(args.out, result)
    return 0


def cmd_demo(args) -> int:
    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    overrides = {"layers": args.layers, "ks": args.k, "n_latents": args.n, "train_tokens": args.tokens,
                 "eval_tokens": args.eval_tokens, "sentences": args.sentences, "delta_batches": args.delta_batches,
                 "concept_batches": args.concept_batches, "k_ref": args.k_ref}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "ks" in overrides and "k_ref" not in overrides and cfg.k_ref not in overrides["ks"]:
        overrides["k_ref"] = min(overrides["ks"])
    if args.steer_layers is not None:
        overrides["steer_layers"] = tuple(args.steer_layers)
    elif "layers" in overrides:  # the default steered blocks that were kept, else the middle one of --layers
        layers = sorted(set(overrides["layers"]))
        overrides["steer_layers"] = tuple(L for L in cfg.steer_layers if L in layers) or (layers[len(layers) // 2],)
    if "layers" in overrides:    # the decoding orders replay with the demo's Mask-SAEs of the kept layers
        overrides["order_layers"] = tuple(L for L in cfg.order_layers if L in overrides["layers"]) or \
            tuple(sorted(set(overrides["layers"])))
    if args.steer_prompts is not None:
        overrides["steer_prompts"] = args.steer_prompts
    cfg = dataclasses.replace(cfg, **overrides)
    results = run_demo(args.out, cfg)
    out = Path(args.out)
    print(f"wrote {out / 'report.md'} (+ results.json, " + ", ".join(sorted(p.name for p in out.glob("*.png")))
          + ") in "
          f"{results['timings_s']['total'] / 60:.1f} min")
    return 0


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


def _steer_features(adapter, sae, layer, args) -> list[tuple[str, int]]:
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


def cmd_steer(args) -> int:
    adapter, layer, sae = _model_layer_sae(args)
    ref = models.load(args.ref_model) if args.ref_model else models.load(str(Path(ASSETS_DIR) / "models" / "ar"))
    features = _steer_features(adapter, sae, layer, args)
    if args.compare_model and not args.concepts:
        raise ValueError("--compare-model needs --concepts: the other model's SAE has its own latent ids")
    if bool(args.compare_model) != bool(args.compare_sae):
        raise ValueError("--compare-model and --compare-sae go together")
    spec = SteerSpec(layer=layer, alphas=args.alpha, sampler=args.sampler, gen_length=args.gen_length,
                     steps=args.steps, temperature=args.temperature, scopes=args.scope,
                     schedules=[_schedule_arg(s) for s in args.schedule], seed=args.seed)
    prompts = neutral_prompts(adapter.tokenizer, args.n_prompts, args.prompts)
    results = {"": run_steer(adapter, sae, prompts, features, spec, ref)}
    out = Path(args.out)
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
        other_spec = dataclasses.replace(spec, sampler=args.compare_sampler or ("ar" if not other.is_diffusion
                                                                                else spec.sampler),
                                         alphas=args.compare_alpha or spec.alphas, scopes=scopes)
        other_features = _steer_features(other, other_sae, layer, args)
        results = {"model": results[""], "compare": run_steer(other, other_sae, neutral_prompts(
            other.tokenizer, args.n_prompts, args.prompts), other_features, other_spec, ref)}
        atomic.write_json(out / "steer_compare.json", results["compare"])
    plot_tradeoff(results, out / "tradeoff.png")
    for name, result in results.items():
        _print_summary(f"{name}: " if name else "", result)
    print(f"wrote {out}/steer.json, steer.png, tradeoff.png" + (", steer_compare.json" if args.compare_model else ""))
    return 0


def _layer_saes(specs: list[str]) -> dict[int, TopKSAE]:
    """``["2=DIR", "4=DIR"]`` -> ``{2: sae, 4: sae}``."""
    out = {}
    for spec in specs:
        layer, sep, path = spec.partition("=")
        if not sep or not layer.strip().isdigit():
            raise ValueError(f"--sae takes LAYER=DIR, got {spec!r}")
        out[int(layer)] = TopKSAE.load(path)
    return out


def cmd_order(args) -> int:
    adapter = models.load(args.model)
    adapter.require_mask_token()
    saes = _layer_saes(args.sae)
    adapter.check_layers(list(saes))
    tasks, heldout = load_tasks(args.tasks or Path(ASSETS_DIR) / "tasks.jsonl")
    kinds = args.kinds or list(SCORED_KINDS)
    keep = [i for i, t in enumerate(tasks) if t.kind in kinds][: args.max_tasks]
    if not keep:
        raise ValueError(f"no tasks of kinds {kinds} in {args.tasks or 'the world tasks'}")
    spec = OrderSpec(orders=args.orders, steps=args.steps, seeds=args.seeds, guide_layer=args.guide_layer,
                     top_k=args.top_k)
    result = run_order(adapter, saes, [tasks[i] for i in keep], [heldout[i] for i in keep], spec)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "order.json", result)
    paths = plot_order(result, out / "order")
    for order, by_steps in result["accuracy"].items():
        print(f"{order:>20}: " + ", ".join(f"{st} {c['order_sensitive']['mean']:.2f}" for st, c in by_steps.items()
                                          if c["order_sensitive"]))
    print(f"wrote {out / 'order.json'} and " + ", ".join(p.name for p in paths))
    return 0


def cmd_transfer(args) -> int:
    base, target = models.load(args.base), models.load(args.target)
    control = models.load(args.control) if args.control else None
    text = None if args.corpus == "world" else _text(base, args)
    result = run_transfer(base, target, args.layers, policy=args.policy, n_latents=args.n, k=args.k,
                          train_tokens=args.tokens, eval_tokens=args.eval_tokens, delta_batches=args.delta_batches,
                          seed=args.seed, control=control, batches=text, sentences=args.sentences)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "transfer.json", result)
    plot_transfer(result, out / "transfer.png")
    print("\n".join(summary_lines(result)))
    print(f"wrote {out / 'transfer.json'} and {out / 'transfer.png'}")
    return 0


def cmd_dashboard(args) -> int:
    adapter, layer, sae = _model_layer_sae(args)
    _, held = _text(adapter, args)
    held = list(itertools.islice(held, args.batches))               # read only the batches used
    world = args.corpus == "world"
    if args.judge == "openai":
        client = OpenAIJudge(cache_path=str(Path(args.out) / "judge_cache.json"))
        explainer, judge = OpenAIExplainer(client), client
    elif args.judge == "none":
        explainer, judge = False, None
    else:
        if not world:
            raise ValueError("--judge planted needs --corpus world (the planted concepts); use openai or none")
        explainer, judge = None, None
    report = build_report(adapter, sae, layer, held, sample=args.sample, masked_t=args.masked_t,
                          explainer=explainer, judge=judge, planted=world, seed=args.seed,
                          policy=str(sae.cfg.meta.get("policy", "")), model_name=args.model)
    out = Path(args.out)
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
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlmscope", description="SAE interpretability for diffusion LMs")
    sub = parser.add_subparsers(dest="command", required=True)

    def text_options(p):
        p.add_argument("--model", required=True, help="model directory (LLaDA / Dream / Llama / Qwen2 format)")
        p.add_argument("--corpus", default="world",
                       help="'world' (embedded corpus), a .txt file (a document per line), a .jsonl/.json/.parquet/"
                            ".csv file or a dataset directory (streamed with `datasets`)")
        p.add_argument("--text-field", default="text", help="the documents' field in a dataset")
        p.add_argument("--split", default="train", help="the dataset split to read")
        p.add_argument("--sentences", type=int, default=20000, help="world corpus size to draw from")
        p.add_argument("--seq-len", type=int, default=64)
        p.add_argument("--lm-batch", type=int, default=32, help="sequences per model forward")
        p.add_argument("--batch-size", type=int, default=1024, help="activations per SAE batch")
        p.add_argument("--seed", type=int, default=0)

    t = sub.add_parser("train", help="harvest activations and train Top-K SAEs (a k sweep per layer)")
    text_options(t)
    t.add_argument("--layers", type=int, nargs="+", required=True)
    t.add_argument("--policy", default="mask", help="mask | unmask | all | clean")
    t.add_argument("--k", type=int, nargs="+", default=[8, 16, 32])
    t.add_argument("--n", "--latents", dest="n", type=int, default=1024,
                   help="latents per SAE (--latents under torchrun, whose parser takes --n for its own --nnodes)")
    t.add_argument("--tokens", type=int, default=200_000, help="training tokens per layer")
    t.add_argument("--eval-tokens", type=int, default=20_000)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--warmup", type=int, default=50)
    t.add_argument("--dead-tokens", type=int, default=100_000)
    t.add_argument("--norm-batches", type=int, default=10)
    t.add_argument("--buffer-tokens", type=int, default=None, help="shuffle-buffer rows (default max(64·batch, 65536))")
    t.add_argument("--log-every", type=int, default=50)
    t.add_argument("--checkpoint-every", type=int, default=200)
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    t.add_argument("--backend", default=None)
    t.add_argument("--latent-parallel", type=int, default=None, metavar="R",
                   help="under torchrun: shard every SAE's latents over R ranks per data group (default: data parallel)")
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="FVE / L0 / dead and delta-LM of a trained SAE")
    text_options(e)
    e.add_argument("--sae", required=True, help="SAE directory (any supported format)")
    e.add_argument("--layer", type=int, required=True)
    e.add_argument("--policy", default=None, help="default: mask for DLMs, clean for AR models")
    e.add_argument("--tokens", type=int, default=20_000)
    e.add_argument("--loss-batches", type=int, default=4)
    e.add_argument("--out", default=None, help="also write the JSON here")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="the main job on the embedded world: Mask/Unmask/AR SAEs, report with plots")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--quick", action="store_true", help="smaller settings (two layers, two k; about a minute)")
    d.add_argument("--layers", type=int, nargs="+", default=None)
    d.add_argument("--k", type=int, nargs="+", default=None)
    d.add_argument("--k-ref", type=int, default=None, help="the k shown in the per-layer plots")
    d.add_argument("--n", type=int, default=None, help="latents per SAE")
    d.add_argument("--tokens", type=int, default=None, help="kept training tokens per (model, policy, layer)")
    d.add_argument("--eval-tokens", type=int, default=None)
    d.add_argument("--sentences", type=int, default=None, help="world corpus size")
    d.add_argument("--delta-batches", type=int, default=None)
    d.add_argument("--concept-batches", type=int, default=None)
    d.add_argument("--steer-layers", type=int, nargs="*", default=None,
                   help="blocks of the steering section (none: no steering; default 1 4 6 or the middle --layers)")
    d.add_argument("--steer-prompts", type=int, default=None)
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("steer", help="steer SAE features during generation: an α sweep, judged, JSON + plot")
    s.add_argument("--model", required=True, help="the model to steer (a DLM for llada/dream, AR for ar)")
    s.add_argument("--sae", required=True)
    s.add_argument("--layer", type=int, required=True)
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
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_steer)

    o = sub.add_parser("order", help="decoding orders on fill-in tasks: accuracy, SAE feature dynamics, an "
                                     "SAE-guided order; JSON + plots")
    o.add_argument("--model", required=True, help="a masked DLM (LLaDA / Dream format)")
    o.add_argument("--sae", nargs="+", required=True, metavar="LAYER=DIR", help="SAEs to replay with, per layer")
    o.add_argument("--tasks", default=None, help="a tasks.jsonl (default: the embedded world's)")
    o.add_argument("--kinds", nargs="+", default=None, help="task kinds to use (default: every scored kind)")
    o.add_argument("--max-tasks", type=int, default=None)
    o.add_argument("--orders", nargs="+", default=list(ORDERS), help=" | ".join(ORDERS))
    o.add_argument("--steps", nargs="+", default=list(STEPS), help="one | half | all (of the answers per step)")
    o.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    o.add_argument("--guide-layer", type=int, default=4, help="the layer the SAE-guided orders read")
    o.add_argument("--top-k", type=int, default=8, help="latents kept per position (replay and guide)")
    o.add_argument("--out", required=True)
    o.set_defaults(func=cmd_order)

    t = sub.add_parser("transfer", help="base-model SAEs on the post-trained model: FVE, delta-LM, latent "
                                        "agreement, decoder matching; JSON + plot")
    t.add_argument("--base", required=True, help="the base model (SAEs are trained on it)")
    t.add_argument("--target", required=True, help="its post-trained version (e.g. the instruct model)")
    t.add_argument("--control", default=None, help="optional: a different model (e.g. the AR twin) as reference")
    t.add_argument("--layers", type=int, nargs="+", required=True)
    t.add_argument("--policy", default="unmask", help="mask | unmask | clean")
    t.add_argument("--corpus", default="world", help="as for train; 'world' is the embedded corpus")
    t.add_argument("--n", type=int, default=512)
    t.add_argument("--k", type=int, default=8)
    t.add_argument("--tokens", type=int, default=200_000, help="training tokens per SAE")
    t.add_argument("--eval-tokens", type=int, default=30_000)
    t.add_argument("--delta-batches", type=int, default=12)
    t.add_argument("--seq-len", type=int, default=64)
    t.add_argument("--lm-batch", type=int, default=32)
    t.add_argument("--text-field", default="text")
    t.add_argument("--split", default="train")
    t.add_argument("--sentences", type=int, default=100_000, help="world corpus size")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_transfer)

    b = sub.add_parser("dashboard", help="feature report + auto-interp + a static HTML dashboard of one SAE")
    text_options(b)
    b.add_argument("--sae", required=True)
    b.add_argument("--layer", type=int, required=True)
    b.add_argument("--batches", type=int, default=40, help="held-out LM batches read")
    b.add_argument("--sample", type=int, default=50, help="alive latents in the report")
    b.add_argument("--masked-t", type=float, default=0.3, help="masking rate of the DLM's masked-position pass")
    b.add_argument("--judge", default="planted", choices=("planted", "openai", "none"),
                   help="auto-interp: planted (world ground truth), openai ($OPENAI_BASE_URL …), none")
    b.add_argument("--neuronpedia", default=None, help="also export the features for Neuronpedia into this dir")
    b.add_argument("--neuronpedia-model", default=None)
    b.add_argument("--neuronpedia-sae", default=None)
    b.add_argument("--out", required=True)
    b.set_defaults(func=cmd_dashboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"dlmscope {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
