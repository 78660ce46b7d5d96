"""The ``dlmscope demo`` verb: its options, and how they override :class:`~dlmscope.demo.config.DemoConfig`.

    dlmscope demo --out runs/demo            # the embedded-world job behind `make demo`
    dlmscope demo --quick --layers 0 4 --k 4 # smaller settings, some overridden

Every option but ``--out`` and ``--quick`` defaults to ``None``: the config's own value (the full demo's, or
:meth:`DemoConfig.quick`'s). Overriding ``--layers`` keeps the steered and replayed blocks that remain, as
:func:`config_from_args` says.
"""
from __future__ import annotations

import argparse
import dataclasses

from dlmscope.jobs.options import out_dir

from .config import DemoConfig
from .run import run_demo

__all__ = ["add_parser", "config_from_args", "run_from_args"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """``dlmscope demo``: the main job on the embedded world."""
    d = subparsers.add_parser("demo", help="the main job on the embedded world: Mask/Unmask/AR SAEs, report with plots")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--quick", action="store_true", help="smaller settings (two layers, two k; about a minute)")
    d.add_argument("--layers", type=int, nargs="+", default=None)
    d.add_argument("--k", type=int, nargs="+", default=None)
    d.add_argument("--k-ref", type=int, default=None, help="the k shown in the per-layer plots")
    d.add_argument("--sae-seeds", type=int, default=None,
                   help="SAE init seeds at --k-ref per run and layer (default 3; the other k have one)")
    d.add_argument("--n", type=int, default=None, help="latents per SAE")
    d.add_argument("--tokens", type=int, default=None, help="kept training tokens per (model, policy, layer)")
    d.add_argument("--eval-tokens", type=int, default=None)
    d.add_argument("--sentences", type=int, default=None, help="world corpus size")
    d.add_argument("--delta-batches", type=int, default=None,
                   help="LM batches per ΔLM round (up to four rounds, until SE < 0.1·|ΔLM|)")
    d.add_argument("--concept-batches", type=int, default=None)
    d.add_argument("--steer-layers", type=int, nargs="*", default=None,
                   help="blocks of the steering section (none: no steering; default 1 4 6 or the middle --layers)")
    d.add_argument("--steer-prompts", type=int, default=None)
    d.set_defaults(func=run_from_args)
    return d


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """The demo's settings: ``--quick``'s or the full ones, with the options given. A ``--k`` without the
    config's ``k_ref`` shows its smallest k; ``--layers`` keeps the default steered and replayed blocks that it
    contains (else steers its middle block and replays all of it) unless ``--steer-layers`` says otherwise."""
    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    overrides = {"layers": args.layers, "ks": args.k, "n_latents": args.n, "train_tokens": args.tokens,
                 "eval_tokens": args.eval_tokens, "sentences": args.sentences, "delta_batches": args.delta_batches,
                 "concept_batches": args.concept_batches, "k_ref": args.k_ref,
                 "sae_seeds": args.sae_seeds}
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
    if "delta_batches" in overrides:
        overrides["delta_max_batches"] = 4 * overrides["delta_batches"]
    return dataclasses.replace(cfg, **overrides)


def run_from_args(args: argparse.Namespace) -> int:
    """Run the demo into ``--out`` (checked first: not a file) and say what it wrote."""
    out = out_dir(args.out)
    results = run_demo(out, config_from_args(args))
    print(f"wrote {out / 'report.md'} (+ results.json, " + ", ".join(sorted(p.name for p in out.glob("*.png")))
          + ") in "
          f"{results['timings_s']['total'] / 60:.1f} min")
    return 0
