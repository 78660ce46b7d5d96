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

This module only parses and dispatches: each verb's module adds its subcommand (``add_parser(subparsers)``,
which sets ``func``) and runs it (:mod:`dlmscope.jobs.train`, :mod:`~dlmscope.jobs.eval`,
:mod:`dlmscope.demo.cli`, :mod:`~dlmscope.jobs.steer`, :mod:`~dlmscope.jobs.order`, :mod:`~dlmscope.jobs.transfer`,
:mod:`~dlmscope.jobs.dashboard`); the options several verbs share are in :mod:`dlmscope.jobs.options`.
"""
from __future__ import annotations

import argparse
import sys

from dlmscope.demo import cli as demo
from dlmscope.jobs import dashboard, order, steer, train, transfer
from dlmscope.jobs import eval as eval_
from dlmscope.jobs.options import USER_ERRORS

#: the verbs' modules, in the order ``dlmscope --help`` lists them
VERBS = (train, eval_, demo, steer, order, transfer, dashboard)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dlmscope", description="SAE interpretability for diffusion LMs")
    sub = parser.add_subparsers(dest="command", required=True)
    for verb in VERBS:
        verb.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"dlmscope {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
