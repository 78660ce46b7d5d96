"""The ``dlmscope eval`` job: one trained SAE on held-out text of its model — FVE, L0 and dead latents
(:func:`dlmscope.sae.metrics.evaluate_sae`) under a policy, and the ΔLM loss of splicing it in
(:mod:`dlmscope.analysis.splice`: the DLM's for a diffusion model, the AR one for a causal model), printed as JSON.
ΔLM is the paper's pooled estimator with its SE over batches and the per-batch mean beside it
(:func:`~dlmscope.analysis.splice.delta_loss_over_batches`); a DLM's masking rates are stratified by default (the
SE then over collapsed strata).

    dlmscope eval --model DIR --sae runs/x/layer_1/k_8 --layer 1 --tokens 20000 [--out eval.json]
"""
from __future__ import annotations

import argparse
import itertools
import json

from dlmscope.analysis.splice import delta_loss_over_batches
from dlmscope.data.activations import ActivationStream
from dlmscope.sae.metrics import evaluate_sae
from dlmscope.util import atomic
from .options import (add_option, add_text_options, load_model_layer_sae, out_file, positive_float,
                      positive_int, text_from_args)

__all__ = ["add_parser", "run_from_args"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    """``dlmscope eval``: the metrics and ΔLM of one SAE."""
    e = subparsers.add_parser("eval", help="FVE / L0 / dead and delta-LM of a trained SAE")
    add_text_options(e)
    add_option(e, "--sae", help="SAE directory (any supported format)")
    add_option(e, "--layer")
    e.add_argument("--policy", default=None, help="default: mask for DLMs, clean for AR models")
    e.add_argument("--tokens", type=positive_int, default=20_000)
    e.add_argument("--loss-batches", type=positive_int, default=4,
                   help="LM batches of the ΔLM (with --rel-se: the most it may use)")
    e.add_argument("--rel-se", type=positive_float, default=None,
                   help="evaluate the ΔLM in rounds of a quarter of --loss-batches until its SE is below this "
                        "fraction of |ΔLM| (e.g. 0.1), or the batches run out (then se_target_met is false)")
    e.add_argument("--t-sampling", choices=("stratified", "iid"), default="stratified",
                   help="DLM masking rates over the loss batches: one per stratum of [0.05, 0.5] (default) or "
                        "U[0.05, 0.5] per batch (the paper's)")
    add_option(e, "--out", required=False, default=None, help="also write the JSON here")
    e.set_defaults(func=run_from_args)
    return e


def run_from_args(args: argparse.Namespace) -> int:
    """Evaluate ``--sae`` at ``--layer`` on ``--tokens`` held-out activations and ``--loss-batches`` LM batches;
    print the JSON (and write it to ``--out``, checked first). Non-finite numbers are written as ``null``."""
    out = out_file(args.out) if args.out else None
    adapter, layer, sae = load_model_layer_sae(args)
    _, held_batches = text_from_args(adapter, args)
    policy = args.policy if args.policy is not None else \
        ("mask" if adapter.is_diffusion and adapter.mask_token_id is not None else "clean")
    stream = ActivationStream(adapter, held_batches, [layer], policy, batch_size=args.batch_size,
                              buffer_tokens=max(args.batch_size * 4, 4096), seed=args.seed, max_tokens=args.tokens,
                              drop_last=False)
    result = {"sae": args.sae, "layer": layer, "policy": policy, **evaluate_sae(sae, stream.for_layer(layer))}
    batches = list(itertools.islice(held_batches, args.loss_batches))
    # dlm_delta_loss names a missing mask token (DiffusionGemma) itself
    key = "dlm_delta" if adapter.is_diffusion else "ar_delta"
    result[key] = delta_loss_over_batches(adapter, [sae], layer, batches, seed=args.seed,
                                          t_sampling=args.t_sampling, target_rel_se=args.rel_se)[0]
    print(json.dumps(atomic.nan_to_null(result), indent=2))
    if out is not None:
        atomic.write_json(out, result)
    return 0
