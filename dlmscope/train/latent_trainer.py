"""Latent-parallel training: the :class:`~dlmscope.train.trainer.Trainer` recipe on a ``data x latent`` process grid.

    grid = make_grid(latent_size=4)                                  # under torchrun; DeviceMesh("data", "latent")
    shards = [LatentShard.init(d, n, k, *grid.bounds(n), seed=k) for k in (50, 80)]   # only this rank's latents
    trainer = LatentParallelTrainer(shards, grid, TrainConfig(steps=..., checkpoint_dir="ckpt"))
    trainer.fit(stream)       # every rank of a latent group yields the same batches; data ranks split each batch
    saes = gather_saes(trainer.saes, grid)                           # full TopKSAEs (when they fit in memory)

Top-K SAEs only: an SAE or shard of another architecture (BatchTopK, JumpReLU, Matryoshka) is refused with a
ValueError naming it, before any collective; those train data parallel (:mod:`.arch_step`).

The step is the base trainer's phases with the sharded forward of :mod:`.latent_parallel`: gradients summed over
the data group only (the latent group's ranks hold different parameters), fired masks and AuxK sums likewise;
the clip norm of an SAE is summed over its shards (:class:`ShardedSAEOptimizer`); Adam and the fused
decoder-norm step run on the local rows. Only ``latent_rank == 0`` counts its rows into the global batch size,
since the other ranks of its latent group hold the same rows. Every rank still joins the stream's per-step
agreement, so a rank whose stream ends stops every rank.

Checkpoints are sharded (:mod:`.sharded_checkpoint`): data rank 0 of each latent column writes its shard, rank 0
the manifest; resume needs the same grid and the same run (the base trainer's identity check), and is exact. Rank 0
chooses the checkpoint to resume for every rank, skipping damaged newer ones with a warning.
"""
from __future__ import annotations

import json
import warnings
import zlib
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from . import checkpoint as ckpt
from dlmscope.util import distributed as D
from . import sharded_checkpoint as sc
from .latent_parallel import LatentShard, ProcessGrid, ShardedGroup
from dlmscope.sae.topk import PARAMS, TopKSAE
from .trainer import LogConfig, Trainer, TrainConfig
from .step import SAEOptimizer
from .batches import CheckedBatches

__all__ = ["LatentParallelTrainer", "ShardedSAEOptimizer", "gather_saes"]

_SHARDED = ("W_enc", "b_enc", "W_dec")  # split by latent; b_dec is replicated


class ShardedSAEOptimizer(SAEOptimizer):
    """:class:`SAEOptimizer` whose clip norm is the norm of the whole SAE: the sharded gradients' squared norms
    summed over the latent group, plus the replicated ``b_dec`` gradient once."""

    def __init__(self, shard: LatentShard, lr, betas, eps, grad_clip, backend, group):
        super().__init__(shard, lr, betas, eps, grad_clip, backend)
        self.group = group

    def clip_(self, sae: LatentShard) -> None:
        sq = torch.stack([torch.linalg.vector_norm(getattr(sae, p).grad) for p in _SHARDED]).pow(2).sum()
        D.all_reduce_(sq, group=self.group)
        total = (sq + torch.linalg.vector_norm(sae.b_dec.grad).pow(2)).sqrt()
        coef = torch.clamp(self.grad_clip / (total + 1e-6), max=1.0)  # the formula of clip_grad_norm_
        for p in PARAMS:
            getattr(sae, p).grad.mul_(coef)


class LatentParallelTrainer(Trainer):
    """Trains this rank's :class:`LatentShard` s (one per SAE, bounds ``grid.bounds(n)``) on ``grid``.

    After :meth:`fit`, ``saes`` are the shards, trained and rescaled to raw activations."""

    def __init__(self, shards: list[LatentShard], grid: ProcessGrid, cfg: TrainConfig | None = None, *,
                 log: LogConfig | None = None):
        if not isinstance(grid, ProcessGrid):
            raise TypeError(f"grid must be a ProcessGrid (dlmscope.train.latent_parallel.make_grid), "
                            f"got {type(grid).__name__}")
        self.grid = grid
        super().__init__(shards, cfg, log=log)
        self._check_grid()
        self.data_group = grid.data_group
        self._replicas_checked = False

    def _check_grid(self) -> None:
        """Raise on EVERY rank (one small all-gather over the world, so no rank is left waiting in a collective)
        unless each rank holds its grid bounds of every SAE and all ranks agree on the SAEs' (n, k, d)."""
        grid = self.grid
        problem = next((f"SAE {i}: this rank (latent rank {grid.latent_rank} of {grid.latent_size}) must hold "
                        f"latents {list(grid.bounds(s.n))} of n={s.n}, but its shard holds [{s.lo}, {s.hi})"
                        for i, s in enumerate(self.saes) if (s.lo, s.hi) != grid.bounds(s.n)), "")
        spec = zlib.crc32(repr([(s.n, s.k, s.d) for s in self.saes]).encode())
        every = D.all_gather_stacked(torch.tensor([int(bool(problem)), spec], dtype=torch.int64,
                                                  device=self.device)).tolist()
        if problem:
            raise ValueError(problem)
        bad = [r for r, (flag, _) in enumerate(every) if flag]
        if bad:
            raise ValueError(f"rank(s) {bad} hold shards that do not match the grid (see their error)")
        if len({s for _, s in every}) > 1:
            raise ValueError(f"the ranks disagree on the SAEs (n, k, d): this rank has "
                             f"{[(s.n, s.k, s.d) for s in self.saes]}; spec hashes by rank {[s for _, s in every]}")

    # ---- the hooks of Trainer --------------------------------------------------------------------------------
    @staticmethod
    def _check_saes(saes) -> list:
        saes = [saes] if isinstance(saes, (LatentShard, TopKSAE)) else list(saes)
        for i, s in enumerate(saes):  # before any collective: every rank refuses alike
            arch = getattr(getattr(s, "cfg", None), "arch", "topk")
            if arch != "topk":
                raise ValueError(f"latent-parallel training shards Top-K SAEs only, but SAE {i} is a {arch!r} SAE "
                                 f"({type(s).__name__}): train it data parallel (Trainer under torchrun)")
        if not saes or not all(isinstance(s, LatentShard) for s in saes):
            raise TypeError("shards must be a non-empty list of LatentShard (one per SAE, this rank's latents)")
        return saes

    def _build(self, compute_dtype):
        cfg, group = self.cfg, self.grid.latent_group
        groups = [ShardedGroup(self.saes, self.k_aux, self.grid, compute_dtype, cfg.backend)]
        return groups, [ShardedSAEOptimizer(s, cfg.lr, cfg.betas, cfg.eps, cfg.grad_clip, cfg.backend, group)
                        for s in self.saes]

    def _checked_batches(self, it: Iterator) -> CheckedBatches:
        return super()._checked_batches(it, counts_rows=self.grid.latent_rank == 0,
                                        replicas=D.group_ranks(self.grid.latent_group))

    @torch.no_grad()
    def _broadcast_params(self) -> None:
        # a shard from data rank 0 of its latent column; b_dec (replicated everywhere) from rank 0
        D.broadcast_([getattr(s, p).data for s in self.saes for p in _SHARDED], src=0, group=self.data_group)
        D.broadcast_([s.b_dec.data for s in self.saes], src=0)

    def _train_step(self, x: Tensor, batch_total: int, log: bool) -> dict | None:
        if not self._replicas_checked or log:  # the rows' content (their row counts: every step, CheckedBatches)
            self._check_replicas(x)
        record = super()._train_step(x, batch_total, log)
        if record is not None:  # the base counts this shard's dead latents; the SAE's are summed over shards
            group = self.groups[0]
            dead = torch.stack([(group.since[group.latents(j)] >= self.cfg.dead_tokens).sum()
                                for j in range(len(self.saes))])
            for row, count in zip(record["sae"], D.all_reduce_(dead, group=self.grid.latent_group).tolist()):
                row["dead"] = int(count)
        return record

    def _check_replicas(self, x: Tensor) -> None:
        """Raise (on every rank alike) unless the ranks of this latent group hold the same batch (one small
        all-gather: rows and two float64 sums)."""
        stats = torch.stack([torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device),
                             x.double().sum(), x.double().pow(2).sum()])
        every = D.all_gather_stacked(stats, self.grid.latent_group)
        if not bool((every == every[0]).all()):
            raise ValueError(f"the ranks of a latent group must train on the same rows, but at step {self.step} "
                             f"they hold batches with (rows, sum, sum of squares) = {every.tolist()}: give every "
                             "latent rank of a data rank the same stream")
        self._replicas_checked = True

    # ---- sharded checkpoints ---------------------------------------------------------------------------------
    def _latest_checkpoint(self) -> Path | None:
        """Rank 0's choice for every rank (one all-reduce): ranks that looked on their own could disagree on a
        laggy shared filesystem, one resuming while another starts fresh."""
        found, problem = self._newest_intact() if D.is_main() else (None, None)
        self._agree(ValueError(problem) if problem else None, "choosing the checkpoint to resume")
        step = torch.tensor([ckpt.checkpoint_step(found) if found is not None else -1], device=self.device)
        step = int(D.all_reduce_(step, op="max"))
        return None if step < 0 else Path(self.cfg.checkpoint_dir) / ckpt.checkpoint_name(step)

    def _newest_intact(self) -> tuple[Path | None, str | None]:
        """(the newest complete checkpoint whose files parse, why none does when some are damaged); newer damaged
        ones are skipped with a warning. Step directories without a manifest are interrupted writes, passed over."""
        skipped = []
        for path in reversed(ckpt.list_checkpoints(self.cfg.checkpoint_dir)):
            if not (path / ckpt.META_FILE).is_file():
                continue
            try:
                sc.verify(path)
            except (ckpt.CorruptCheckpoint, FileNotFoundError) as e:
                warnings.warn(f"skipping damaged checkpoint {path}: {e}", stacklevel=4)
                skipped.append(str(e))
                continue
            return path, None
        if skipped:
            return None, (f"no intact checkpoint to resume in {self.cfg.checkpoint_dir}: {'; '.join(skipped)}. Move "
                          "the damaged ones out of the folder to start afresh there")
        return None, None

    def save_checkpoint(self) -> Path | None:
        """Each latent shard (from data rank 0) and then the manifest (rank 0); every rank waits."""
        cfg = self.cfg
        if not cfg.checkpoint_dir:
            return None
        self._check_deferred()
        grid = self.grid
        path = Path(cfg.checkpoint_dir) / ckpt.checkpoint_name(self.step)
        # this step already committed (a finished run resumed, a stream ending on a checkpoint step): rewriting it
        # would remove the only complete checkpoint until the new manifest lands; rank 0 decides for everyone
        committed = D.is_main() and any(p.name == path.name for p in sc.list_complete(cfg.checkpoint_dir))
        done = torch.tensor([int(committed)], device=self.device)
        if int(D.all_reduce_(done, op="max")):
            self.last_checkpoint = path
            return path
        _on_every_rank(lambda: D.is_main() and sc.begin(cfg.checkpoint_dir, self.step), "starting checkpoint",
                       self.device)

        def shard():
            if grid.data_rank == 0:
                rng_tensors, rng_meta = ckpt.rng_state()
                rng_tensors["rng.py_numpy"] = torch.frombuffer(bytearray(json.dumps(rng_meta).encode()),
                                                               dtype=torch.uint8)
                sc.save_shard(cfg.checkpoint_dir, self.step, grid.latent_rank, grid.latent_size,
                              [(s.lo, s.hi) for s in self.saes], {**self._state_tensors(), **rng_tensors})
        _on_every_rank(shard, "writing a checkpoint shard", self.device)

        def manifest():
            if D.is_main():
                meta = self._checkpoint_meta({})
                meta["grid"] = {"data": grid.data_size, "latent": grid.latent_size}
                sc.commit(cfg.checkpoint_dir, self.step, meta, grid.latent_size)
        _on_every_rank(manifest, "committing a checkpoint", self.device)
        self.last_checkpoint = path
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore this rank's shard of the sharded checkpoint ``path`` (written on the same grid)."""
        meta = sc.read_meta(path)
        saved = meta.get("grid", {})
        ours = {"data": self.grid.data_size, "latent": self.grid.latent_size}
        if saved != ours:
            raise ValueError(f"checkpoint {path} was written on a grid {saved}, this run's is {ours}: resume on the "
                             "same grid (or merge it with dlmscope.train.sharded_checkpoint.load_saes)")
        box = {}
        _on_every_rank(lambda: box.update(t=sc.read_shard(path, self.grid.latent_rank, meta)), "reading a shard",
                       self.device)
        tensors = box["t"]
        file = Path(path) / sc.shard_name(self.grid.latent_rank, self.grid.latent_size)
        try:
            rng_meta = json.loads(bytes(tensors.pop("rng.py_numpy").to(torch.uint8).tolist()).decode())
        except (KeyError, ValueError, RecursionError) as e:
            raise ValueError(f"{file}: malformed python / numpy RNG state 'rng.py_numpy' ({type(e).__name__})") \
                from None
        if not isinstance(rng_meta, dict):
            raise ValueError(f"{file}: 'rng.py_numpy' must hold a JSON object, got {type(rng_meta).__name__}")
        self._restore(tensors, {**meta, "rng": rng_meta}, path)


def _on_every_rank(fn, what: str, device: torch.device) -> None:
    """Run ``fn`` here, then agree with every rank (one all-reduce, which is also the barrier): if it raised
    anywhere, raise on every rank — this one's own error where it failed — instead of leaving the others waiting
    in the next collective until the timeout."""
    error = None
    try:
        fn()
    except Exception as exc:  # re-raised below, after the others know
        error = exc
    failed = D.all_reduce_(torch.tensor([int(error is not None)], device=device), op="max")
    if error is not None:
        raise error
    if int(failed):
        raise RuntimeError(f"another rank failed while {what} (see its error)")


@torch.no_grad()
def gather_saes(shards: list[LatentShard], grid: ProcessGrid) -> list[TopKSAE]:
    """The full SAEs, assembled on every rank of the latent group from its shards (one all-gather per tensor;
    each rank then holds every latent: for export and tests, not for dictionaries that need sharding)."""
    out = []
    for s in shards:
        full = {p: D.all_gather_rows(getattr(s, p).detach(), group=grid.latent_group) for p in _SHARDED}
        full["b_dec"] = s.b_dec.detach()
        out.append(TopKSAE.from_state(s.cfg, full, backend=s.backend))
    return out
