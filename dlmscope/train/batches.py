"""The trainer's view of an activation stream: checked ``[B, d]`` batches that every rank agrees on.

Shape and dtype are checked per batch. NaN/Inf: ``nan_check="batch"`` checks each batch on the host;
``"deferred"`` folds the check into a device flag read by :meth:`CheckedBatches.check_deferred` (at log /
checkpoint steps and at the end), so a step has no host sync; ``"auto"`` is ``"batch"`` on CPU (where it costs no
sync) and ``"deferred"`` elsewhere. Under torch.distributed one small all-reduce per batch carries (has a batch,
rows, NaN flag, bad batch) so that all ranks stop together when any rank's stream ends or fails.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from dlmscope.util import distributed as D

__all__ = ["CheckedBatches", "nan_message"]


def nan_message(index: int) -> str:
    return (f"activation batch at step {index} (0-based batch index of the stream) contains NaN or Inf; "
            "training stopped before anything was saved for it")


class CheckedBatches:
    """Iterates ``(x, batch_total)``: ``x`` [B, d] in ``dtype`` on ``device``, ``batch_total`` the global rows.

    ``index`` is the 0-based position in the stream of the next batch to pull (start it past the batches a
    checkpoint already trained on). ``latents`` (the SAEs' n) only serves the error messages. ``counts_rows=False``
    leaves this rank's rows out of ``batch_total``: its batch replicates another rank's (a latent-parallel grid,
    where every rank of a latent group trains on the same rows and one of them counts them). ``replicas``: the
    world ranks (this rank's latent group) whose batches must have equal row counts, checked in the same
    per-step all-reduce (unequal ones would mismatch the latent group's candidate all-gather).
    """

    def __init__(self, it: Iterator, *, d: int, device: torch.device, dtype: torch.dtype, nan_check: str,
                 index: int = 0, latents: list[int] | None = None, counts_rows: bool = True,
                 replicas: list[int] | None = None):
        self._it, self.d, self.device, self.dtype, self.nan_check = it, d, device, dtype, nan_check
        self.counts_rows = counts_rows
        self.replicas = replicas
        self.index = index
        self.latents = latents or []
        self._bad_index: Tensor | None = None  # 0-d int64 on device: first NaN/Inf batch index, -1 if none

    def _shape_error(self, x) -> str | None:
        if not isinstance(x, Tensor):
            return f"the stream yielded a {type(x).__name__}, expected a [B, d={self.d}] tensor"
        if x.dim() < 1 or x.shape[-1] != self.d or x.numel() == 0:
            return (f"activation batch {self.index} has shape {list(x.shape)} but the SAEs expect "
                    f"[B, d={self.d}] (SAE d={self.d}, n={self.latents})")
        if not x.is_floating_point():
            return f"activation batch {self.index} has dtype {x.dtype}; expected a float tensor"
        return None

    def __iter__(self) -> Iterator[tuple[Tensor, int]]:
        dist = D.is_distributed()
        while True:
            try:
                x = next(self._it)
            except StopIteration:
                x = None
            index = self.index
            error = self._shape_error(x) if x is not None else None
            if x is not None and error is None:
                x = x.reshape(-1, self.d).to(device=self.device, dtype=self.dtype)
            if dist:
                good = x is not None and error is None
                bad = (~torch.isfinite(x).all()).long() if good else torch.zeros((), dtype=torch.int64,
                                                                                    device=self.device)
                flags = torch.stack([torch.tensor(int(x is not None), device=self.device),
                                     torch.tensor(x.shape[0] if good and self.counts_rows else 0, device=self.device),
                                     bad, torch.tensor(int(error is not None), device=self.device)])
                if self.replicas is not None:  # every rank's row count, at its own slot
                    rows = torch.zeros(D.world_size(), dtype=flags.dtype, device=self.device)
                    rows[D.rank()] = x.shape[0] if good else 0
                    flags = torch.cat([flags, rows])
                reduced = D.all_reduce_(flags).tolist()
                has, total, n_bad, n_err = reduced[:4]
                if n_err:
                    raise ValueError(error or f"a stream on another rank yielded a bad batch at step {index}")
                if n_bad:
                    raise ValueError(nan_message(index))
                if has < D.world_size():
                    return
                if self.replicas is not None and len({reduced[4 + r] for r in self.replicas}) > 1:
                    raise ValueError(f"the ranks of a latent group must train on the same rows, but at batch {index} "
                                     f"ranks {self.replicas} hold {[reduced[4 + r] for r in self.replicas]} rows")
                self.index += 1
                yield x, int(total)
            else:
                if x is None:
                    return
                if error is not None:
                    raise ValueError(error)
                self._check(x, index)
                self.index += 1
                yield x, int(x.shape[0])

    def _check(self, x: Tensor, index: int) -> None:
        mode = self.nan_check
        if mode == "batch" or (mode == "auto" and x.device.type == "cpu"):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(nan_message(index))
            return
        ok = torch.isfinite(x).all()
        if self._bad_index is None:
            self._bad_index = torch.full((), -1, dtype=torch.int64, device=self.device)
        self._bad_index = torch.where((self._bad_index < 0) & ~ok, index, self._bad_index)

    def check_deferred(self) -> None:
        """Raise if a deferred NaN/Inf flag was set (one host sync)."""
        if self._bad_index is not None:
            bad = int(self._bad_index)
            if bad >= 0:
                raise ValueError(nan_message(bad))
