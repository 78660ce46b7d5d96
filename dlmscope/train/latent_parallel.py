"""Latent-parallel Top-K SAEs: the process grid, latent shards, and the sharded forward with its collectives.

Grid: ``world = D x R`` ranks as a DeviceMesh with dims ``("data", "latent")``, global rank
``data_rank * R + latent_rank``. The R ranks of a *latent group* hold disjoint contiguous slices of every SAE's
latents (:func:`shard_bounds`: uneven allowed, the first ``n % R`` shards one latent longer) and train on the
same rows; the D ranks of a *data group* hold the same shard and split each global batch.

One SAE forward on a latent group (per rank, ``B`` rows, ``n_r`` local latents):

1. local encode, :func:`dlmscope.ops.topk_encode_grouped` on the shard: the top ``min(k, n_r)`` candidates
   (values + GLOBAL latent ids), padded to ``k`` columns with value -1 (below every relu'd value);
2. ONE all-gather of the packed candidates of every SAE (and AuxK selection): ``[B, sum(k + k_aux)]`` pairs
   per rank; the global top-k is then the top-k of the ``R * k`` gathered candidates (any latent of the global
   top-k is in its own shard's local top-k), computed identically on every rank;
3. each rank decodes only the winners it owns (``sparse_decode`` on its rows, no ``b_dec``);
4. ONE all-reduce of the partial reconstructions of every SAE (and AuxK) gives ``x_hat``; ``+ b_dec``.

Gradients: :class:`_SumPartials` is an all-reduce forward and the identity backward (each rank computes the
same loss of the summed ``x_hat``, so every partial gets that loss's gradient); :class:`_Replicated` is the
identity forward and an all-reduce backward, for what feeds every shard's encoder (``b_dec``; ``x`` when it
needs a gradient): its gradient is the sum of the shards' partial gradients. Decoder-norm steps and Adam stay
local; the clip norm is summed over the shards (:mod:`.latent_trainer`).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh

from dlmscope.util import distributed as D
from dlmscope import ops
from dlmscope.sae.topk import PARAMS, SAEConfig, TopKSAE
from .step import EncoderGroup, GroupCodes, SAETerms, cumulative_offsets

__all__ = ["shard_bounds", "ProcessGrid", "make_grid", "LatentShard", "ShardedGroup", "ShardCodes", "sum_partials",
           "replicated", "INIT_BLOCK"]

#: latents per independently seeded block of :meth:`LatentShard.init` (the init is the same for any R)
INIT_BLOCK = 4096


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """``[(lo, hi)]`` of ``shards`` contiguous slices of ``n`` latents; the first ``n % shards`` are one longer
    (n=10, 4 shards: 3, 3, 2, 2). Every shard holds at least one latent, so ``shards <= n``."""
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"the number of latent shards must be a positive int, got {shards!r}")
    if shards > n:
        raise ValueError(f"cannot split n={n} latents over R={shards} latent ranks: each rank needs >= 1 latent "
                         f"(use R <= n)")
    base, extra = divmod(n, shards)
    out, lo = [], 0
    for r in range(shards):
        hi = lo + base + (1 if r < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


@dataclasses.dataclass
class ProcessGrid:
    """This rank's place in the ``data x latent`` grid; the groups are None when there is one process."""

    data_size: int
    latent_size: int
    data_rank: int = 0
    latent_rank: int = 0
    data_group: object = None
    latent_group: object = None
    mesh: object = None

    @property
    def world(self) -> int:
        return self.data_size * self.latent_size

    def bounds(self, n: int) -> tuple[int, int]:
        """This rank's ``(lo, hi)`` latents of an SAE with ``n`` latents."""
        return shard_bounds(n, self.latent_size)[self.latent_rank]


def make_grid(latent_size: int, device: torch.device | str | None = None) -> ProcessGrid:
    """The grid of this run: ``world / latent_size`` data ranks by ``latent_size`` latent ranks.

    Initialises torch.distributed under torchrun (:func:`dlmscope.util.distributed.maybe_init`; nccl on CUDA, gloo
    otherwise). Alone (no torchrun) only ``latent_size=1`` is possible and no group is made."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    D.maybe_init(device)
    world = D.world_size()
    if isinstance(latent_size, bool) or not isinstance(latent_size, int) or latent_size < 1:
        raise ValueError(f"latent_size must be a positive int, got {latent_size!r}")
    if world % latent_size:
        raise ValueError(f"latent_size={latent_size} does not divide the world size {world}: the grid is "
                         f"data x latent = world")
    if world == 1:
        return ProcessGrid(1, 1)
    mesh = init_device_mesh(device.type, (world // latent_size, latent_size), mesh_dim_names=("data", "latent"))
    return ProcessGrid(world // latent_size, latent_size, mesh.get_local_rank("data"), mesh.get_local_rank("latent"),
                       mesh.get_group("data"), mesh.get_group("latent"), mesh)


# ---- collectives with gradients --------------------------------------------------------------------------------


class _SumPartials(torch.autograd.Function):
    """All-reduce (sum) of several tensors over a group through one flat buffer; identity backward."""

    @staticmethod
    def forward(ctx, group, *partials):
        flat = torch.cat([p.reshape(-1) for p in partials])
        D.all_reduce_(flat, group=group)
        out, offset = [], 0
        for p in partials:
            out.append(flat[offset:offset + p.numel()].view_as(p).clone())
            offset += p.numel()
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *grads)


class _Replicated(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradient over the group."""

    @staticmethod
    def forward(ctx, group, t):
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        D.all_reduce_(g, group=ctx.group)
        return None, g


def sum_partials(partials: list[Tensor], group) -> list[Tensor]:
    """Each of ``partials`` summed over ``group`` (one collective); gradients pass through unchanged."""
    if D.group_size(group) <= 1:
        return list(partials)
    return list(_SumPartials.apply(group, *partials))


def replicated(t: Tensor, group) -> Tensor:
    """``t`` as an input of every shard: the same values, its gradient summed over ``group``."""
    return t if D.group_size(group) <= 1 else _Replicated.apply(group, t)


# ---- shards ----------------------------------------------------------------------------------------------------


class LatentShard(nn.Module):
    """Latents ``[lo, hi)`` of an SAE ``cfg`` (global d, n, k): ``W_enc, W_dec [n_local, d]``, ``b_enc
    [n_local]``, ``b_dec [d]`` (replicated on every shard). ``n`` and ``k`` are the full SAE's, so the trainer's
    recipe (``k_aux = min(d/2, n)``) reads the same as for a :class:`~dlmscope.sae.topk.TopKSAE`."""

    def __init__(self, cfg: SAEConfig, lo: int, hi: int, tensors: dict[str, Tensor], *, backend: str | None = None):
        super().__init__()
        if not 0 <= lo < hi <= cfg.n:
            raise ValueError(f"shard bounds [{lo}, {hi}) must satisfy 0 <= lo < hi <= n={cfg.n}")
        shapes = {"W_enc": (hi - lo, cfg.d), "b_enc": (hi - lo,), "W_dec": (hi - lo, cfg.d), "b_dec": (cfg.d,)}
        for name, shape in shapes.items():
            if name not in tensors or tuple(tensors[name].shape) != shape:
                got = tuple(tensors[name].shape) if name in tensors else "missing"
                raise ValueError(f"shard [{lo}, {hi}) of an SAE (d={cfg.d}, n={cfg.n}): {name} must be {list(shape)}, "
                                 f"got {got}")
            setattr(self, name, nn.Parameter(tensors[name].detach().clone(memory_format=torch.contiguous_format)))
        self.cfg, self.lo, self.hi, self.backend = cfg, lo, hi, backend

    d = property(lambda self: self.cfg.d)
    n = property(lambda self: self.cfg.n)
    k = property(lambda self: self.cfg.k)
    n_local = property(lambda self: self.hi - self.lo)

    @classmethod
    def from_sae(cls, sae: TopKSAE, lo: int, hi: int) -> "LatentShard":
        """Latents ``[lo, hi)`` of a full Top-K SAE (copies); ValueError naming the architecture of another."""
        if sae.cfg.arch != "topk":
            raise ValueError(f"latent shards hold Top-K SAEs only, got a {sae.cfg.arch!r} SAE ({type(sae).__name__}): "
                             "train it data parallel")
        tensors = {"W_enc": sae.W_enc[lo:hi], "b_enc": sae.b_enc[lo:hi], "W_dec": sae.W_dec[lo:hi], "b_dec": sae.b_dec}
        return cls(SAEConfig(sae.d, sae.n, sae.k, dict(sae.cfg.meta)), lo, hi, tensors, backend=sae.backend)

    @classmethod
    def init(cls, d: int, n: int, k: int, lo: int, hi: int, *, seed: int = 0, meta: dict | None = None,
             device=None, dtype: torch.dtype = torch.float32, backend: str | None = None) -> "LatentShard":
        """A fresh shard without materialising the full SAE: unit random decoder rows, ``W_enc = W_dec``, zero
        biases (the paper's init). Rows come in blocks of :data:`INIT_BLOCK` latents, block ``b`` drawn from a
        generator seeded ``(seed, b)``, so the shards of any R concatenate to the same SAE."""
        cfg = SAEConfig(d, n, k, dict(meta or {}))
        rows = []
        for block in range(lo // INIT_BLOCK, (hi - 1) // INIT_BLOCK + 1):
            start = block * INIT_BLOCK
            g = torch.Generator().manual_seed(seed * 1_000_003 + block)
            w = torch.randn(min(INIT_BLOCK, n - start), d, generator=g)
            rows.append(w[max(lo - start, 0):hi - start])
        W = nn.functional.normalize(torch.cat(rows), dim=1).to(device=device, dtype=dtype)
        zeros = torch.zeros(hi - lo, device=device, dtype=dtype)
        tensors = {"W_enc": W, "b_enc": zeros, "W_dec": W, "b_dec": torch.zeros(d, device=device, dtype=dtype)}
        return cls(cfg, lo, hi, tensors, backend=backend)

    def state(self) -> dict[str, Tensor]:
        return {name: getattr(self, name).detach() for name in PARAMS}

    def extra_repr(self) -> str:
        return f"d={self.d}, n={self.n}, k={self.k}, latents=[{self.lo}, {self.hi})"


# ---- the sharded forward ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class ShardCodes(GroupCodes):
    """A group's codes after the global merge; ``codes`` holds the LOCAL encode's output.

    Per member SAE: ``values`` [B, k] the merged global top-k values (detached, the same on every rank of the
    latent group); ``own_values`` / ``own_ids`` [B, k] the winners this rank holds (others 0; ids local to the
    shard; values carry the encoder's graph); ``aux_own_values`` / ``aux_own_ids`` likewise for AuxK;
    ``n_dead`` [m] the dead latents of each SAE over all shards (AuxK on)."""

    values: list[Tensor] = dataclasses.field(default_factory=list)
    own_values: list[Tensor] = dataclasses.field(default_factory=list)
    own_ids: list[Tensor] = dataclasses.field(default_factory=list)
    aux_own_values: list[Tensor] = dataclasses.field(default_factory=list)
    aux_own_ids: list[Tensor] = dataclasses.field(default_factory=list)
    n_dead: Tensor | None = None


class ShardedGroup(EncoderGroup):
    """The shards of several SAEs on this rank, encoded as one op call; merged and decoded across the latent
    group (see the module docstring). Counters ``since`` [S_local] count the local latents only."""

    def __init__(self, shards: list[LatentShard], k_aux: list[int], grid: ProcessGrid,
                 compute_dtype: torch.dtype | None, backend: str | None):
        self.members = list(range(len(shards)))
        self.grid = grid
        sizes = [s.n_local for s in shards]
        # a shard narrower than k (or k_aux) selects all its latents; the merge pads to the SAE's width
        ks_local = [min(s.k, size) for s, size in zip(shards, sizes)]
        self.k_aux_local = [min(k, size) for k, size in zip(k_aux, sizes)]
        self._setup(shards, sizes, ks_local, list(k_aux), compute_dtype, backend)

    def encode(self, xs: Tensor, *, auxk: bool, dead_tokens: int) -> ShardCodes:
        """Local top-k candidates of ``xs`` [B, d], one all-gather, the global merge; with ``auxk`` the same for the
        AuxK selection among dead latents (and one all-reduce of the dead counts)."""
        group, m = self.grid.latent_group, len(self.saes)
        # [m, d], one input of every shard's encoder: its gradient is summed over the latent group
        b_dec = replicated(torch.stack([s.b_dec for s in self.saes]), group)
        codes, dead = self.select(xs, [b_dec[j] for j in range(m)], self.k_aux_local, auxk=auxk,
                                  dead_tokens=dead_tokens)
        # the candidate blocks: every SAE's main selection, then every SAE's AuxK selection
        blocks = []  # (local values [B, c] with graph, local ids [B, c], width, k to keep, lo of the shard)
        for j, s in enumerate(self.saes):
            cols = slice(self.k_offsets[j], self.k_offsets[j + 1])
            blocks.append((codes.values[:, cols], codes.indices[:, cols] - self.offsets[j], s.k, s.k, s.lo))
        if dead is not None:
            aux_offsets = cumulative_offsets(self.k_aux_local)
            for j, s in enumerate(self.saes):
                cols = slice(aux_offsets[j], aux_offsets[j + 1])
                blocks.append((codes.aux_values[:, cols], codes.aux_indices[:, cols] - self.offsets[j], self.k_aux[j],
                               self.k_aux[j], s.lo))
        merged = _merge(blocks, xs.shape[0], self.grid)
        out = ShardCodes(codes=codes, dead=dead, fired=self._fired(merged[:m]))
        out.values = [v for v, _, _ in merged[:m]]
        out.own_values = [v for _, v, _ in merged[:m]]
        out.own_ids = [i for _, _, i in merged[:m]]
        if dead is not None:
            out.aux_own_values = [v for _, v, _ in merged[m:]]
            out.aux_own_ids = [i for _, _, i in merged[m:]]
            counts = torch.stack([dead[self.latents(j)].sum() for j in range(m)])
            out.n_dead = D.all_reduce_(counts, group=group)
        return out

    def _fired(self, merged: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
        """[S_local] bool: local latents with a positive value among the merged winners this rank owns."""
        sink = torch.zeros(self.total + 1, dtype=torch.bool, device=self.device)
        for j, (_, own, ids) in enumerate(merged):
            sink[torch.where(own.detach() > 0, ids + self.offsets[j], self.total).reshape(-1)] = True
        return sink[:self.total]

    def terms(self, xs: Tensor, group_codes: ShardCodes) -> list[SAETerms]:
        """Each SAE's terms from the owned winners: partial decodes, ONE all-reduce over the latent group."""
        cd, c = self.compute_dtype, group_codes
        aux = c.dead is not None
        partials = [ops.sparse_decode(v, i, s.W_dec.to(cd), self.zero_bias, backend=self.backend)
                    for s, v, i in zip(self.saes, c.own_values, c.own_ids)]
        if aux:  # the dead latents' decode, without b_dec
            partials += [ops.sparse_decode(v, i, s.W_dec.to(cd), self.zero_bias, backend=self.backend)
                         for s, v, i in zip(self.saes, c.aux_own_values, c.aux_own_ids)]
        # summed in float32: a 16-bit all-reduce would round at every hop of the ring
        summed = sum_partials([p.float() for p in partials], self.grid.latent_group)
        x, m, out = xs.to(self.device), len(self.saes), []
        for j, s in enumerate(self.saes):
            e = x - (summed[j].to(cd) + s.b_dec.to(cd)).to(xs.dtype)
            t = SAETerms(values=c.values[j], residual=e, recon_sum=e.pow(2).sum())
            if aux:
                e_det = e.detach()
                t.aux_sum = (e_det - summed[m + j].to(e_det.dtype)).pow(2).sum()
                t.any_dead = c.n_dead[j] > 0
                ed = e_det.double()
                t.residual_sums = torch.cat([ed.sum(0), ed.pow(2).sum().reshape(1)])
            out.append(t)
        return out


def _merge(blocks, rows: int, grid: ProcessGrid) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Global top-k of each candidate block over the latent group, with one all-gather of all blocks.

    ``blocks``: ``(values [B, c], local ids [B, c], width w >= c, keep, lo)``. Returns per block ``(merged
    values [B, keep] detached, owned values [B, keep] with the graph, owned local ids [B, keep])``."""
    padded_v, padded_i, local_v = [], [], []
    for values, ids, width, _, lo in blocks:
        pad = width - values.shape[1]
        v = torch.cat([values, values.new_full((rows, pad), -1.0)], 1) if pad else values
        local_v.append(v)
        padded_v.append(v.detach().float())
        padded_i.append(torch.cat([ids + lo, ids.new_full((rows, pad), -1)], 1) if pad else ids + lo)
    # values as their float32 bits beside the int32 ids: one int32 tensor, one collective (exact for both)
    payload = torch.stack([torch.cat(padded_v, 1).view(torch.int32), torch.cat(padded_i, 1).to(torch.int32)], -1)
    gathered = D.all_gather_stacked(payload, grid.latent_group)  # [R, B, W, 2]
    R = gathered.shape[0]
    all_v = gathered[..., 0].contiguous().view(torch.float32)
    all_i = gathered[..., 1]                                   # int32, read only at the winners
    row = torch.arange(rows, device=all_i.device)[:, None]
    out, col = [], 0
    for (_, _, width, keep, lo), v_local in zip(blocks, local_v):
        gv = all_v[:, :, col:col + width].permute(1, 0, 2).reshape(rows, R * width)
        top, pos = gv.topk(keep, dim=1)
        src, here = pos // width, pos % width                  # the winner's rank and its column there
        owned = src == grid.latent_rank
        own_v = torch.where(owned, v_local.gather(1, here), torch.zeros((), dtype=v_local.dtype))
        own_i = torch.where(owned, all_i[src, row, col + here].long() - lo, 0)
        col += width
        out.append((top.to(v_local.dtype), own_v, own_i))
    return out
