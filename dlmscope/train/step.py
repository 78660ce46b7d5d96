"""The phases of one training step, over small dataclasses (the recipe itself is stated in :mod:`.trainer`).

    encode      EncoderGroup.encode       x [B, d]          -> GroupCodes   (one top-k op call per group)
    terms       terms_by_sae              GroupCodes         -> SAETerms     (decode, residual, AuxK sums)
    reduce      reduce_across_ranks       fired, AuxK sums   -> GlobalSums   (one collective; identity alone)
    loss        sae_loss                  SAETerms + sums    -> SAELoss
    backward    backward                  SAELoss per SAE    -> .grad       (summed loss; grads all-reduced)
    update      SAEOptimizer.step         .grad              -> parameters  (project, clip, Adam, W_dec step)
    counters    EncoderGroup.count_tokens GlobalSums.fired   -> dead counters
    metrics     step_metrics              (log steps only: the one host sync of a step)

``B`` is this rank's rows, ``batch_total`` the global rows of the step (``B`` alone), ``S`` a group's latents
summed over its SAEs. Nothing here syncs with the host except :func:`step_metrics`.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from dlmscope.util import distributed as D
from dlmscope import ops
from dlmscope.sae.metrics import fves
from dlmscope.sae.topk import PARAMS, TopKSAE

__all__ = ["PARAMS", "ADAM_PARAMS", "EXTRA_PARAMS", "param_names", "adam_index", "cumulative_offsets", "EncoderGroup",
           "GroupCodes", "SAETerms", "GlobalSums", "SAELoss", "SAEOptimizer", "make_groups", "fired_latents",
           "add_auxk_terms", "terms_by_sae", "reduce_across_ranks", "sae_loss", "backward", "step_metrics"]

#: the SAE parameters ``torch.optim.Adam`` updates (``W_dec`` gets the fused decoder-norm step); ``PARAMS`` is
#: every SAE parameter (gradients, checkpoints, clipping)
ADAM_PARAMS = ("W_enc", "b_enc", "b_dec")
#: an architecture's trained parameters beyond ``PARAMS`` (``SAEConfig.arch`` -> names): Adam updates them, and
#: clipping, the cross-rank gradient sum and checkpoints include them
EXTRA_PARAMS = {"jumprelu": ("log_threshold",)}


def param_names(sae) -> tuple[str, ...]:
    """Every trained parameter of ``sae`` (a TopKSAE of any architecture, or a latent shard): ``PARAMS`` and its
    architecture's :data:`EXTRA_PARAMS`."""
    return PARAMS + EXTRA_PARAMS.get(sae.cfg.arch, ())


def adam_index(param: str) -> int:
    """The index ``j`` of SAE parameter ``param`` in :class:`SAEOptimizer`'s Adam state (checkpoints name that
    state ``adam.{i}.{j}.{key}``); ValueError for a parameter Adam does not update."""
    if param not in ADAM_PARAMS:
        raise ValueError(f"{param!r} has no Adam state: Adam updates {list(ADAM_PARAMS)} (W_dec takes the fused "
                         "decoder-norm step)")
    return ADAM_PARAMS.index(param)


def cumulative_offsets(sizes: list[int]) -> list[int]:
    """``[0, s0, s0 + s1, ...]``: where each of consecutive blocks of ``sizes`` starts, then the total."""
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


@dataclasses.dataclass
class GroupCodes:
    """A group's top-k codes for this step; latent ids are global within the group (``[0, S)``)."""

    codes: ops.GroupedCodes     #: values / indices [B, Σk], aux_values / aux_indices [B, Σk_aux] (AuxK on)
    dead: Tensor | None         #: [S] bool, dead before this step (None: AuxK off)
    fired: Tensor               #: [S] bool, latents with a positive value in this rank's top-k


@dataclasses.dataclass
class SAETerms:
    """One SAE's loss terms on this rank's rows, before any cross-rank reduction."""

    values: Tensor              #: [B, k] top-k values (compute dtype)
    residual: Tensor            #: [B, d] ``e = x - x_hat`` (master dtype); carries the graph
    recon_sum: Tensor           #: 0-d ``Σ_b |e_b|²``
    aux_sum: Tensor | None = None         #: 0-d ``Σ_b |e_b.detach() - aux_hat_b|²`` (AuxK on)
    any_dead: Tensor | None = None        #: 0-d bool: the SAE has a dead latent (AuxK on)
    residual_sums: Tensor | None = None   #: [d + 1] float64 ``(Σ_b e_b, Σ_b |e_b|²)`` for the AuxK normaliser
    #: 0-d, differentiable: a sum over this rank's rows of loss terms beyond ``recon_sum`` and AuxK, weight 1
    #: (Matryoshka: the smaller prefixes' squared errors; None for Top-K)
    extra_sum: Tensor | None = None
    #: 0-d, differentiable: ``Σ_b L0_b`` with the straight-through gradient to the threshold (JumpReLU; else None)
    l0_sum: Tensor | None = None


@dataclasses.dataclass
class GlobalSums:
    """What the step needs summed over ranks (this rank's values when alone)."""

    fired: list[Tensor]                   #: per group, [S] bool: fired on any rank
    residual_sums: list[Tensor | None]    #: per SAE, [d + 1] float64 on the trainer's device (None: AuxK off)


@dataclasses.dataclass
class SAELoss:
    """One SAE's loss for this step (this rank's share of the global-batch loss)."""

    loss: Tensor                #: 0-d, differentiable: ``recon_sum / batch_total + auxk_alpha * auxk``
    auxk: Tensor | None = None  #: 0-d detached normalised AuxK term (None: AuxK off)


class EncoderGroup:
    """SAEs whose encoders run as one op call (same device and dtype), and their dead-latent counters.

    Latents of member ``j`` occupy ``offsets[j]:offsets[j + 1]`` of the group's ``S`` latents and columns
    ``k_offsets[j]:k_offsets[j + 1]`` of its codes.
    """

    def __init__(self, members: list[int], saes: list[TopKSAE], k_aux: list[int], compute_dtype: torch.dtype | None,
                 backend: str | None):
        self.members = members
        group = [saes[i] for i in members]
        self._setup(group, [s.n for s in group], [s.k for s in group], [k_aux[i] for i in members], compute_dtype,
                    backend)

    def _setup(self, saes: list, sizes: list[int], k_cols: list[int], k_aux: list[int],
               compute_dtype: torch.dtype | None, backend: str | None) -> None:
        """Layout and counters of member SAEs ``saes`` holding ``sizes`` latents here, ``k_cols`` code columns
        each (a latent shard's local top-k may be narrower than its SAE's k)."""
        self.saes, self.sizes, self.k_cols, self.k_aux = saes, sizes, k_cols, k_aux
        self.offsets = cumulative_offsets(sizes)
        self.k_offsets = cumulative_offsets(k_cols)
        first = saes[0]
        self.device, self.dtype = first.W_dec.device, first.W_dec.dtype
        self.compute_dtype = compute_dtype or self.dtype
        self.backend = backend or first.backend
        self.total = self.offsets[-1]
        self.zero_bias = torch.zeros(first.d, device=self.device, dtype=self.compute_dtype)
        #: tokens since each latent last fired, [S] int64 on device
        self.since = torch.zeros(self.total, dtype=torch.int64, device=self.device)

    def latents(self, j: int) -> slice:
        return slice(self.offsets[j], self.offsets[j + 1])

    def select(self, xs: Tensor, b_decs: list[Tensor], k_aux: list[int], *, auxk: bool,
               dead_tokens: int) -> tuple[ops.GroupedCodes, Tensor | None]:
        """The op call of :meth:`encode`: every member's top ``k_cols[j]`` of ``xs`` [B, d] (cast to the compute
        dtype) and, with ``auxk``, its top ``k_aux[j]`` among the latents that have not fired for ``dead_tokens``
        tokens. ``b_decs``: each member's ``b_dec`` [d] in the master dtype. Returns ``(codes, dead)``, ``dead``
        [S] bool (None: AuxK off); latent ids in ``codes`` are the group's, ``[0, S)``."""
        cd = self.compute_dtype
        x = xs.to(device=self.device, dtype=cd)
        dead = self.since >= dead_tokens if auxk else None
        k_aux = k_aux if dead is not None else None
        if len(self.saes) == 1:  # b_dec inside the op, as TopKSAE.encode has it (no fold: the same rounding)
            s = self.saes[0]
            codes = ops.topk_encode_grouped(x, s.W_enc.to(cd), s.b_enc.to(cd), b_decs[0].to(cd), self.k_cols,
                                            self.sizes, aux_mask=dead, k_aux=k_aux, backend=self.backend)
        else:
            # one GEMM for all members: each SAE's b_dec folded into its bias, b_enc - W_enc @ b_dec, in the master
            # dtype and then cast
            W = torch.cat([s.W_enc for s in self.saes]).to(cd)
            b = torch.cat([s.b_enc - s.W_enc @ b_dec for s, b_dec in zip(self.saes, b_decs)]).to(cd)
            codes = ops.topk_encode_grouped(x, W, b, self.zero_bias, self.k_cols, self.sizes, aux_mask=dead,
                                            k_aux=k_aux, backend=self.backend)
        return codes, dead

    def encode(self, xs: Tensor, *, auxk: bool, dead_tokens: int) -> GroupCodes:
        """Top-k codes of ``xs`` [B, d] (normalised, master dtype) for every member; with ``auxk`` also the AuxK
        selection among the latents that have not fired for ``dead_tokens`` tokens."""
        codes, dead = self.select(xs, [s.b_dec for s in self.saes], self.k_aux, auxk=auxk, dead_tokens=dead_tokens)
        return GroupCodes(codes=codes, dead=dead, fired=fired_latents(codes.values, codes.indices, self.total))

    def terms(self, xs: Tensor, group_codes: GroupCodes) -> list[SAETerms]:
        """Each member's reconstruction (and, with AuxK on, AuxK) terms; ``xs`` [B, d] as given to encode."""
        codes, dead, cd = group_codes.codes, group_codes.dead, self.compute_dtype
        x = xs.to(self.device)
        out, aux_col = [], 0
        for j, s in enumerate(self.saes):
            cols, lo = slice(self.k_offsets[j], self.k_offsets[j + 1]), self.offsets[j]
            # lo == 0: a view of the encoder's ids, so a backend's cached sort of them serves the decoder too
            values, indices = codes.values[:, cols], (codes.indices[:, cols] - lo if lo else codes.indices[:, cols])
            W_dec = s.W_dec.to(cd)
            x_hat = ops.sparse_decode(values, indices, W_dec, s.b_dec.to(cd), backend=self.backend)
            e = x - x_hat.to(xs.dtype)
            sae_terms = SAETerms(values=values, residual=e, recon_sum=e.pow(2).sum())
            if dead is not None:
                aux = slice(aux_col, aux_col + self.k_aux[j])
                aux_col += self.k_aux[j]
                add_auxk_terms(sae_terms, codes.aux_values[:, aux], codes.aux_indices[:, aux] - lo, W_dec,
                               self.zero_bias, dead[self.latents(j)].any(), self.backend)
            out.append(sae_terms)
        return out

    @torch.no_grad()
    def count_tokens(self, fired: Tensor, batch_total: int) -> None:
        """Dead counters after a step: 0 where ``fired`` [S] (bool, global), else ``+ batch_total``."""
        self.since = torch.where(fired, torch.zeros_like(self.since), self.since + batch_total)


def fired_latents(values: Tensor, indices: Tensor, total: int) -> Tensor:
    """[total] bool: the latents with a positive value in a code ``values`` / ``indices`` [B, c] (ids in
    ``[0, total)``); index ``total`` is a sink for the zero entries, so one scatter marks them, no host sync."""
    sink = torch.zeros(total + 1, dtype=torch.bool, device=values.device)
    sink[torch.where(values > 0, indices, total).reshape(-1)] = True
    return sink[:total]


def add_auxk_terms(terms: SAETerms, aux_values: Tensor | None, aux_indices: Tensor | None, W_dec: Tensor,
                   zero_bias: Tensor, any_dead: Tensor, backend: str | None) -> None:
    """Set ``terms``' AuxK sums from its residual: the dead latents' decode (``aux_values`` / ``aux_indices``
    [B, a], None when nothing is dead: the term is multiplied by ``any_dead`` = False anyway), without b_dec,
    regresses the detached residual; plus the residual's sums for the AuxK normaliser."""
    e_det = terms.residual.detach()
    if aux_values is None:
        terms.aux_sum = torch.zeros((), dtype=e_det.dtype, device=e_det.device)
    else:
        a_hat = ops.sparse_decode(aux_values, aux_indices, W_dec, zero_bias, backend=backend)
        terms.aux_sum = (e_det - a_hat.to(e_det.dtype)).pow(2).sum()
    terms.any_dead = any_dead
    ed = e_det.double()
    terms.residual_sums = torch.cat([ed.sum(0), ed.pow(2).sum().reshape(1)])

def make_groups(saes: list[TopKSAE], k_aux: list[int], *, grouped: bool, compute_dtype: torch.dtype | None,
                backend: str | None) -> list[EncoderGroup]:
    """Top-K SAEs sharing device and dtype form one group (``grouped=False``: one group per SAE), in SAE order;
    SAEs of other architectures are left out (:mod:`.arch_step` groups them)."""
    keys: dict[tuple, list[int]] = {}
    for i, s in enumerate(saes):
        if s.cfg.arch != "topk":
            continue
        key = (str(s.W_dec.device), s.W_dec.dtype) if grouped else (i,)
        keys.setdefault(key, []).append(i)
    return [EncoderGroup(members, saes, k_aux, compute_dtype, backend) for members in keys.values()]


def terms_by_sae(groups: list[EncoderGroup], xs: Tensor, codes: list[GroupCodes]) -> list[SAETerms]:
    """Every SAE's terms (``codes`` per group), in SAE order."""
    out: list[SAETerms] = [None] * sum(len(g.members) for g in groups)  # type: ignore[list-item]
    for group, group_codes in zip(groups, codes):
        for i, sae_terms in zip(group.members, group.terms(xs, group_codes)):
            out[i] = sae_terms
    return out


def reduce_across_ranks(groups: list[EncoderGroup], codes: list[GroupCodes], terms: list[SAETerms],
                        device: torch.device, group=None) -> GlobalSums:
    """Fired masks OR-ed and AuxK residual sums summed over the ranks of ``group`` (None: all), in ONE collective
    (on ``device``).

    ``codes`` per group, ``terms`` per SAE. Alone this only moves the residual sums to ``device``.
    """
    residual_sums = [t.residual_sums.to(device) if t.residual_sums is not None else None for t in terms]
    if D.group_size(group) <= 1:
        return GlobalSums(fired=[c.fired for c in codes], residual_sums=residual_sums)
    present = [r for r in residual_sums if r is not None]
    flat = D.all_reduce_(torch.cat([c.fired.to(device, torch.float64) for c in codes] + present), group=group)
    fired, offset = [], 0
    for group in groups:
        fired.append(flat[offset:offset + group.total].to(group.device) > 0)
        offset += group.total
    reduced = []
    for r in residual_sums:
        if r is not None:
            r = flat[offset:offset + r.numel()]
            offset += r.numel()
        reduced.append(r)
    return GlobalSums(fired=fired, residual_sums=reduced)


def sae_loss(terms: SAETerms, residual_sums: Tensor | None, batch_total: int, auxk_alpha: float,
             l0_weight: float = 0.0) -> SAELoss:
    """This rank's share of the global-batch loss: ``(recon_sum [+ extra_sum] [+ l0_weight * l0_sum]) /
    batch_total (+ auxk_alpha * AuxK)``; the bracketed terms where ``terms`` has them (not Top-K).

    AuxK = ``aux_sum / Σ_b |e_b - mean_b e|²`` with the normaliser from the global ``residual_sums`` [d + 1]
    (``Σ|e|² - |Σe|² / batch_total``), 0 where it is not positive, times ``any_dead``.
    """
    loss = terms.recon_sum / batch_total
    if terms.extra_sum is not None:
        loss = loss + terms.extra_sum / batch_total
    if terms.l0_sum is not None:
        loss = loss + l0_weight * terms.l0_sum / batch_total
    if residual_sums is None:
        return SAELoss(loss=loss)
    denom = residual_sums[-1] - residual_sums[:-1].pow(2).sum() / batch_total
    denom = denom.to(terms.aux_sum.device, torch.float32)
    aux = torch.where(denom > 0, terms.aux_sum / denom.clamp_min(1e-30), 0.0)
    aux = aux * terms.any_dead.to(aux.dtype)
    return SAELoss(loss=loss + auxk_alpha * aux, auxk=aux.detach())


def backward(losses: list[SAELoss], saes: list[TopKSAE], group=None) -> None:
    """One backward of the summed losses (the SAEs share the grouped encoder's graph), then gradients summed
    over the ranks of ``group`` (None: all; one collective per device and dtype), so each ``.grad`` is the
    global batch's."""
    total = None
    for item in losses:
        total = item.loss if total is None else total + item.loss.to(total.device)
    total.backward()
    if D.group_size(group) > 1:
        grads: dict[tuple, list[Tensor]] = {}
        for s in saes:
            for p in param_names(s):
                g = getattr(s, p).grad
                grads.setdefault((str(g.device), g.dtype), []).append(g)
        for tensors in grads.values():
            D.all_reduce_tensors_(tensors, group=group)


class SAEOptimizer:
    """One SAE's update: ``torch.optim.Adam`` (fused where supported) for ``W_enc, b_enc, b_dec`` (and the
    architecture's :data:`EXTRA_PARAMS`, e.g. JumpReLU's ``log_threshold``) and
    :func:`dlmscope.ops.decoder_norm_step` with its own moments ``dec_exp_avg``, ``dec_exp_avg_sq`` [n, d].

    ``params``: every trained parameter (:func:`param_names`: clipped, gradients dropped after the step);
    ``adam_names``: those Adam updates, in the order of its state (``ADAM_PARAMS`` for Top-K)."""

    def __init__(self, sae: TopKSAE, lr: float, betas: tuple[float, float], eps: float, grad_clip: float | None,
                 backend: str | None):
        self.params = param_names(sae)
        self.adam_names = tuple(p for p in self.params if p != "W_dec")
        params = [getattr(sae, p) for p in self.adam_names]
        try:
            self.adam = torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=True)
        except (RuntimeError, TypeError, ValueError):
            self.adam = torch.optim.Adam(params, lr=lr, betas=betas, eps=eps)
        self.dec_exp_avg, self.dec_exp_avg_sq = torch.zeros_like(sae.W_dec), torch.zeros_like(sae.W_dec)
        self.betas, self.eps, self.grad_clip, self.backend = betas, eps, grad_clip, backend or sae.backend

    @torch.no_grad()
    def step(self, sae: TopKSAE, lr: float, step: int) -> None:
        """Apply the gradients in ``sae``'s ``.grad`` (``step`` counts from 1), then drop them."""
        g = sae.W_dec.grad
        # The projection comes before clipping: it removes the part of the gradient that renormalising the rows
        # would undo anyway, so the clip norm measures only the update that takes effect (the paper's order).
        # decoder_norm_step projects again inside its fused pass; on a projected gradient that is a no-op.
        g.sub_((g * sae.W_dec).sum(1, keepdim=True) * sae.W_dec)
        if self.grad_clip is not None and self.grad_clip > 0:
            self.clip_(sae)
        for pg in self.adam.param_groups:
            pg["lr"] = lr
        self.adam.step()
        ops.decoder_norm_step(sae.W_dec, g, self.dec_exp_avg, self.dec_exp_avg_sq, step, lr, self.betas, self.eps,
                              backend=self.backend)
        for p in self.params:
            getattr(sae, p).grad = None

    def clip_(self, sae: TopKSAE) -> None:
        """Scale ``sae``'s gradients so that their global norm is at most ``grad_clip`` (a sharded SAE's
        optimiser computes the norm over its shards instead)."""
        torch.nn.utils.clip_grad_norm_([getattr(sae, p) for p in self.params], self.grad_clip)


@torch.no_grad()
def step_metrics(xs: Tensor, saes: list[TopKSAE], groups: list[EncoderGroup], terms: list[SAETerms],
                 losses: list[SAELoss], dead_tokens: int) -> list[dict]:
    """Per SAE ``arch, k, n, fve, mse, l0, dead, auxk, loss`` of this rank's batch ``xs`` [B, d] (after the update of
    the dead counters); one host sync for all of them."""
    fve = fves(xs, [t.residual for t in terms]).to(xs.device)  # the statistics of xs once for every SAE
    rows = [None] * len(saes)
    for group in groups:
        for j, i in enumerate(group.members):
            t, item = terms[i], losses[i]
            e = t.residual.detach()
            zero = torch.zeros((), dtype=torch.float64, device=e.device)
            rows[i] = torch.stack([
                fve[i].to(e.device),
                t.recon_sum.detach().double() / xs.shape[0],
                (t.values.detach() > 0).sum(1).float().mean().double(),
                (group.since[group.latents(j)] >= dead_tokens).sum().double(),
                item.auxk.double() if item.auxk is not None else zero,
                item.loss.detach().double(),
            ]).to(xs.device)
    values = torch.stack(rows).tolist()
    return [{"arch": s.cfg.arch, "k": s.k, "n": s.n, "fve": v[0], "mse": v[1], "l0": v[2], "dead": int(v[3]),
             "auxk": v[4], "loss": v[5]} for s, v in zip(saes, values)]
