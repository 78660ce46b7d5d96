"""torch.distributed helpers for the trainer: init under torchrun, collectives that are no-ops when alone.

Every helper works unchanged in a single process (world size 1, nothing initialised), so the trainer's code
path is the same with and without ``torchrun``. The collectives take an optional ``group`` (a sub-group of a
process grid, :mod:`dlmscope.train.latent_parallel`; None: every rank) and are no-ops on a group of one rank.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import Tensor


def launched_by_torchrun() -> bool:
    """True when the environment says this process is one of several ranks (RANK / WORLD_SIZE set, > 1)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def maybe_init(device: torch.device | str | None = None, timeout_s: float = 600.0) -> bool:
    """Initialise the default process group if launched by torchrun and nobody did; returns ``is_distributed()``.

    Backend: nccl when ``device`` is CUDA (and the current CUDA device is set to LOCAL_RANK), gloo otherwise.
    """
    if dist.is_available() and not dist.is_initialized() and launched_by_torchrun():
        device = torch.device(device) if device is not None else torch.device("cpu")
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda" and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return is_distributed()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def group_size(group=None) -> int:
    """Ranks in ``group`` (None: the world); 1 when not distributed."""
    return dist.get_world_size(group) if is_distributed() else 1


def group_ranks(group=None) -> list[int] | None:
    """The world ranks of ``group`` in group order (None when not distributed or for a group of one rank)."""
    if group_size(group) <= 1:
        return None
    return dist.get_process_group_ranks(group) if group is not None else list(range(world_size()))


def barrier() -> None:
    if is_distributed():
        dist.barrier()


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce_(t: Tensor, op: str = "sum", group=None) -> Tensor:
    """In-place all-reduce (``sum``, ``max`` or ``min``) of ``t`` over ``group``; returns ``t``. No-op when alone."""
    if group_size(group) > 1:
        dist.all_reduce(t, op=_OPS[op], group=group)
    return t


def all_reduce_tensors_(tensors: list[Tensor], op: str = "sum", group=None) -> None:
    """All-reduce a list of same-dtype tensors through one flat buffer (one collective), in place."""
    if group_size(group) <= 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    all_reduce_(flat, op, group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def all_gather_rows(x: Tensor, group=None) -> Tensor:
    """Concatenate every rank's ``x`` [B_r, ...] along dim 0 in rank order (B_r may differ between ranks)."""
    size = group_size(group)
    if size <= 1:
        return x
    sizes = torch.tensor([x.shape[0]], device=x.device, dtype=torch.int64)
    all_sizes = [torch.zeros_like(sizes) for _ in range(size)]
    dist.all_gather(all_sizes, sizes, group=group)
    all_sizes = [int(s) for s in all_sizes]
    longest = max(all_sizes)
    padded = x.new_zeros(longest, *x.shape[1:])
    padded[:x.shape[0]] = x
    gathered = [torch.empty_like(padded) for _ in all_sizes]
    dist.all_gather(gathered, padded.contiguous(), group=group)
    return torch.cat([g[:s] for g, s in zip(gathered, all_sizes)])


def all_gather_stacked(x: Tensor, group=None) -> Tensor:
    """``[G, *x.shape]``: every rank's same-shaped ``x`` stacked in group-rank order, in one collective."""
    size = group_size(group)
    if size <= 1:
        return x.unsqueeze(0)
    out = x.new_empty(size * x.shape[0], *x.shape[1:])
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(out, x.contiguous(), group=group)
    return out.view(size, *x.shape)


def broadcast_(tensors: list[Tensor], src: int = 0, group=None) -> None:
    """Overwrite ``tensors`` on every rank of ``group`` with the values of its rank ``src`` (the rank within
    ``group``; in place; nothing when alone)."""
    if group_size(group) > 1:
        for t in tensors:
            if group is None:
                dist.broadcast(t, src=src)
            else:
                dist.broadcast(t, group=group, group_src=src)


def destroy() -> None:
    """Tear the process group down, after a barrier: a rank that leaves while another still writes its outputs
    can abort gloo's transport threads in the other ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
