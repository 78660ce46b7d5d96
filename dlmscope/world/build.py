"""Regenerate the embedded world deterministically: ``python -m dlmscope.world.build [--out DIR]``.

Writes under ``DIR`` (default ``dlmscope/world/assets``):

``tokenizer/``         the HF-format word-level tokenizer (``tokenizer.json``, ``tokenizer_config.json``,
                       ``special_tokens_map.json``)
``world.json``         the build config, vocabulary size, corpus statistics, the concept vocabularies and a
                       SHA-256 of every split's texts (so a rebuild can be checked byte for byte)
``corpus_sample.txt``  the first lines of each split (for reading, not for training)
``tasks.jsonl``        the fixed decoding-order / steering evaluation tasks with their answers; ``heldout``
                       says whether the task's full text is held out of training (facts and sums occur in
                       training as whole sentences, so a held-out one tests generalisation, not recall;
                       ``chain3`` never occurs in training); ``neutral`` prompts are for steering, unscored

The corpora themselves are not stored: :func:`build_world` regenerates them from the seed in seconds.
``models/{dlm,ar,ar_matched,instruct,placebo}/`` the tiny trained models (:mod:`dlmscope.world.train_models`):
                       a LLaDA-format masked DLM, its AR init twin and the budget-matched AR twin (Llama format),
                       the instruct twin and the placebo twin (the instruct twin's fine-tuning on base sentences
                       only: the null for model diffing; LLaDA format), each with the tokenizer files; skipped for
                       worlds under ``train_models.MIN_PRETRAIN`` sentences.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass

from . import corpus as C
from .tokenizer import build_tokenizer, save_tokenizer
from .train_models import train_models as _train_models

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    #: pre-training sentences (base DLM and AR twin), before the held-out split
    n_pretrain: int = 800_000
    #: Q&A items for the instruct twin's fine-tuning, before the held-out split
    n_instruct: int = 20_000
    #: sentences of the DLM's annealing corpus (task-rich mix; its held-out side is dropped)
    n_anneal: int = 150_000
    #: fraction of distinct texts held out (the same hash split for both corpora, so a held-out text is
    #: held out everywhere)
    heldout_frac: float = 0.05
    #: packed sequence length for training
    seq_len: int = 64
    #: fixed evaluation tasks (decoding order, steering): 100 per kind
    n_tasks: int = 700
    #: lines per split in corpus_sample.txt
    n_sample_lines: int = 100


@dataclass
class World:
    config: WorldConfig
    train: list
    heldout: list
    instruct_train: list
    instruct_heldout: list
    tasks: list
    #: the DLM's annealing corpus (training side of the hash split only)
    anneal: list = dataclasses.field(default_factory=list)


def build_world(cfg: WorldConfig = WorldConfig()) -> World:
    """Generate every corpus split and the evaluation tasks (pure function of ``cfg``)."""
    pre = C.generate(cfg.n_pretrain, seed=cfg.seed)
    train, heldout = C.split(pre, cfg.heldout_frac, seed=cfg.seed)
    qa = C.generate(cfg.n_instruct, seed=cfg.seed + 1, mix={"qa": 1.0})
    i_train, i_heldout = C.split(qa, cfg.heldout_frac, seed=cfg.seed)
    tasks = C.decoding_tasks(cfg.n_tasks, seed=cfg.seed + 2)
    anneal, _ = C.split(C.generate(cfg.n_anneal, seed=cfg.seed + 3, mix=C.ANNEAL_MIX), cfg.heldout_frac, seed=cfg.seed)
    return World(cfg, train, heldout, i_train, i_heldout, tasks, anneal)


def _digest(samples) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(s.text.encode())
        h.update(b"\n")
    return h.hexdigest()


def train_models(world: World, tokenizer, out_dir: str, log=print, **configs) -> dict:
    """Train the tiny models (LLaDA-format masked DLM, AR twins, instruct and placebo twins) into
    ``out_dir/models/{dlm,ar,ar_matched,instruct,placebo}``; returns their metrics (masked-token accuracy,
    perplexity vs unigram, Q&A accuracy, exact match per task kind), stored as ``world.json["models"]``. See
    :mod:`dlmscope.world.train_models`."""
    return _train_models(world, tokenizer, out_dir, log=log, **configs)


def build(out_dir: str = DEFAULT_OUT, cfg: WorldConfig = WorldConfig(), models: bool = True, log=print,
          **configs) -> dict:
    """Write the world's assets to ``out_dir``; returns the metadata written to ``world.json``. ``configs``
    (``mc=ModelConfig(...)``, ``tc=TrainConfig(...)``) override the models' defaults (short builds in tests)."""
    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    world = build_world(cfg)
    log(f"[world] corpus: {len(world.train)} train / {len(world.heldout)} held-out sentences, "
        f"{len(world.instruct_train)} / {len(world.instruct_heldout)} Q&A ({time.perf_counter() - t0:.1f}s)")

    tok = build_tokenizer(world.train + world.heldout + world.instruct_train + world.instruct_heldout)
    save_tokenizer(tok, os.path.join(out_dir, "tokenizer"))
    log(f"[world] tokenizer: {len(tok)} tokens (mask id {tok.mask_token_id})")

    splits = {"train": world.train, "heldout": world.heldout, "instruct_train": world.instruct_train,
              "instruct_heldout": world.instruct_heldout, "anneal": world.anneal}
    with open(os.path.join(out_dir, "corpus_sample.txt"), "w") as f:
        for name, samples in splits.items():
            f.write(f"# {name}\n")
            for s in samples[:cfg.n_sample_lines]:
                f.write(f"{s.kind}\t{s.text}\n")
    with open(os.path.join(out_dir, "tasks.jsonl"), "w") as f:
        for t in world.tasks:
            f.write(C.task_record(t, C.task_heldout(t, cfg.heldout_frac, cfg.seed)) + "\n")

    model_metrics = train_models(world, tok, out_dir, log=log, **configs) if models else {}

    meta = {
        "config": dataclasses.asdict(cfg),
        "vocab_size": len(tok),
        "special_tokens": {t: tok.convert_tokens_to_ids(t) for t in ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]")},
        "concepts": C.CONCEPTS,
        "concept_groups": C.CONCEPT_GROUPS,
        "stats": {name: C.corpus_stats(s) for name, s in splits.items()},
        "sha256": {name: _digest(s) for name, s in splits.items()} | {"tasks": _digest(world.tasks)},
        "models": model_metrics,
    }
    with open(os.path.join(out_dir, "world.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
        f.write("\n")
    log(f"[world] wrote {out_dir} in {time.perf_counter() - t0:.1f}s")
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dlmscope.world.build", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    p.add_argument("--seed", type=int, default=WorldConfig.seed)
    p.add_argument("--n-pretrain", type=int, default=WorldConfig.n_pretrain)
    p.add_argument("--n-instruct", type=int, default=WorldConfig.n_instruct)
    p.add_argument("--no-models", action="store_true", help="write the corpus files and tokenizer only")
    p.add_argument("--reuse-models", action="store_true",
                   help="load models already under --out instead of training them again (the missing ones train)")
    a = p.parse_args(argv)
    cfg = WorldConfig(seed=a.seed, n_pretrain=a.n_pretrain, n_instruct=a.n_instruct)
    build(a.out, cfg, models=not a.no_models, reuse=a.reuse_models)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
