"""One harvest-and-train path: harvest several layers of a model once, train a k sweep of Top-K SAEs per layer;
and the ``dlmscope train`` verb (:func:`add_parser`, :func:`run_from_args`).

``dlmscope train``, the demo and the pipeline benchmark all call :func:`train_sweep`:

    spec = SweepSpec(layers=(1, 16), ks=(50, 80, 160), n_latents=16384, policy="mask", tokens=150_000_000)
    train, held = text_batches("corpus.jsonl", adapter.tokenizer, seq_len=2048, lm_batch=8)
    saes = train_sweep(adapter, train, spec, TrainConfig(lr=3e-4), cache_dir="runs/x/activation_cache")
    held_acts = heldout_activations(adapter, held, spec, tokens=2_000_000)      # {layer: [N, d]}

One :class:`~dlmscope.data.activations.ActivationStream` runs the model (truncated after the deepest layer) once per
LM batch for every layer; with several layers the activations go to a disk cache the per-layer trainers
replay, so the model runs once in all. All SAEs of a layer train together in one grouped
:class:`~dlmscope.train.trainer.Trainer` on ``tokens`` kept activations. Every random choice is seeded from
``spec.seed``: the corruption and shuffle (the stream's seed), each SAE's initialisation (a generator seeded
per layer, see :func:`make_saes`) and the trainer (``TrainConfig.seed``).

Under ``torchrun`` the same call is distributed: each data rank harvests its round-robin slice of the LM batches
with its own stream seed (:mod:`dlmscope.data.ranks`) and trains on its own activations; with
``latent_parallel=R`` every SAE is sharded by latent over R ranks (:mod:`dlmscope.train.latent_trainer`: shards
initialised directly, the same SAE for every R; sharded checkpoints), the R ranks of a latent group harvesting the
same rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from dlmscope import models
from dlmscope.util import atomic
from dlmscope.util import distributed as D
from dlmscope.data.activations import ActivationStream, check_policy
from dlmscope.data.ranks import rank_stream
from dlmscope.train.latent_parallel import LatentShard, ProcessGrid, make_grid
from dlmscope.train.latent_trainer import LatentParallelTrainer, gather_saes
from dlmscope.train.normalization import NORMALIZATIONS
from dlmscope.data.noise import T_MAX, T_MIN
from dlmscope.sae import CLASSES, SAEConfig
from dlmscope.sae.matryoshka import default_prefixes
from dlmscope.sae.metrics import evaluate_sae
from dlmscope.sae.topk import TopKSAE
from dlmscope.data.shuffle import collect
from dlmscope.train.trainer import TrainConfig, Trainer
from dlmscope.train.log import LogConfig
from .options import add_option, add_text_options, nonnegative_float, out_dir, positive_int, text_from_args
from .sources import source_identity

__all__ = ["SweepSpec", "default_prefixes", "make_saes", "make_shards", "training_stream", "train_sweep", "heldout_activations",
           "TRAIN_BYTES_PER_PARAM", "check_sae_memory", "add_parser", "run_from_args"]

#: bytes per SAE parameter while it trains: the fp32 weight, its gradient and Adam's two moments
TRAIN_BYTES_PER_PARAM = 16


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """What to harvest and which SAEs to train on it."""

    layers: tuple[int, ...]
    ks: tuple[int, ...]
    n_latents: int
    policy: str = "mask"
    #: kept training activations per layer
    tokens: int = 200_000
    #: activations per SAE batch
    batch_size: int = 1024
    #: shuffle-buffer rows (None: max(64 · batch_size, 65536))
    buffer_tokens: int | None = None
    t_min: float = T_MIN
    t_max: float = T_MAX
    seed: int = 0
    #: the SAE architecture (a key of :data:`dlmscope.sae.CLASSES`) and, for ``matryoshka``, its nested
    #: dictionary sizes (default :func:`default_prefixes`)
    arch: str = "topk"
    prefixes: tuple[int, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))
        check_policy(self.policy)
        if self.arch not in CLASSES:
            raise ValueError(f"arch must be one of {sorted(CLASSES)}, got {self.arch!r}")
        if self.prefixes is not None and self.arch != "matryoshka":
            raise ValueError(f"prefixes are for arch 'matryoshka' only, not {self.arch!r}")
        if self.arch == "matryoshka":
            prefixes = default_prefixes(self.n_latents) if self.prefixes is None else self.prefixes
            object.__setattr__(self, "prefixes", tuple(int(m) for m in prefixes))
            SAEConfig(d=1, n=self.n_latents, k=1, arch=self.arch, prefixes=list(self.prefixes))  # ValueError if bad
        if not self.layers or not self.ks:
            raise ValueError("SweepSpec needs at least one layer and one k")
        if len(set(self.ks)) != len(self.ks):  # two SAEs of one k would be trained and saved to one folder
            raise ValueError(f"duplicate k in ks={list(self.ks)}: give each k once")
        if max(self.ks) > self.n_latents or min(self.ks) < 1:
            raise ValueError(f"every k must lie in [1, n_latents={self.n_latents}], got ks={list(self.ks)}")
        if self.tokens < 1 or self.batch_size < 1:
            raise ValueError(f"tokens and batch_size must be positive, got {self.tokens}, {self.batch_size}")

    @property
    def buffer(self) -> int:
        return self.buffer_tokens if self.buffer_tokens is not None else max(64 * self.batch_size, 65536)


def make_saes(d: int, spec: SweepSpec, layer: int, meta: dict | None = None) -> list[TopKSAE]:
    """The k sweep of one layer (SAEs of ``spec.arch``), initialised from one generator seeded by
    ``(spec.seed, layer)`` only."""
    init = torch.Generator().manual_seed(spec.seed * 1009 + layer)
    meta = {"layer": layer, "policy": spec.policy, "hook": "resid_post", **(meta or {})}
    extra = {"prefixes": list(spec.prefixes)} if spec.arch == "matryoshka" else {}
    return [CLASSES[spec.arch](d, spec.n_latents, k, generator=init, meta=meta, **extra) for k in spec.ks]


def make_shards(d: int, spec: SweepSpec, layer: int, grid: ProcessGrid, meta: dict | None = None,
                device: torch.device | None = None) -> list[LatentShard]:
    """This rank's latents of the k sweep of one layer (on ``device``), each SAE seeded by ``(spec.seed, layer,
    its index)``."""
    meta = {"layer": layer, "policy": spec.policy, "hook": "resid_post", **(meta or {})}
    lo, hi = grid.bounds(spec.n_latents)
    return [LatentShard.init(d, spec.n_latents, k, lo, hi, seed=(spec.seed * 1009 + layer) * 97 + i, meta=meta,
                             device=device) for i, k in enumerate(spec.ks)]


def training_stream(adapter, token_batches: Iterable, spec: SweepSpec,
                    cache_dir: str | os.PathLike | None = None, *, rank: int = 0, world: int = 1,
                    text_source: Mapping | None = None) -> ActivationStream:
    """The seeded training stream of every layer of ``spec`` (fp32 activations), or data rank ``rank``'s of
    ``world``: its slice of ``token_batches``, its seed and its share of ``spec.tokens``
    (:func:`dlmscope.data.ranks.rank_stream`; rank 0 of 1 is the whole stream). ``text_source`` describes the
    text for the cache (see :class:`~dlmscope.data.activations.ActivationStream`)."""
    return rank_stream(adapter, token_batches, spec.layers, spec.policy, rank=rank, world=world, seed=spec.seed,
                       batch_size=spec.batch_size, buffer_tokens=spec.buffer, t_min=spec.t_min, t_max=spec.t_max,
                       max_tokens=-(-spec.tokens // world), dtype=torch.float32, cache_dir=cache_dir,
                       text_source=text_source)


def train_sweep(adapter, token_batches: Iterable, spec: SweepSpec, train: TrainConfig | None = None, *,
                cache_dir: str | os.PathLike | None = None, checkpoint_root: str | os.PathLike | None = None,
                resume: bool = False, saes: dict[int, Sequence[TopKSAE]] | None = None,
                log: LogConfig | None = None, label: str = "", latent_parallel: int | None = None,
                text_source: Mapping | None = None) -> dict[int, list[TopKSAE]]:
    """Harvest ``spec.layers`` of ``adapter`` from ``token_batches`` and train the k sweep per layer.

    ``token_batches``: a re-iterable of LM batches (see :class:`~dlmscope.data.activations.ActivationStream`).
    ``train``: the trainer recipe; the spec owns the run's length and seed (``total_tokens = spec.tokens``,
    ``seed = spec.seed``), so a ``train`` that sets ``steps`` or ``total_tokens`` is refused.
    ``cache_dir``: required for several layers (the harvest is cached there once and replayed per layer). A
    complete cache there from another harvest (model, text, packing, policy, seed, ...) is refused before any
    training; ``text_source`` describes the text for that check (e.g. :func:`dlmscope.jobs.sources.source_identity`).
    ``checkpoint_root``: trainer checkpoints under ``<root>/layer_<L>/checkpoints``; ``resume`` continues them.
    ``saes``: pre-built SAEs per layer (default :func:`make_saes`). Returns ``{layer: [SAE per k]}``, trained,
    ready for raw activations. ``log``: the trainers' logging (their progress bars read ``train <label> L<layer>``).
    ``latent_parallel``: latent ranks per data group under torchrun (see the module docstring; None or 1 with
    torchrun: data parallel). The returned SAEs are gathered whole on every rank of a latent group; where they do
    not fit, export the sharded checkpoints instead (:func:`dlmscope.train.sharded_checkpoint.export`).
    """
    train = train or TrainConfig()
    if latent_parallel is not None and spec.arch != "topk":
        raise ValueError(f"latent_parallel shards Top-K SAEs only; arch {spec.arch!r} trains data parallel")
    if train.steps is not None or train.total_tokens is not None:
        raise ValueError(f"train_sweep trains spec.tokens={spec.tokens} tokens per layer; leave TrainConfig.steps "
                         f"and total_tokens unset (got steps={train.steps}, total_tokens={train.total_tokens})")
    layers = adapter.check_layers(spec.layers)
    if len(layers) > 1 and cache_dir is None:
        raise ValueError("train_sweep needs a cache_dir to train several layers from one harvest")
    grid = make_grid(latent_parallel or 1, adapter.device) if latent_parallel or D.launched_by_torchrun() else None
    cache, rank, world = cache_dir if len(layers) > 1 else None, 0, 1
    if grid is not None and grid.world > 1:
        # this data rank's slice, seed and token share (so its harvest ends with the run and a cache completes),
        # and a cache of this process's own (no shared writes)
        rank, world = grid.data_rank, grid.data_size
        cache = Path(cache) / f"rank_{D.rank()}" if cache is not None else None
    stream = training_stream(adapter, token_batches, spec, cache, rank=rank, world=world, text_source=text_source)
    stream.check_cache()  # a cache of another harvest is refused now, before any SAE is built or trained
    train = dataclasses.replace(train, total_tokens=spec.tokens, seed=spec.seed)
    source = str(getattr(adapter, "source", ""))
    # what every rank's stream shares (its seed and token share are per rank): joins each run's identity
    harvest = {key: value for key, value in stream.meta().items() if key not in ("source", "seed", "max_tokens")}
    out = {}
    sharded = latent_parallel is not None            # R = 1 too: one process then equals any R on the same text
    for layer in layers:
        layer_saes = None if sharded else (list(saes[layer]) if saes is not None else
                                           make_saes(adapter.d_model, spec, layer, {"model": source}))
        cfg = train
        if checkpoint_root is not None:
            cfg = dataclasses.replace(cfg, checkpoint_dir=str(Path(checkpoint_root) / f"layer_{layer}" / "checkpoints"))
        layer_log = dataclasses.replace(log or LogConfig(), progress_desc=f"train {label or spec.policy} L{layer}")
        if sharded:
            shards = ([LatentShard.from_sae(sae, *grid.bounds(sae.n)) for sae in saes[layer]] if saes is not None
                      else make_shards(adapter.d_model, spec, layer, grid, {"model": source}, adapter.device))
            trainer = LatentParallelTrainer(shards, grid, cfg, log=layer_log)
            trainer.fit(stream.for_layer(layer), resume=resume, data={"harvest": harvest, "layer": layer})
            out[layer] = gather_saes(trainer.saes, grid)
            continue
        Trainer(layer_saes, cfg, log=layer_log).fit(stream.for_layer(layer), resume=resume,
                                                    data={"harvest": harvest, "layer": layer})
        out[layer] = layer_saes
    return out


def heldout_activations(adapter, token_batches: Iterable, spec: SweepSpec, *, tokens: int,
                        batch_size: int | None = None) -> dict[int, Tensor]:
    """``{layer: [N ≤ tokens, d]}`` fp32 held-out activations of every layer of ``spec`` from one harvest, with
    the spec's policy and a corruption seeded differently from training (``spec.seed + 1``)."""
    batch_size = batch_size or spec.batch_size
    stream = ActivationStream(adapter, token_batches, spec.layers, spec.policy, batch_size=batch_size,
                              buffer_tokens=max(16 * batch_size, 16384), seed=spec.seed + 1, t_min=spec.t_min,
                              t_max=spec.t_max, max_tokens=tokens, drop_last=False, dtype=torch.float32)
    return collect(stream)


# ------------------------------------------------------------------------------------------------- the verb
def add_parser(subparsers) -> argparse.ArgumentParser:
    """``dlmscope train``: harvest, train the k sweep of every layer, evaluate on held-out text."""
    t = subparsers.add_parser("train", help="harvest activations and train Top-K SAEs (a k sweep per layer)")
    add_text_options(t)
    add_option(t, "--layers")
    t.add_argument("--policy", default="mask", help="mask | unmask | all | clean")
    t.add_argument("--k", type=positive_int, nargs="+", default=[8, 16, 32],
                   help="the k sweep (each k once; BatchTopK/Matryoshka: mean active per row; JumpReLU: start width)")
    t.add_argument("--arch", choices=sorted(CLASSES), default="topk", help="the SAE architecture")
    t.add_argument("--prefixes", type=positive_int, nargs="+", default=None,
                   help="matryoshka: the nested dictionary sizes, increasing, the last = --n (default n/8 n/4 n/2 n)")
    t.add_argument("--l0-coefficient", type=nonnegative_float, default=TrainConfig.l0_coefficient,
                   help="jumprelu: the L0 penalty's coefficient (see TrainConfig.l0_coefficient)")
    t.add_argument("--l0-warmup", type=int, default=0, help="jumprelu: steps of the coefficient's linear warm-up")
    t.add_argument("--n", "--latents", dest="n", type=positive_int, default=1024,
                   help="latents per SAE (--latents under torchrun, whose parser takes --n for its own --nnodes)")
    t.add_argument("--tokens", type=positive_int, default=200_000, help="training tokens per layer")
    t.add_argument("--eval-tokens", type=positive_int, default=20_000)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--warmup", type=int, default=50)
    t.add_argument("--dead-tokens", type=int, default=100_000)
    t.add_argument("--norm-batches", type=int, default=10)
    t.add_argument("--normalization", choices=NORMALIZATIONS, default="centred",
                   help="activation scale: RMS around the mean (default) or the paper's RMS ('rms')")
    t.add_argument("--buffer-tokens", type=int, default=None,
                   help="shuffle-buffer rows (default max(64·batch, 65536))")
    t.add_argument("--log-every", type=int, default=50)
    t.add_argument("--checkpoint-every", type=int, default=200)
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    t.add_argument("--backend", default=None)
    t.add_argument("--latent-parallel", type=int, default=None, metavar="R",
                   help="under torchrun: shard every SAE's latents over R ranks per data group "
                        "(default: data parallel)")
    add_option(t, "--out")
    t.set_defaults(func=run_from_args)
    return t


def _physical_memory() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_sae_memory(d: int, n: int, ks: Sequence[int], *, latent_parallel: int | None = None,
                     device: torch.device | str = "cpu", flag: str = "--n") -> None:
    """ValueError naming ``flag`` when the k sweep of one layer (``len(ks)`` SAEs of ``n`` latents on ``d``, or
    this rank's ``n / latent_parallel`` of each) cannot train in the memory of ``device``: its fp32 weights,
    gradients and Adam moments (:data:`TRAIN_BYTES_PER_PARAM`) must fit in the machine's physical memory (a CUDA
    device's total memory). A bound no run can beat, so it refuses only the impossible, before any allocation
    fails deep inside the trainer (or a too-large one swaps for hours)."""
    device = torch.device(device)
    if device.type == "cuda":
        have, where = torch.cuda.get_device_properties(device).total_memory, f"{device}'s"
    else:
        have, where = _physical_memory(), "this machine's"
    if have is None:
        return
    latents = -(-n // (latent_parallel or 1))
    need = TRAIN_BYTES_PER_PARAM * len(ks) * (2 * d * latents + latents + d)
    if need > have:
        saes = f"{len(ks)} SAE{'s' if len(ks) > 1 else ''}"
        raise ValueError(f"{flag} {n}: {saes} of {latents} latents on d={d} need about {need / 2**30:.3g} GiB to "
                         f"train (fp32 weights, gradients, Adam moments), more than {where} "
                         f"{have / 2**30:.3g} GiB of memory")


def run_from_args(args: argparse.Namespace) -> int:
    """Train, then (rank 0) save every SAE under ``--out/layer_<L>/k_<k>`` and write ``summary.json``.

    Every argument is checked before the model runs: ``--out`` (not a file), the k sweep (each k once), ``--n``
    (the SAEs fit in memory), the layers, the text source and any activation cache already in ``--out``."""
    out = out_dir(args.out)
    if args.latent_parallel is not None and args.arch != "topk":
        raise ValueError(f"--latent-parallel shards Top-K SAEs only; --arch {args.arch} trains data parallel")
    if args.prefixes is not None and args.arch != "matryoshka":
        raise ValueError(f"--prefixes is for --arch matryoshka, not {args.arch}")
    if args.arch != "jumprelu" and (args.l0_coefficient != TrainConfig.l0_coefficient or args.l0_warmup):
        raise ValueError(f"--l0-coefficient and --l0-warmup are for --arch jumprelu, not {args.arch}")
    repeated = sorted({k for k in args.k if args.k.count(k) > 1})
    if repeated:
        raise ValueError(f"--k {' '.join(map(str, args.k))}: {repeated} given twice; each k trains one SAE, "
                         "saved under its k")
    adapter = models.load(args.model)
    layers = adapter.check_layers(args.layers)
    spec = SweepSpec(layers=tuple(layers), ks=tuple(args.k), n_latents=args.n, policy=args.policy,
                     tokens=args.tokens, batch_size=args.batch_size, buffer_tokens=args.buffer_tokens, seed=args.seed,
                     arch=args.arch, prefixes=None if args.prefixes is None else tuple(args.prefixes))
    check_sae_memory(adapter.d_model, args.n, spec.ks, latent_parallel=args.latent_parallel,
                     device=adapter.device if args.latent_parallel else "cpu")
    train_batches, held_batches = text_from_args(adapter, args)
    text = source_identity(args.corpus, seq_len=args.seq_len, lm_batch=args.lm_batch, text_field=args.text_field,
                           split=args.split, world_sentences=args.sentences, seed=args.seed)
    train = TrainConfig(lr=args.lr, warmup_steps=args.warmup, dead_tokens=args.dead_tokens,
                        norm_batches=args.norm_batches, normalization=args.normalization, backend=args.backend,
                        checkpoint_every=args.checkpoint_every, l0_coefficient=args.l0_coefficient,
                        l0_warmup_steps=args.l0_warmup)
    saes = train_sweep(adapter, train_batches, spec, train, cache_dir=out / "activation_cache",
                       checkpoint_root=out, resume=args.resume, log=LogConfig(log_every=args.log_every),
                       latent_parallel=args.latent_parallel, text_source=text)
    if not D.is_main():  # under torchrun, rank 0 evaluates and writes
        return 0
    # held-out activations of every layer, harvested once and shared by every SAE's evaluation
    held_acts = heldout_activations(adapter, held_batches, spec, tokens=args.eval_tokens)
    summary = {"model": args.model, "policy": args.policy, "corpus": args.corpus, "layers": {}}
    for layer, layer_saes in saes.items():
        summary["layers"][layer] = {}
        for sae in layer_saes:
            sae.eval()  # a threshold architecture evaluates (and is used) with its inference rule
            sae.save(out / f"layer_{layer}" / f"k_{sae.k}")
            metrics = evaluate_sae(sae, held_acts[layer])
            summary["layers"][layer][sae.k] = metrics
            print(f"layer {layer} k={sae.k}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    atomic.write_json(out / "summary.json", summary)
    print(f"wrote {out / 'summary.json'}")
    return 0
