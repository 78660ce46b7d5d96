"""The command-line options several verbs share, defined once, and the loading they drive.

Each job module adds its own subcommand (``add_parser``); an option more than one verb takes comes from
:data:`SHARED` through :func:`add_option`, a verb overriding what differs for it (a default, the help).
:func:`add_text_options` is the text-source group of ``train``, ``eval`` and ``dashboard``;
:func:`text_from_args` reads what it names (:mod:`dlmscope.jobs.sources`), :func:`load_model_layer_sae` loads
``--model``, ``--layer`` and ``--sae``.
"""
from __future__ import annotations

import argparse

from dlmscope import models
from dlmscope.interp.judges import JudgeRejected, JudgeUnreachable
from dlmscope.sae.topk import TopKSAE
from dlmscope.world import LM_BATCH, SEQ_LEN
from .sources import token_batches

__all__ = ["USER_ERRORS", "SHARED", "add_option", "add_text_options", "text_from_args", "load_model_layer_sae"]

#: what a verb raises for bad input or a refused service: the CLI prints it as one line and exits 2
USER_ERRORS = (ValueError, FileNotFoundError, JudgeRejected, JudgeUnreachable)

#: flag -> its ``add_argument`` keywords, for every option several verbs take
SHARED: dict[str, dict] = {
    "--model": dict(required=True, help="model directory (LLaDA / Dream / Llama / Qwen2 format)"),
    "--corpus": dict(default="world",
                     help="'world' (embedded corpus), a .txt file (a document per line), a .jsonl/.json/.parquet/"
                          ".csv file or a dataset directory (streamed with `datasets`)"),
    "--text-field": dict(default="text", help="the documents' field in a dataset"),
    "--split": dict(default="train", help="the dataset split to read"),
    "--sentences": dict(type=int, default=20000, help="world corpus size to draw from"),
    "--seq-len": dict(type=int, default=SEQ_LEN),
    "--lm-batch": dict(type=int, default=LM_BATCH, help="sequences per model forward"),
    "--batch-size": dict(type=int, default=1024, help="activations per SAE batch"),
    "--seed": dict(type=int, default=0),
    "--sae": dict(required=True),
    "--layer": dict(type=int, required=True),
    "--layers": dict(type=int, nargs="+", required=True),
    "--out": dict(required=True),
}


def add_option(parser: argparse.ArgumentParser, flag: str, **overrides) -> argparse.Action:
    """Add the shared option ``flag`` (:data:`SHARED`) to ``parser``, with ``overrides`` of its keywords."""
    return parser.add_argument(flag, **{**SHARED[flag], **overrides})


def add_text_options(parser: argparse.ArgumentParser) -> None:
    """``--model`` and where its text comes from: ``--corpus --text-field --split --sentences --seq-len
    --lm-batch``, with ``--batch-size`` (activations per SAE batch) and ``--seed``."""
    for flag in ("--model", "--corpus", "--text-field", "--split", "--sentences", "--seq-len", "--lm-batch",
                 "--batch-size", "--seed"):
        add_option(parser, flag)


def text_from_args(adapter, args: argparse.Namespace):
    """``(train, heldout)`` LM batches of ``--corpus`` (see :mod:`dlmscope.jobs.sources`)."""
    return token_batches(args.corpus, adapter.tokenizer, seq_len=args.seq_len, lm_batch=args.lm_batch,
                         text_field=args.text_field, split=args.split, world_sentences=args.sentences, seed=args.seed)


def load_model_layer_sae(args: argparse.Namespace):
    """``(adapter, layer, sae)`` from ``--model``, ``--layer`` and ``--sae``, the layer checked."""
    adapter = models.load(args.model)
    return adapter, adapter.check_layer(args.layer), TopKSAE.load(args.sae)
