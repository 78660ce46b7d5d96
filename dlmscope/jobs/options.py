"""The command-line options several verbs share, defined once, and the loading they drive.

Each job module adds its own subcommand (``add_parser``); an option more than one verb takes comes from
:data:`SHARED` through :func:`add_option`, a verb overriding what differs for it (a default, the help).
:func:`add_text_options` is the text-source group of ``train``, ``eval`` and ``dashboard``;
:func:`text_from_args` reads what it names (:mod:`dlmscope.jobs.sources`), :func:`load_model_layer_sae` loads
``--model``, ``--layer`` and ``--sae``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from dlmscope import models
from dlmscope.interp.judges import JudgeRejected, JudgeUnreachable
from dlmscope.sae.topk import TopKSAE
from dlmscope.world import LM_BATCH, SEQ_LEN
from .sources import token_batches

__all__ = ["USER_ERRORS", "SHARED", "positive_int", "positive_float", "nonnegative_float", "out_dir", "out_file",
           "add_option", "add_text_options", "text_from_args", "load_model_layer_sae"]

#: what a verb raises for bad input or a refused service: the CLI prints it as one line and exits 2
USER_ERRORS = (ValueError, FileNotFoundError, JudgeRejected, JudgeUnreachable)


def positive_int(text: str) -> int:
    """argparse ``type``: an integer ≥ 1 (argparse prints the option and this message as its one-line error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _float(text: str, ok, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (ok(value) and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number {what}, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse ``type``: a finite number > 0."""
    return _float(text, lambda v: v > 0, "> 0")


def nonnegative_float(text: str) -> float:
    """argparse ``type``: a finite number >= 0."""
    return _float(text, lambda v: v >= 0, ">= 0")


def out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` as an output folder, checked before any work starts: it (or a folder above it) must not be a file.

    Raises ValueError naming ``flag``; makes nothing (the job makes the folder when it has something to write)."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise ValueError(f"{flag} {str(path)!r}: {str(p)!r} is a file, not a folder")
    return path


def out_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``path`` as an output file, checked before any work starts: not a folder, its parent not a file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a folder; give a file name")
    out_dir(path.parent, flag)
    return path


#: flag -> its ``add_argument`` keywords, for every option several verbs take
SHARED: dict[str, dict] = {
    "--model": dict(required=True, help="model directory (LLaDA / Dream / Llama / Qwen2 format)"),
    "--corpus": dict(default="world",
                     help="'world' (embedded corpus), a .txt file (a document per line), a .jsonl/.json/.parquet/"
                          ".csv file or a dataset directory (streamed with `datasets`)"),
    "--text-field": dict(default="text", help="the documents' field in a dataset"),
    "--split": dict(default="train", help="the dataset split to read"),
    "--sentences": dict(type=positive_int, default=20000, help="world corpus size to draw from"),
    "--seq-len": dict(type=positive_int, default=SEQ_LEN),
    "--lm-batch": dict(type=positive_int, default=LM_BATCH, help="sequences per model forward"),
    "--batch-size": dict(type=positive_int, default=1024, help="activations per SAE batch"),
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
