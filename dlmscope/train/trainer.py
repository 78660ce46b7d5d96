"""Trainer: several SAEs on one activation stream, the DLM-Scope paper's recipe for Top-K (docs/reference.md §2).

    trainer = Trainer([TopKSAE(d, n, k) for k in (50, 80, 160, 320, 520, 820)], TrainConfig(total_tokens=...),
                      log=LogConfig(log_every=100))
    saes = trainer.fit(stream)          # stream yields [B, d] float tensors; returns the trained SAEs

Any mix of :class:`TopKSAE`, ``BatchTopKSAE``, ``JumpReLUSAE`` and ``MatryoshkaSAE`` trains on one stream, each
with its architecture's loss and dead-latent handling (:mod:`.arch_step`; the recipe below is the Top-K one, which
the others share except for their loss terms, their threshold, and — JumpReLU — no AuxK). Another SAE class is
refused (TypeError naming it).

Recipe, per step and per SAE (docs/design.md "Trainer"); :class:`TrainConfig` holds it, :class:`LogConfig` only says
what is logged where:

- loss = ``mean_b |x - x_hat|^2`` (sum over d) + ``auxk_alpha * AuxK``. AuxK: the top ``k_aux = min(d/2, n)``
  relu'd pre-activations among *dead* latents (zero-padded when fewer are dead), decoded without ``b_dec``,
  regress the detached residual ``e = x - x_hat``; normalised by ``sum_b |e_b - mean_b e|^2``; multiplied by
  ``(n_dead > 0)``. Its gradient reaches the encoder and the decoder.
- dead latents: a device counter "tokens since last fired" per latent (fired = value > 0 in this step's top-k),
  dead when ``>= dead_tokens``. The AuxK selection of a step uses the counters after the previous step.
- backward; remove from each ``W_dec`` gradient row its component along the row; clip the SAE's global grad
  norm to ``grad_clip``; ``torch.optim.Adam`` (fused where supported) for ``W_enc, b_enc, b_dec``;
  :func:`dlmscope.ops.decoder_norm_step` (projection + Adam + renormalisation, fused) for ``W_dec``.
- lr: linear warmup from 0, constant, linear decay to 0 over the last ``decay_fraction`` (:mod:`.schedule`).
- init: ``b_dec`` = geometric median (Weiszfeld) of the first (normalised, global) batch; ``W_enc = W_dec`` and
  ``b_enc = 0`` come from :class:`TopKSAE`'s own initialisation.
- normalisation: one scalar ``s`` over the first ``norm_batches`` batches (buffered, then trained on), training
  on ``x / s``: by default the root of the total variance ``sqrt(mean |x - mean x|^2)``, or the paper's
  ``sqrt(mean |x|^2)`` (``normalization="rms"``; :mod:`.normalization` says why they differ); at the end ``b_enc``
  and ``b_dec`` are multiplied by ``s`` so the returned SAEs run on raw activations (top-k commutes with positive
  scaling: the raw SAE's codes are ``s`` times the normalised ones and its reconstruction is ``s * x_hat'``); ``s``
  is recorded in ``sae.cfg.meta["norm_factor"]``.

Layout: this module holds the run (init, the step as a sequence of phases, checkpoints); :mod:`.config` the
recipe; :mod:`.step` the phases of a step over small dataclasses; :mod:`.arch_step` those of the other
architectures; :mod:`.batches` the checked, rank-agreed batches; :mod:`.log` the logging options and sinks (tqdm,
wandb, TensorBoard).

Grouping: Top-K SAEs sharing device and dtype run their encoders as ONE :func:`dlmscope.ops.topk_encode_grouped` call
(stacked ``W_enc``, each SAE's ``b_dec`` folded into its bias as ``b_enc - W_enc @ b_dec``; autograd carries the
gradients back to every SAE's own parameters). Decoders stay per SAE. ``group_encoders=False`` makes one op call
per SAE (same maths, for comparison).

Host syncs: none inside a Top-K step except at log / checkpoint steps (ops' value checks are switched off; the
stream is checked for NaN/Inf per batch on CPU, where the check costs no sync, and through a device flag checked at
log / checkpoint steps and at the end elsewhere); the other architectures' rules sync a few times per step (their
code widths depend on the data). Under torch.distributed one small all-reduce per step decides
whether every rank still has a batch (it carries the batch sizes and the NaN flag), which syncs once per step.

Distributed (``torchrun``; :mod:`dlmscope.util.distributed`): gradients are all-reduced so that the update is the
one of the global batch (the per-rank loss is its share of the global-batch mean; the AuxK normaliser uses global sums),
fired masks are merged (OR) and token counts summed, the norm factor and the geometric median use the global
batch, rank 0 writes checkpoints, and training stops when any rank's stream is exhausted. BatchTopK and Matryoshka
SAEs select their batch-level top-k per rank (:mod:`.arch_step` says what holds under DDP).

Resume: ``fit(stream, resume=True)`` continues from the latest checkpoint in ``checkpoint_dir`` (or
``resume_from=path``), skipping the batches already trained on from the re-created (deterministic) stream.
A damaged latest checkpoint is skipped for the newest intact one, with a warning. Each checkpoint records the run's
identity (:func:`.checkpoint.run_fields`: recipe, SAEs, world size, ``fit(..., data=...)``): a fresh run refuses a
``checkpoint_dir`` holding checkpoints already, a resume refuses another run's checkpoint naming what differs, and
a malformed checkpoint raises ``ValueError`` / ``FileNotFoundError`` naming the file before any state is set.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from . import checkpoint as ckpt
from dlmscope.util import distributed as D
from dlmscope import ops
from .geometric_median import geometric_median
from .normalization import norm_factor
from dlmscope.sae.topk import TopKSAE
from .schedule import lr_at
from .log import LogConfig, Trackers
from .step import SAEOptimizer, backward, make_groups, reduce_across_ranks, sae_loss, step_metrics, terms_by_sae
from . import arch_step
from .config import TrainConfig
from .batches import CheckedBatches

__all__ = ["TrainConfig", "LogConfig", "Trainer"]


class Trainer:
    """Trains a list of SAEs (:class:`TopKSAE` and the architectures of :mod:`.arch_step`) on one activation
    stream (see the module docstring).

    ``cfg`` is the recipe (default: the paper's), ``log`` where metrics go (default: a progress bar and a
    history entry every 100 steps). After :meth:`fit`: ``history`` (one record per log step), ``step``,
    ``tokens_seen``, ``norm_factor``, ``last_checkpoint``.
    """

    def __init__(self, saes: list[TopKSAE] | TopKSAE, cfg: TrainConfig | None = None, *,
                 log: LogConfig | None = None):
        saes = self._check_saes(saes)
        ds = {s.d for s in saes}
        if len(ds) != 1:
            raise ValueError(f"all SAEs of one stream must share d, got d values {sorted(ds)}")
        if cfg is not None and not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
        if log is not None and not isinstance(log, LogConfig):
            raise TypeError(f"log must be a LogConfig, got {type(log).__name__}")
        self.saes = saes
        self.cfg = cfg if cfg is not None else TrainConfig()
        self.log = log if log is not None else LogConfig()
        self.d = saes[0].d
        self.history: list[dict] = []
        self.step = 0                 # optimisation steps done (== batches trained on, per rank)
        self.total_steps: int | None = None
        self.tokens_seen = 0          # global tokens trained on
        self.norm_factor: float | None = None
        self.last_checkpoint: Path | None = None
        #: the ranks that split each global batch (None: all; a latent-parallel grid's data group)
        self.data_group = None
        self._pulled = 0              # index of the next raw batch to pull from this rank's stream
        self._batches: CheckedBatches | None = None
        self._fitted = False
        self.data_identity = None     # what the stream is (fit(..., data=...)): part of the run's identity
        self._loaded: tuple[Path, dict[str, Tensor], dict] | None = None  # a checkpoint read while choosing it
        cfg = self.cfg
        self.k_aux = [min(cfg.k_aux if cfg.k_aux is not None else self.d // 2, s.n) for s in saes]
        compute_dtype = getattr(torch, cfg.autocast_dtype) if cfg.autocast_dtype is not None else None
        self.groups, self.optimizers = self._build(compute_dtype)

    # ---- hooks a parallel trainer replaces (dlmscope.train.latent_trainer) ------------------------------------------
    @staticmethod
    def _check_saes(saes) -> list:
        if isinstance(saes, TopKSAE):
            saes = [saes]
        saes = list(saes)
        if not saes:
            raise TypeError("saes must be a non-empty list of SAEs (TopKSAE, BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE)")
        arch_step.check_trainable(saes)
        return saes

    def _build(self, compute_dtype: torch.dtype | None) -> tuple[list, list[SAEOptimizer]]:
        """The encoder groups (Top-K groups, then one per SAE of another architecture) and one optimiser per SAE."""
        cfg = self.cfg
        groups = make_groups(self.saes, self.k_aux, grouped=cfg.group_encoders, compute_dtype=compute_dtype,
                             backend=cfg.backend)
        groups += arch_step.make_arch_groups(self.saes, self.k_aux, compute_dtype=compute_dtype, backend=cfg.backend)
        return groups, [SAEOptimizer(s, cfg.lr, cfg.betas, cfg.eps, cfg.grad_clip, cfg.backend) for s in self.saes]

    def _checked_batches(self, it: Iterator, **options) -> CheckedBatches:
        """This rank's stream as checked, rank-agreed batches (from stream position ``_pulled``); ``options`` go
        to :class:`CheckedBatches`."""
        return CheckedBatches(it, d=self.d, device=self.device, dtype=self.saes[0].W_dec.dtype,
                              nan_check=self.cfg.nan_check, index=self._pulled, latents=[s.n for s in self.saes],
                              **options)

    @property
    def device(self) -> torch.device:
        return self.saes[0].W_dec.device

    # ---- one step ---------------------------------------------------------------------------------------------
    def _train_step(self, x: Tensor, batch_total: int, log: bool) -> dict | None:
        """One optimisation step on this rank's ``x`` [B, d] (``batch_total`` global rows); the record if ``log``."""
        cfg = self.cfg
        lr = lr_at(self.step, self.total_steps, cfg.lr, cfg.warmup_steps, cfg.decay_fraction)
        # a counter can reach dead_tokens only once that many tokens were seen: until then AuxK is exactly 0
        aux_on = cfg.auxk_alpha > 0 and self.tokens_seen >= cfg.dead_tokens
        xs = x / self.norm_factor if self.norm_factor is not None else x

        # encode per group -> each SAE's terms -> one cross-rank reduction -> losses -> backward (gradients summed
        # over ranks) -> per-SAE update -> dead counters (see dlmscope.train.step for the shapes)
        codes = [group.encode(xs, auxk=aux_on, dead_tokens=cfg.dead_tokens) for group in self.groups]
        terms = terms_by_sae(self.groups, xs, codes)
        sums = reduce_across_ranks(self.groups, codes, terms, self.device, self.data_group)
        l0_weight = cfg.l0_weight_at(self.step, self.d)  # JumpReLU's L0 penalty (its terms alone carry an L0)
        losses = [sae_loss(t, r, batch_total, cfg.auxk_alpha, l0_weight) for t, r in zip(terms, sums.residual_sums)]
        backward(losses, self.saes, self.data_group)
        for sae, optimizer in zip(self.saes, self.optimizers):
            optimizer.step(sae, lr, self.step + 1)
        for group, fired in zip(self.groups, sums.fired):
            group.count_tokens(fired, batch_total)
        self.step += 1
        self.tokens_seen += batch_total

        if not log:
            return None
        return {"step": self.step, "tokens": self.tokens_seen, "lr": lr,
                "sae": step_metrics(xs, self.saes, self.groups, terms, losses, cfg.dead_tokens)}

    # ---- fit ---------------------------------------------------------------------------------------------------
    def fit(self, stream: Iterable[Tensor], *, resume: bool = False, resume_from: str | Path | None = None,
            data=None) -> list[TopKSAE]:
        """Train on ``stream`` (an iterable of [B, d] tensors); returns the SAEs, ready for raw activations.

        ``resume=True`` continues from the latest intact checkpoint in ``cfg.checkpoint_dir`` if there is one
        (else starts fresh, refusing a ``checkpoint_dir`` holding checkpoints); ``resume_from`` names a checkpoint
        directory. The stream must then be the same, re-created stream: the batches already trained on are skipped.
        ``data`` (JSON: what the stream is, e.g. model, text, harvest settings) joins the run's identity.
        """
        if self._fitted:
            raise RuntimeError("this Trainer has already fitted its SAEs (their biases are rescaled to raw "
                               "activations); make a new Trainer to train further")
        cfg = self.cfg
        self.data_identity = json.loads(json.dumps(data, sort_keys=True, allow_nan=False))  # plain JSON, or raise
        D.maybe_init(self.device)
        path = Path(resume_from) if resume_from is not None else None
        if path is None and resume and cfg.checkpoint_dir:
            path = self._latest_checkpoint()
        fresh = path is None
        if not fresh:
            self.load_checkpoint(path)
        if cfg.checkpoint_dir:  # after the load: a resume checks the folder's other checkpoints against this run
            self._claim_checkpoint_dir(path)
        if fresh:
            if cfg.seed is not None:
                random.seed(cfg.seed)
                np.random.seed(cfg.seed)
                torch.manual_seed(cfg.seed + D.rank())
            self._broadcast_params()

        it = iter(stream)
        for skipped in range(self._pulled):  # batches trained on before the checkpoint
            try:
                next(it)
            except StopIteration:
                raise ValueError(f"the stream ended after {skipped} batches, but the checkpoint {path} had "
                                 f"consumed {self._pulled}: is it the same stream?") from None
        self._batches = self._checked_batches(it)
        with ops.value_checks(False):
            self._run(stream, iter(self._batches), fresh)
        self._finish()
        return self.saes

    def _run(self, stream, batches: Iterator[tuple[Tensor, int]], fresh: bool) -> None:
        """Set the length and the init, then step until ``total_steps`` or the end of the stream."""
        pending = self._prepare(stream, batches, fresh)
        trackers = Trackers(self.log, self.cfg.to_dict(), self.total_steps, self.step, self.tokens_seen)
        try:
            while self.step < self.total_steps:
                nxt = pending.pop(0) if pending else next(batches, None)
                if nxt is None:
                    break
                log = self.log.logs_at(self.step + 1, self.total_steps)
                if log:
                    self._check_deferred()
                record = self._train_step(*nxt, log)
                trackers.advance()
                if record is not None:
                    self.history.append(record)
                    trackers.emit(record)
                every = self.cfg.checkpoint_every
                if every and self.step % every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            trackers.close()
        self._check_deferred()
        self.save_checkpoint()

    def _prepare(self, stream, batches: Iterator[tuple[Tensor, int]], fresh: bool) -> list[tuple[Tensor, int]]:
        """``total_steps``, and on a fresh run the norm factor and ``b_dec``; returns the batches it pulled for
        that (they are trained on first)."""
        cfg = self.cfg
        pending: list[tuple[Tensor, int]] = []
        if self.total_steps is None or (fresh and cfg.normalize_activations) or (fresh and cfg.init_b_dec):
            first = next(batches, None)
            if first is None:
                raise ValueError("the activation stream is empty")
            pending.append(first)
        if self.total_steps is None:
            if cfg.steps is not None:
                self.total_steps = cfg.steps
            elif cfg.total_tokens is not None:
                self.total_steps = max(1, math.ceil(cfg.total_tokens / pending[0][1]))
            elif hasattr(stream, "__len__"):
                self.total_steps = len(stream)
            else:
                raise ValueError("set TrainConfig.steps or total_tokens (the stream has no len())")
        if fresh and cfg.normalize_activations:
            want = min(max(cfg.norm_batches, 1), self.total_steps)
            while len(pending) < want:
                nxt = next(batches, None)
                if nxt is None:
                    break
                pending.append(nxt)
            self._check_deferred()
            self.norm_factor = norm_factor([x for x, _ in pending], cfg.normalization, self.data_group)
        elif fresh:
            self.norm_factor = None
        if fresh and cfg.init_b_dec:
            self._check_deferred()
            x0 = pending[0][0]
            self._init_b_dec(x0 / self.norm_factor if self.norm_factor is not None else x0)
        return pending

    def _check_deferred(self) -> None:
        """Raise if the stream's deferred NaN/Inf flag was set (one host sync)."""
        if self._batches is not None:
            self._batches.check_deferred()

    # ---- init -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _init_b_dec(self, x_first: Tensor) -> None:
        points = D.all_gather_rows(x_first, group=self.data_group)
        median = geometric_median(points, max_iter=self.cfg.geometric_median_iters)
        for s in self.saes:
            s.b_dec.copy_(median.to(device=s.b_dec.device, dtype=s.b_dec.dtype))

    @torch.no_grad()
    def _broadcast_params(self) -> None:
        D.broadcast_([t for s in self.saes for t in arch_step.broadcast_tensors(s)], src=0)

    @torch.no_grad()
    def _finish(self) -> None:
        """Fold the norm factor into the biases and record provenance in each SAE's meta."""
        s = self.norm_factor
        for sae in self.saes:
            if s is not None:
                sae.b_enc.mul_(s)
                sae.b_dec.mul_(s)
                arch_step.fold_norm_factor(sae, s)  # the thresholds scale with the pre-activations
            sae.cfg.meta["norm_factor"] = float(s) if s is not None else 1.0
            sae.cfg.meta["norm_factor_folded"] = True
            sae.cfg.meta["trained_tokens"] = int(self.tokens_seen)
            sae.cfg.meta["trained_steps"] = int(self.step)
        self._fitted = True

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, Tensor]:
        """Everything that determines the next step, by name (:func:`.checkpoint.state_tensors`)."""
        return ckpt.state_tensors(self.saes, self.optimizers, self.groups)

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current state to ``cfg.checkpoint_dir`` (rank 0 writes; all wait, all raise)."""
        if not self.cfg.checkpoint_dir:
            return None
        self._check_deferred()
        D.barrier()
        path, error = Path(self.cfg.checkpoint_dir) / ckpt.checkpoint_name(self.step), None
        if D.is_main():
            try:
                rng_tensors, rng_meta = ckpt.rng_state()
                path = ckpt.save_checkpoint(self.cfg.checkpoint_dir, self.step,
                                            {**self._state_tensors(), **rng_tensors}, self._checkpoint_meta(rng_meta))
            except Exception as e:  # noqa: BLE001 (raised below, once the other ranks know)
                error = e
        self._agree(error, "writing a checkpoint")
        self.last_checkpoint = path
        return path

    def _checkpoint_meta(self, rng_meta: dict) -> dict:
        fields = self._run_fields()
        return {"format": "dlmscope-trainer-checkpoint", "version": 1,
                "step": self.step, "total_steps": self.total_steps, "tokens_seen": self.tokens_seen,
                "batches_consumed": self.step, "norm_factor": self.norm_factor, "world_size": D.world_size(),
                "config": self.cfg.to_dict(), "saes": [s.cfg.to_dict() for s in self.saes], "rng": rng_meta,
                "run": {"id": ckpt.run_identity(fields), "fields": fields}}

    # ---- a run's identity -------------------------------------------------------------------------------------
    def _run_fields(self) -> dict:
        """What decides what this run trains (:func:`.checkpoint.run_fields`)."""
        saes = [{**s.cfg.to_dict(), "dtype": str(s.W_dec.dtype).removeprefix("torch."),
                 **arch_step.identity_fields(s)} for s in self.saes]
        config = arch_step.run_config(self.cfg.to_dict(), self.saes)
        if config["normalization"] == "rms":  # a checkpoint that names no normalization used the paper's
            del config["normalization"]
        return ckpt.run_fields(config, saes, D.world_size(), self.data_identity)

    def _claim_checkpoint_dir(self, resumed: Path | None) -> None:
        """Refuse, on every rank as rank 0 finds, a ``checkpoint_dir`` holding another run's checkpoints."""
        problem = ckpt.checkpoint_dir_problem(self.cfg.checkpoint_dir, self._run_fields(), resumed) \
            if D.is_main() else None
        self._agree(ValueError(problem) if problem else None, "checking the checkpoint_dir")

    def _agree(self, error: Exception | None, what: str) -> None:
        """Raise ``error`` here and a RuntimeError on every other rank (one all-reduce, also a barrier), so that
        no rank is left waiting in a collective."""
        flag = D.all_reduce_(torch.tensor([int(error is not None)], device=self.device), op="max")
        if error is not None:
            raise error
        if int(flag.item()):
            raise RuntimeError(f"another rank failed while {what} (see its error)")

    # ---- resume ------------------------------------------------------------------------------------------------
    def _latest_checkpoint(self) -> Path | None:
        self._loaded = ckpt.newest_intact(self.cfg.checkpoint_dir)  # kept for load_checkpoint
        return self._loaded[0] if self._loaded is not None else None

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore the trainer state (SAEs, optimisers, counters, schedule, RNG, stream position) from ``path``.

        The saved ``config`` is not applied (this trainer's ``cfg`` is); it may hold keys of any age. The checkpoint
        must be this run's (same identity) and well formed; ValueError / FileNotFoundError naming it otherwise."""
        loaded, self._loaded = self._loaded, None
        if loaded is not None and loaded[0] == Path(path):
            self._restore(loaded[1], loaded[2], path)
        else:
            self._restore(*ckpt.load_checkpoint(path), path)

    def _restore(self, tensors: dict[str, Tensor], meta: dict, path: str | Path) -> None:
        """Set the state from a checkpoint's ``tensors`` (named as :meth:`_state_tensors` names them) and ``meta``,
        after checking all of it against this run (nothing is set from a checkpoint that is refused)."""
        ckpt.check_meta(meta, path)
        saved = [(c["d"], c["n"], c["k"]) for c in meta["saes"]]
        ours = [(s.d, s.n, s.k) for s in self.saes]
        if saved != ours:
            raise ValueError(f"checkpoint {path} holds SAEs (d, n, k) = {saved}, but this trainer has {ours}")
        ckpt.check_identity(self._run_fields(), meta, path)
        ckpt.check_state(tensors, self.saes, self.optimizers, self.groups, path)
        ckpt.set_rng_state(tensors, meta.get("rng", {}), f"checkpoint {path}")
        ckpt.set_state(tensors, self.saes, self.optimizers, self.groups)
        self.step = int(meta["step"])
        self.total_steps = meta["total_steps"]
        self.tokens_seen = int(meta["tokens_seen"])
        self.norm_factor = meta["norm_factor"]
        self._pulled = int(meta["batches_consumed"])
        self.last_checkpoint = Path(path)
