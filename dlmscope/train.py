"""Trainer: several Top-K SAEs on one activation stream, the DLM-Scope paper's recipe (REFERENCE.md §2).

    trainer = Trainer([TopKSAE(d, n, k) for k in (50, 80, 160, 320, 520, 820)], TrainConfig(total_tokens=...))
    saes = trainer.fit(stream)          # stream yields [B, d] float tensors; returns the trained SAEs

Recipe, per step and per SAE (DESIGN.md "Trainer"):

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
- normalisation: one scalar ``s = sqrt(mean |x|^2)`` over the first ``norm_batches`` batches (buffered, then
  trained on), training on ``x / s``; at the end ``b_enc`` and ``b_dec`` are multiplied by ``s`` so the returned
  SAEs run on raw activations (top-k commutes with positive scaling: the raw SAE's codes are ``s`` times the
  normalised ones and its reconstruction is ``s * x_hat'``); ``s`` is recorded in ``sae.cfg.meta["norm_factor"]``.

Grouping: SAEs sharing device and dtype run their encoders as ONE :func:`dlmscope.ops.topk_encode_grouped` call
(stacked ``W_enc``, each SAE's ``b_dec`` folded into its bias as ``b_enc - W_enc @ b_dec``; autograd carries the
gradients back to every SAE's own parameters). Decoders stay per SAE. ``group_encoders=False`` makes one op call
per SAE (same maths, for comparison).

Host syncs: none inside a step except at log / checkpoint steps (ops' value checks are switched off; the stream
is checked for NaN/Inf per batch on CPU, where the check costs no sync, and through a device flag checked at
log / checkpoint steps and at the end elsewhere). Under torch.distributed one small all-reduce per step decides
whether every rank still has a batch (it carries the batch sizes and the NaN flag), which syncs once per step.

Distributed (``torchrun``; :mod:`.distributed`): gradients are all-reduced so that the update is the one of the
global batch (the per-rank loss is its share of the global-batch mean; the AuxK normaliser uses global sums),
fired masks are merged (OR) and token counts summed, the norm factor and the geometric median use the global
batch, rank 0 writes checkpoints, and training stops when any rank's stream is exhausted.

Resume: ``fit(stream, resume=True)`` continues from the latest checkpoint in ``checkpoint_dir`` (or
``resume_from=path``), skipping the batches already trained on from the re-created (deterministic) stream.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from . import checkpoint as ckpt
from . import distributed as D
from . import ops
from .geometric_median import geometric_median
from .sae import TopKSAE
from .schedule import lr_at

__all__ = ["TrainConfig", "Trainer"]

_PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
_ADAM_PARAMS = ("W_enc", "b_enc", "b_dec")


@dataclasses.dataclass
class TrainConfig:
    """Training hyper-parameters; defaults follow the paper's code. Round-trips through JSON."""

    #: training length: ``steps`` (batches) or ``total_tokens`` (steps = ceil(total_tokens / global batch of the
    #: first step)); if both are None, ``len(stream)``.
    steps: int | None = None
    total_tokens: int | None = None
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 1000
    decay_fraction: float = 0.2
    #: max global grad norm per SAE (None: no clipping)
    grad_clip: float | None = 1.0
    auxk_alpha: float = 1 / 32
    #: AuxK latents per SAE (None: min(d // 2, n))
    k_aux: int | None = None
    #: a latent is dead when it has not fired for this many (global) tokens
    dead_tokens: int = 10_000_000
    normalize_activations: bool = True
    norm_batches: int = 100
    #: initialise b_dec to the geometric median of the first batch (fresh runs only)
    init_b_dec: bool = True
    geometric_median_iters: int = 100
    #: None (the master dtype) or "bfloat16": ops on bf16 casts of activations and weights, fp32 master weights
    autocast_dtype: str | None = None
    #: one grouped encoder op for SAEs sharing device/dtype (False: one op call per SAE)
    group_encoders: bool = True
    #: metrics (FVE, L0, dead, AuxK, tokens/s) every this many steps (host sync); 0 = only at the end
    log_every: int = 100
    checkpoint_dir: str | None = None
    #: checkpoint every this many steps (None/0: only at the end, if checkpoint_dir is set)
    checkpoint_every: int | None = None
    #: seeds python / numpy / torch at the start of a fresh run (training itself draws no random numbers)
    seed: int | None = 0
    #: ops backend (None: best for the device)
    backend: str | None = None
    progress: bool = True
    #: label of the progress bar
    progress_desc: str = "SAE training"
    #: NaN/Inf check of the stream: "auto" (per batch on CPU, deferred device flag elsewhere), "batch", "deferred"
    nan_check: str = "auto"
    wandb_project: str | None = None
    wandb_run_name: str | None = None
    tensorboard_dir: str | None = None

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        if self.autocast_dtype not in (None, "bfloat16", "float16"):
            raise ValueError(f"autocast_dtype must be None, 'bfloat16' or 'float16', got {self.autocast_dtype!r}")
        if self.nan_check not in ("auto", "batch", "deferred"):
            raise ValueError(f"nan_check must be 'auto', 'batch' or 'deferred', got {self.nan_check!r}")
        for name in ("steps", "total_tokens", "checkpoint_every", "k_aux"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"TrainConfig.{name} must be a non-negative int or None, got {value!r}")
        if self.dead_tokens < 1 or self.norm_batches < 0 or self.warmup_steps < 0 or self.log_every < 0:
            raise ValueError("dead_tokens must be >= 1 and norm_batches, warmup_steps, log_every >= 0")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must lie in [0, 1], got {self.decay_fraction}")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | Path) -> "TrainConfig":
        """From a JSON string, or from a path to a JSON file."""
        if isinstance(text, Path) or (isinstance(text, str) and not text.lstrip().startswith("{")):
            text = Path(text).read_text()
        return cls.from_dict(json.loads(text))


class _Group:
    """SAEs whose encoders run as one op call (same device and dtype)."""

    def __init__(self, members: list[int], saes: list[TopKSAE]):
        self.members = members
        self.sizes = [saes[i].n for i in members]
        self.ks = [saes[i].k for i in members]
        self.offsets = [0]
        for s in self.sizes:
            self.offsets.append(self.offsets[-1] + s)
        self.k_offsets = [0]
        for k in self.ks:
            self.k_offsets.append(self.k_offsets[-1] + k)
        first = saes[members[0]]
        self.device, self.dtype = first.W_dec.device, first.W_dec.dtype
        self.total = self.offsets[-1]
        #: tokens since each latent last fired, [total] int64 on device
        self.since = torch.zeros(self.total, dtype=torch.int64, device=self.device)


def _make_adam(params: list[Tensor], cfg: TrainConfig) -> torch.optim.Adam:
    try:
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


class Trainer:
    """Trains a list of :class:`TopKSAE` on one activation stream (see the module docstring)."""

    def __init__(self, saes: list[TopKSAE] | TopKSAE, cfg: TrainConfig | None = None):
        if isinstance(saes, TopKSAE):
            saes = [saes]
        saes = list(saes)
        if not saes or not all(isinstance(s, TopKSAE) for s in saes):
            raise TypeError("saes must be a non-empty list of TopKSAE")
        ds = {s.d for s in saes}
        if len(ds) != 1:
            raise ValueError(f"all SAEs of one stream must share d, got d values {sorted(ds)}")
        self.saes = saes
        self.cfg = cfg if cfg is not None else TrainConfig()
        self.d = saes[0].d
        self.history: list[dict] = []
        self.step = 0                 # optimisation steps done (== batches trained on, per rank)
        self.total_steps: int | None = None
        self.tokens_seen = 0          # global tokens trained on
        self.norm_factor: float | None = None
        self.last_checkpoint: Path | None = None
        self._pulled = 0              # index of the next raw batch to pull from this rank's stream
        self._bad_step: Tensor | None = None
        self._fitted = False
        self._build_state()

    # ---- state --------------------------------------------------------------------------------------------
    def _build_state(self) -> None:
        cfg = self.cfg
        keys: dict[tuple, list[int]] = {}
        for i, s in enumerate(self.saes):
            key = (str(s.W_dec.device), s.W_dec.dtype) if cfg.group_encoders else (i,)
            keys.setdefault(key, []).append(i)
        self.groups = [_Group(members, self.saes) for members in keys.values()]
        self.adams = [_make_adam([getattr(s, p) for p in _ADAM_PARAMS], cfg) for s in self.saes]
        self.dec_state = [(torch.zeros_like(s.W_dec), torch.zeros_like(s.W_dec)) for s in self.saes]
        self.k_aux = [min(cfg.k_aux if cfg.k_aux is not None else self.d // 2, s.n) for s in self.saes]
        self._zeros: dict[tuple, Tensor] = {}

    def _zero_bias(self, device, dtype) -> Tensor:
        key = (str(device), dtype)
        if key not in self._zeros:
            self._zeros[key] = torch.zeros(self.d, device=device, dtype=dtype)
        return self._zeros[key]

    def _compute_dtype(self, group: _Group) -> torch.dtype:
        if self.cfg.autocast_dtype is None:
            return group.dtype
        return getattr(torch, self.cfg.autocast_dtype)

    def _backend(self, sae: TopKSAE) -> str | None:
        return self.cfg.backend or sae.backend

    @property
    def device(self) -> torch.device:
        return self.saes[0].W_dec.device

    # ---- the stream -----------------------------------------------------------------------------------------
    def _check_shape(self, x) -> str | None:
        if not isinstance(x, Tensor):
            return f"the stream yielded a {type(x).__name__}, expected a [B, d={self.d}] tensor"
        if x.dim() < 1 or x.shape[-1] != self.d or x.numel() == 0:
            return (f"activation batch {self._pulled} has shape {list(x.shape)} but the SAEs expect "
                    f"[B, d={self.d}] (SAE d={self.d}, n={[s.n for s in self.saes]})")
        if not x.is_floating_point():
            return f"activation batch {self._pulled} has dtype {x.dtype}; expected a float tensor"
        return None

    def _nan_message(self, step: int) -> str:
        return (f"activation batch at step {step} (0-based batch index of the stream) contains NaN or Inf; "
                "training stopped before anything was saved for it")

    def _batches(self, it: Iterator) -> Iterator[tuple[Tensor, int]]:
        """(x [B, d] in the master dtype on the SAE device, global batch size) per step, all ranks agreeing."""
        dist = D.is_distributed()
        mode = self.cfg.nan_check
        while True:
            try:
                x = next(it)
            except StopIteration:
                x = None
            index = self._pulled
            error = self._check_shape(x) if x is not None else None
            if x is not None and error is None:
                x = x.reshape(-1, self.d).to(device=self.device, dtype=self.saes[0].W_dec.dtype)
            if dist:
                bad = (~torch.isfinite(x).all()).long() if x is not None and error is None else \
                    torch.zeros((), dtype=torch.int64, device=self.device)
                flags = torch.stack([torch.tensor(int(x is not None), device=self.device),
                                     torch.tensor(x.shape[0] if x is not None and error is None else 0,
                                                  device=self.device),
                                     bad, torch.tensor(int(error is not None), device=self.device)])
                has, total, n_bad, n_err = D.all_reduce_(flags).tolist()
                if n_err:
                    raise ValueError(error or f"a stream on another rank yielded a bad batch at step {index}")
                if n_bad:
                    raise ValueError(self._nan_message(index))
                if has < D.world_size():
                    return
                self._pulled += 1
                yield x, int(total)
            else:
                if x is None:
                    return
                if error is not None:
                    raise ValueError(error)
                if mode == "batch" or (mode == "auto" and x.device.type == "cpu"):
                    if not bool(torch.isfinite(x).all()):
                        raise ValueError(self._nan_message(index))
                else:
                    ok = torch.isfinite(x).all()
                    if self._bad_step is None:
                        self._bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
                    self._bad_step = torch.where((self._bad_step < 0) & ~ok, index, self._bad_step)
                self._pulled += 1
                yield x, int(x.shape[0])

    def _check_deferred(self) -> None:
        """Raise if a deferred NaN/Inf flag was set (one host sync)."""
        if self._bad_step is not None:
            bad = int(self._bad_step)
            if bad >= 0:
                raise ValueError(self._nan_message(bad))

    # ---- init -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _estimate_norm(self, buffered: list[tuple[Tensor, int]]) -> float:
        acc = torch.zeros(2, dtype=torch.float64, device=self.device)
        for x, _ in buffered:
            acc[0] += x.double().pow(2).sum()
            acc[1] += x.shape[0]
        D.all_reduce_(acc)
        mean_sq = float(acc[0] / acc[1])
        if not math.isfinite(mean_sq) or mean_sq <= 0:
            raise ValueError(f"cannot normalise activations: mean squared norm is {mean_sq}")
        return math.sqrt(mean_sq)

    @torch.no_grad()
    def _init_b_dec(self, x_first: Tensor) -> None:
        points = D.all_gather_rows(x_first)
        median = geometric_median(points, max_iter=self.cfg.geometric_median_iters)
        for s in self.saes:
            s.b_dec.copy_(median.to(device=s.b_dec.device, dtype=s.b_dec.dtype))

    @torch.no_grad()
    def _broadcast_params(self) -> None:
        if D.is_distributed():
            import torch.distributed as dist
            for s in self.saes:
                for p in _PARAMS:
                    dist.broadcast(getattr(s, p).data, src=0)

    # ---- one step ---------------------------------------------------------------------------------------------
    def _train_step(self, x: Tensor, batch_total: int, log: bool) -> dict | None:
        cfg = self.cfg
        lr = lr_at(self.step, self.total_steps, cfg.lr, cfg.warmup_steps, cfg.decay_fraction)
        # a counter can reach dead_tokens only once that many tokens were seen: until then AuxK is exactly 0
        aux_on = cfg.auxk_alpha > 0 and self.tokens_seen >= cfg.dead_tokens
        xs = x / self.norm_factor if self.norm_factor is not None else x
        per_sae: list[dict[str, Any]] = [None] * len(self.saes)  # type: ignore[list-item]
        fired_list, stats_list = [], []
        for group in self.groups:
            cd = self._compute_dtype(group)
            xg = xs.to(device=group.device, dtype=cd)
            dead = group.since >= cfg.dead_tokens if aux_on else None
            saes = [self.saes[i] for i in group.members]
            backend = self._backend(saes[0])
            k_aux = [self.k_aux[i] for i in group.members]
            if len(saes) == 1:
                s = saes[0]
                codes = ops.topk_encode_grouped(xg, s.W_enc.to(cd), s.b_enc.to(cd), s.b_dec.to(cd), [s.k], [s.n],
                                                aux_mask=dead, k_aux=k_aux if aux_on else None, backend=backend)
            else:
                W = torch.cat([s.W_enc for s in saes]).to(cd)
                b = torch.cat([s.b_enc - s.W_enc @ s.b_dec for s in saes]).to(cd)
                codes = ops.topk_encode_grouped(xg, W, b, self._zero_bias(group.device, cd), group.ks, group.sizes,
                                                aux_mask=dead, k_aux=k_aux if aux_on else None, backend=backend)
            # fired latents of this step (value > 0 among the selected); index `total` is a sink for the rest
            sink = torch.zeros(group.total + 1, dtype=torch.bool, device=group.device)
            sink[torch.where(codes.values > 0, codes.indices, group.total).reshape(-1)] = True
            fired_list.append(sink[:group.total])
            ka_off = 0
            for j, i in enumerate(group.members):
                s = self.saes[i]
                lo, hi = group.k_offsets[j], group.k_offsets[j + 1]
                values, indices = codes.values[:, lo:hi], codes.indices[:, lo:hi] - group.offsets[j]
                W_dec = s.W_dec.to(cd)
                x_hat = ops.sparse_decode(values, indices, W_dec, s.b_dec.to(cd), backend=backend)
                e = xs.to(group.device) - x_hat.to(xs.dtype)
                entry: dict[str, Any] = {"recon_sum": e.pow(2).sum(), "values": values, "e": e}
                if aux_on:
                    a_v = codes.aux_values[:, ka_off:ka_off + k_aux[j]]
                    a_i = codes.aux_indices[:, ka_off:ka_off + k_aux[j]] - group.offsets[j]
                    ka_off += k_aux[j]
                    e_det = e.detach()
                    a_hat = ops.sparse_decode(a_v, a_i, W_dec, self._zero_bias(group.device, cd), backend=backend)
                    entry["aux_sum"] = (e_det - a_hat.to(e_det.dtype)).pow(2).sum()
                    entry["any_dead"] = dead[group.offsets[j]:group.offsets[j + 1]].any()
                    ed = e_det.double()
                    entry["stats_index"] = len(stats_list)
                    stats_list.append(torch.cat([ed.sum(0), ed.pow(2).sum().reshape(1)]).to(self.device))
                per_sae[i] = entry

        # one collective for the fired masks (OR across ranks) and the AuxK normalisers (global sums)
        if D.is_distributed():
            fired_flat = D.all_reduce_(torch.cat([f.to(self.device, torch.float64) for f in fired_list] + stats_list))
            offset = 0
            fired_global = []
            for group in self.groups:
                fired_global.append(fired_flat[offset:offset + group.total].to(group.device) > 0)
                offset += group.total
            stats = [fired_flat[offset + t * (self.d + 1):offset + (t + 1) * (self.d + 1)]
                     for t in range(len(stats_list))]
        else:
            fired_global, stats = fired_list, stats_list

        loss = None
        for i, entry in enumerate(per_sae):
            sae_loss = entry["recon_sum"] / batch_total
            if aux_on:
                st = stats[entry["stats_index"]]
                denom = st[-1] - st[:-1].pow(2).sum() / batch_total
                denom = denom.to(entry["aux_sum"].device, torch.float32)
                aux = torch.where(denom > 0, entry["aux_sum"] / denom.clamp_min(1e-30), 0.0)
                aux = aux * entry["any_dead"].to(aux.dtype)
                entry["auxk"] = aux.detach()
                sae_loss = sae_loss + cfg.auxk_alpha * aux
            entry["loss"] = sae_loss
            loss = sae_loss if loss is None else loss + sae_loss.to(loss.device)
        loss.backward()

        if D.is_distributed():
            grads: dict[tuple, list[Tensor]] = {}
            for s in self.saes:
                for p in _PARAMS:
                    g = getattr(s, p).grad
                    grads.setdefault((str(g.device), g.dtype), []).append(g)
            for tensors in grads.values():
                D.all_reduce_tensors_(tensors)

        with torch.no_grad():
            for i, s in enumerate(self.saes):
                g = s.W_dec.grad
                g.sub_((g * s.W_dec).sum(1, keepdim=True) * s.W_dec)
                if cfg.grad_clip is not None and cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_([getattr(s, p) for p in _PARAMS], cfg.grad_clip)
                adam = self.adams[i]
                for pg in adam.param_groups:
                    pg["lr"] = lr
                adam.step()
                m, v = self.dec_state[i]
                ops.decoder_norm_step(s.W_dec, g, m, v, self.step + 1, lr, cfg.betas, cfg.eps,
                                      backend=self._backend(s))
                for p in _PARAMS:
                    getattr(s, p).grad = None
            for group, fired in zip(self.groups, fired_global):
                group.since = torch.where(fired, torch.zeros_like(group.since), group.since + batch_total)

        self.step += 1
        self.tokens_seen += batch_total
        if not log:
            return None
        out = {"step": self.step, "tokens": self.tokens_seen, "lr": lr, "sae": []}
        with torch.no_grad():
            x_var = xs.var(0, unbiased=False).sum()
            for i, (s, entry) in enumerate(zip(self.saes, per_sae)):
                group = next(g for g in self.groups if i in g.members)
                j = group.members.index(i)
                dead_count = (group.since[group.offsets[j]:group.offsets[j + 1]] >= cfg.dead_tokens).sum()
                e = entry["e"].detach()
                out["sae"].append({
                    "k": s.k, "n": s.n,
                    "fve": float(1 - e.var(0, unbiased=False).sum().to(x_var.device) / x_var),
                    "mse": float(entry["recon_sum"].detach()) / x.shape[0],
                    "l0": float((entry["values"].detach() > 0).sum(1).float().mean()),
                    "dead": int(dead_count),
                    "auxk": float(entry["auxk"]) if "auxk" in entry else 0.0,
                    "loss": float(entry["loss"].detach()),
                })
        return out

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def _state_tensors(self) -> dict[str, Tensor]:
        tensors: dict[str, Tensor] = {}
        for i, s in enumerate(self.saes):
            for p in _PARAMS:
                tensors[f"sae.{i}.{p}"] = getattr(s, p).detach()
            state = self.adams[i].state_dict()["state"]
            for j, pstate in state.items():
                for key, value in pstate.items():
                    tensors[f"adam.{i}.{j}.{key}"] = value if isinstance(value, Tensor) else torch.tensor(value)
            m, v = self.dec_state[i]
            tensors[f"dec.{i}.exp_avg"], tensors[f"dec.{i}.exp_avg_sq"] = m, v
        for group in self.groups:
            for j, i in enumerate(group.members):
                tensors[f"dead.{i}"] = group.since[group.offsets[j]:group.offsets[j + 1]]
        return tensors

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current state to ``cfg.checkpoint_dir`` (rank 0 writes; all ranks wait)."""
        if not self.cfg.checkpoint_dir:
            return None
        self._check_deferred()
        D.barrier()
        path = Path(self.cfg.checkpoint_dir) / ckpt.checkpoint_name(self.step)
        if D.is_main():
            rng_tensors, rng_meta = ckpt.rng_state()
            meta = {
                "format": "dlmscope-trainer-checkpoint", "version": 1,
                "step": self.step, "total_steps": self.total_steps, "tokens_seen": self.tokens_seen,
                "batches_consumed": self.step, "norm_factor": self.norm_factor, "world_size": D.world_size(),
                "config": self.cfg.to_dict(), "saes": [s.cfg.to_dict() for s in self.saes], "rng": rng_meta,
            }
            path = ckpt.save_checkpoint(self.cfg.checkpoint_dir, self.step, {**self._state_tensors(), **rng_tensors},
                                        meta)
        D.barrier()
        self.last_checkpoint = path
        return path

    @torch.no_grad()
    def load_checkpoint(self, path: str | Path) -> None:
        """Restore the trainer state (SAEs, optimisers, counters, schedule, RNG, stream position) from ``path``."""
        tensors, meta = ckpt.load_checkpoint(path)
        saved = [(c["d"], c["n"], c["k"]) for c in meta["saes"]]
        ours = [(s.d, s.n, s.k) for s in self.saes]
        if saved != ours:
            raise ValueError(f"checkpoint {path} holds SAEs (d, n, k) = {saved}, but this trainer has {ours}")
        for i, s in enumerate(self.saes):
            for p in _PARAMS:
                getattr(s, p).copy_(tensors[f"sae.{i}.{p}"])
            adam = self.adams[i]
            sd = adam.state_dict()
            state = {}
            for j in range(len(_ADAM_PARAMS)):
                prefix = f"adam.{i}.{j}."
                entry = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
                if entry:
                    state[j] = entry
            sd["state"] = state
            adam.load_state_dict(sd)
            m, v = self.dec_state[i]
            m.copy_(tensors[f"dec.{i}.exp_avg"])
            v.copy_(tensors[f"dec.{i}.exp_avg_sq"])
        for group in self.groups:
            group.since = torch.cat([tensors[f"dead.{i}"] for i in group.members]).to(group.device)
        self.step = int(meta["step"])
        self.total_steps = meta["total_steps"]
        self.tokens_seen = int(meta["tokens_seen"])
        self.norm_factor = meta["norm_factor"]
        self._pulled = int(meta["batches_consumed"])
        ckpt.set_rng_state(tensors, meta.get("rng", {}))
        self.last_checkpoint = Path(path)

    # ---- logging ---------------------------------------------------------------------------------------------
    def _open_loggers(self) -> None:
        self._wandb = self._tb = None
        if not D.is_main():
            return
        if self.cfg.wandb_project:
            try:
                import wandb  # type: ignore[import-not-found]
                self._wandb = wandb.init(project=self.cfg.wandb_project, name=self.cfg.wandb_run_name,
                                         config=self.cfg.to_dict())
            except ImportError:
                warnings.warn("wandb_project is set but wandb is not installed; not logging to wandb", stacklevel=3)
        if self.cfg.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(self.cfg.tensorboard_dir)
            except ImportError:
                warnings.warn("tensorboard_dir is set but tensorboard is not installed; not logging to it",
                              stacklevel=3)

    def _emit(self, record: dict, bar) -> None:
        self.history.append(record)
        if bar is not None:
            fves = [r["fve"] for r in record["sae"]]
            bar.set_postfix(fve=f"{min(fves):.3f}-{max(fves):.3f}", dead=sum(r["dead"] for r in record["sae"]),
                            tok_s=f"{record.get('tokens_per_s', 0):.3g}")
        flat = {"lr": record["lr"], "tokens": record["tokens"], "tokens_per_s": record.get("tokens_per_s", 0.0)}
        for r in record["sae"]:
            for key in ("fve", "mse", "l0", "dead", "auxk", "loss"):
                flat[f"k{r['k']}_n{r['n']}/{key}"] = r[key]
        if getattr(self, "_wandb", None) is not None:
            self._wandb.log(flat, step=record["step"])
        if getattr(self, "_tb", None) is not None:
            for key, value in flat.items():
                self._tb.add_scalar(key, value, record["step"])

    def _close_loggers(self) -> None:
        if getattr(self, "_wandb", None) is not None:
            self._wandb.finish()
        if getattr(self, "_tb", None) is not None:
            self._tb.close()

    # ---- fit ---------------------------------------------------------------------------------------------------
    def fit(self, stream: Iterable[Tensor], *, resume: bool = False,
            resume_from: str | Path | None = None) -> list[TopKSAE]:
        """Train on ``stream`` (an iterable of [B, d] tensors); returns the SAEs, ready for raw activations.

        ``resume=True`` continues from the latest checkpoint in ``cfg.checkpoint_dir`` if there is one (else
        starts fresh); ``resume_from`` names a checkpoint directory. The stream must then be the same,
        re-created stream: the batches already trained on are pulled and skipped.
        """
        if self._fitted:
            raise RuntimeError("this Trainer has already fitted its SAEs (their biases are rescaled to raw "
                               "activations); make a new Trainer to train further")
        cfg = self.cfg
        D.maybe_init(self.device)
        path = Path(resume_from) if resume_from is not None else None
        if path is None and resume and cfg.checkpoint_dir:
            path = ckpt.latest_checkpoint(cfg.checkpoint_dir)
        fresh = path is None
        if fresh:
            if cfg.seed is not None:
                random.seed(cfg.seed)
                np.random.seed(cfg.seed)
                torch.manual_seed(cfg.seed + D.rank())
            self._broadcast_params()
        else:
            self.load_checkpoint(path)

        it = iter(stream)
        for skipped in range(self._pulled):  # batches trained on before the checkpoint
            try:
                next(it)
            except StopIteration:
                raise ValueError(f"the stream ended after {skipped} batches, but the checkpoint {path} had "
                                 f"consumed {self._pulled}: is it the same stream?") from None
        batches = self._batches(it)
        self._open_loggers()
        try:
            with ops.value_checks(False):
                self._run(stream, batches, fresh)
        finally:
            self._close_loggers()
        self._finish()
        return self.saes

    def _run(self, stream, batches: Iterator[tuple[Tensor, int]], fresh: bool) -> None:
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
            self.norm_factor = self._estimate_norm(pending)
        elif fresh:
            self.norm_factor = None
        if fresh and cfg.init_b_dec:
            self._check_deferred()
            x0 = pending[0][0]
            self._init_b_dec(x0 / self.norm_factor if self.norm_factor is not None else x0)

        bar = None
        if cfg.progress and D.is_main():
            from tqdm.auto import tqdm
            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc=cfg.progress_desc)
        t_last, tok_last = time.perf_counter(), self.tokens_seen
        try:
            while self.step < self.total_steps:
                if pending:
                    x, batch_total = pending.pop(0)
                else:
                    nxt = next(batches, None)
                    if nxt is None:
                        break
                    x, batch_total = nxt
                last = self.step + 1 == self.total_steps
                log = last or (bool(cfg.log_every) and (self.step + 1) % cfg.log_every == 0)
                if log:
                    self._check_deferred()
                record = self._train_step(x, batch_total, log)
                if bar is not None:
                    bar.update(1)
                if record is not None:
                    now = time.perf_counter()
                    record["tokens_per_s"] = (self.tokens_seen - tok_last) / max(now - t_last, 1e-9)
                    t_last, tok_last = now, self.tokens_seen
                    self._emit(record, bar)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        self._check_deferred()
        self.save_checkpoint()

    @torch.no_grad()
    def _finish(self) -> None:
        """Fold the norm factor into the biases and record provenance in each SAE's meta."""
        s = self.norm_factor
        for sae in self.saes:
            if s is not None:
                sae.b_enc.mul_(s)
                sae.b_dec.mul_(s)
            sae.cfg.meta["norm_factor"] = float(s) if s is not None else 1.0
            sae.cfg.meta["norm_factor_folded"] = True
            sae.cfg.meta["trained_tokens"] = int(self.tokens_seen)
            sae.cfg.meta["trained_steps"] = int(self.step)
        self._fitted = True
