"""The step of the SAE architectures beyond Top-K: BatchTopK, Matryoshka and JumpReLU beside Top-K in one trainer.

    trainer = Trainer([TopKSAE(d, n, 32), TopKSAE(d, n, 64), BatchTopKSAE(d, n, 32), JumpReLUSAE(d, n, 64),
                       MatryoshkaSAE(d, n, 32, prefixes=[n // 4, n // 2, n])], TrainConfig(...))
    trainer.fit(stream)        # one stream, one step: every SAE's loss, one backward, each SAE's own update

Top-K SAEs keep their grouped encoder (:mod:`.step`, unchanged); each SAE of another architecture is an
:class:`ArchGroup` of one member, with the same interface (``encode`` -> codes with ``fired``; ``terms`` ->
:class:`~dlmscope.train.step.SAETerms`; dead counters ``since``), so the trainer's phases (terms, the cross-rank
reduction, loss, backward, update, counters) run over both kinds alike. A Top-K SAE trained beside them follows
exactly the computation it follows alone.

Per architecture (``x`` the normalised batch, ``e = x - x_hat`` the full dictionary's residual, ``B`` the global
rows; every term is this rank's share ``Σ_rows / B`` of the global-batch mean):

- ``batchtopk`` (Bussmann et al. 2024; dictionary_learning's ``BatchTopKTrainer``): ``|e|²`` + ``auxk_alpha``·AuxK.
  One training-mode encode per step (:meth:`BatchTopKSAE.encode` with ``update_threshold=False``) and then one
  update of the inference threshold's moving average (:meth:`BatchTopKSAE.update_threshold`).
- ``matryoshka`` (Bussmann et al. 2025): the SUM over prefixes of ``|x - x_hat_p|²`` (``reference.matryoshka_loss``;
  dictionary_learning weights them 1/P instead) + ``auxk_alpha``·AuxK on the full dictionary's residual (as
  Bussmann et al.'s code); BatchTopK codes and threshold update as above; all P reconstructions from one decode.
- ``jumprelu`` (Rajamanoharan et al. 2024; SAELens's ``JumpReLUTrainingSAE``): ``|e|²`` + ``w_t``·L0 with
  ``w_t = TrainConfig.l0_weight_at(step, d)`` (SAELens's lambda, its warm-up, moved to this trainer's activation
  scale) and L0 from :meth:`JumpReLUSAE.encode_with_l0` (the straight-through gradient to ``log_threshold``);
  no AuxK. ``log_threshold`` is trained by Adam like the biases and joins the clip norm (:data:`.step.EXTRA_PARAMS`).
- AuxK (BatchTopK, Matryoshka) is the Top-K recipe's: the top ``k_aux`` relu'd pre-activations among the dead
  latents, decoded without ``b_dec``, regress the detached residual; normalised by the global centred residual
  energy; on once ``dead_tokens`` tokens were seen, times "some latent is dead". The selection comes out of the
  code's first encoder call, as Top-K's does (:meth:`BatchTopKSAE.encode_with_aux`): no second encoder call and
  no host sync.
- Every architecture: decoder rows at unit norm by the fused decoder-norm step (our convention for all of them; the
  gradient's component along each row is projected out first). For JumpReLU this is harmless: scaling latent
  i's decoder row by c and its encoder row, ``b_enc[i]`` and ``θ_i`` by 1/c changes neither ``x_hat`` nor which
  latents fire, so every JumpReLU SAE has a unit-norm twin with the same reconstruction AND the same L0 — the L0
  penalty, unlike an L1 one, cannot be lowered by shrinking codes against growing rows. ``b_dec`` starts at the
  geometric median; dead counters count the latents that fired (value > 0) in this step's training-mode code.

Distributed data parallel (torchrun): gradients and fired masks are summed / merged over ranks as for Top-K, so
JumpReLU and Matryoshka's prefix sums train on the global batch exactly. BatchTopK (and Matryoshka's codes) select
PER RANK: the effective batch of the batch-level top-k is the rank's batch (``B_r·k`` entries of its ``B_r``
rows), not the global one. The threshold's moving average takes, each step, the smallest kept value over all
ranks (one all-reduce MIN per BatchTopK-family SAE and step), so every rank holds the same threshold. Latent
parallel training shards Top-K SAEs only (:mod:`.latent_trainer` refuses the others, naming their architecture).
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from dlmscope import ops
from dlmscope.sae import CLASSES, BatchTopKSAE, JumpReLUSAE
from dlmscope.sae.sparsity import batch_topk_min_selected
from dlmscope.util import distributed as D
from .step import EncoderGroup, SAETerms, add_auxk_terms, fired_latents, param_names

__all__ = ["TRAINABLE", "check_trainable", "ArchCodes", "ArchGroup", "make_arch_groups", "extra_state",
           "set_extra_state", "broadcast_tensors", "fold_norm_factor", "identity_fields", "run_config"]

#: ``SAEConfig.arch`` -> the class whose training rules the trainer applies to it
TRAINABLE = CLASSES
#: TrainConfig fields that only a JumpReLU SAE reads (left out of the identity of a run without one)
JUMPRELU_FIELDS = ("l0_coefficient", "l0_warmup_steps")


def check_trainable(saes: list) -> None:
    """TypeError naming the SAE, its class and architecture unless every one is an SAE the trainer knows how to
    train (:data:`TRAINABLE`: its class's ``ARCH`` is known and the class derives from that architecture's);
    ValueError when an SAE's config names another architecture than its class, or a JumpReLU SAE has thresholds
    that cannot train (:meth:`JumpReLUSAE.untrainable_latents`, named)."""
    for i, s in enumerate(saes):
        arch = getattr(type(s), "ARCH", None)
        cls = TRAINABLE.get(arch) if isinstance(arch, str) else None
        if cls is None or not isinstance(s, cls):
            known = ", ".join(f"{c.__name__} ({a!r})" for a, c in TRAINABLE.items())
            raise TypeError(f"SAE {i} is a {type(s).__name__} (arch {arch!r}), which the trainer cannot train: it "
                            f"trains {known}")
        if s.cfg.arch != arch:
            raise ValueError(f"SAE {i} is a {type(s).__name__} (arch {arch!r}) but its cfg.arch is {s.cfg.arch!r}")
        if isinstance(s, JumpReLUSAE):
            bad = s.untrainable_latents().tolist()
            if bad:
                shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
                raise ValueError(f"SAE {i} (JumpReLU) cannot train the thresholds of latents [{shown}] ({len(bad)} of "
                                 f"{s.n}): their log_threshold is not finite (θ = 0 in the checkpoint gives −inf, "
                                 "which gets no gradient); raise them first, e.g. sae.floor_threshold_(1e-3)")


@dataclasses.dataclass
class ArchCodes:
    """One SAE's training-mode code for this step (``c`` = its code width)."""

    values: Tensor                      #: [B, c] padded sparse code (0 = inactive slot), compute dtype
    indices: Tensor                     #: [B, c] int64 latent ids
    fired: Tensor                       #: [n] bool, latents with a positive value on this rank
    dead: Tensor | None = None          #: [n] bool, dead before this step (None: AuxK off)
    #: [B, k_aux] the dead latents' top relu'd pre-activations, zero where fewer are dead (None: AuxK off)
    aux_values: Tensor | None = None
    aux_indices: Tensor | None = None   #: [B, k_aux] their ids
    l0: Tensor | None = None            #: 0-d mean L0 over this rank's rows with its STE gradient (JumpReLU)


class ArchGroup(EncoderGroup):
    """One SAE of a non-Top-K architecture (member ``index`` of the trainer's SAEs) as an encoder group: its
    architecture's selection rule, its AuxK selection, its dead counters ``since`` [n]. The selection runs on the
    SAE's own methods in training mode (the group puts the SAE in training mode); ``backend``, where given, becomes
    the SAE's backend so that its rules run on the trainer's kernels."""

    def __init__(self, index: int, saes: list, k_aux: list[int], compute_dtype: torch.dtype | None,
                 backend: str | None):
        super().__init__([index], saes, k_aux, compute_dtype, backend)
        self.sae = saes[index]
        self.arch = self.sae.cfg.arch
        if backend is not None:
            self.sae.backend = backend

    def encode(self, xs: Tensor, *, auxk: bool, dead_tokens: int) -> ArchCodes:
        """The code of ``xs`` [B, d] (normalised, master dtype; cast to the compute dtype) under the training rule
        and, with ``auxk`` (BatchTopK, Matryoshka), the AuxK selection among the latents dead for ``dead_tokens``
        tokens. BatchTopK-family SAEs update their threshold here, once (all-reduced over ranks under DDP)."""
        sae = self.sae
        x = xs.to(device=self.device, dtype=self.compute_dtype)
        sae.train()
        l0 = dead = aux_values = aux_indices = None
        if self.arch == "jumprelu":
            values, indices, l0 = sae.encode_with_l0(x)
        else:
            if auxk:
                dead = self.since >= dead_tokens
                values, indices, aux_values, aux_indices = sae.encode_with_aux(x, dead, self.k_aux[0])
            else:
                values, indices = sae.encode(x, update_threshold=False)
            self._update_threshold(values)
        return ArchCodes(values=values, indices=indices, fired=fired_latents(values, indices, self.total), dead=dead,
                         aux_values=aux_values, aux_indices=aux_indices, l0=l0)

    @torch.no_grad()
    def _update_threshold(self, values: Tensor) -> None:
        """One update of the inference threshold from this step's code [B, c], from the smallest kept value over
        all ranks (a rank that kept nothing offers 0, which the update ignores; alone: the SAE's own value)."""
        m = batch_topk_min_selected(values).double().reshape(1)
        m = torch.where(m > 0, m, torch.full_like(m, math.inf))
        D.all_reduce_(m, op="min")
        self.sae.update_threshold(torch.where(torch.isfinite(m), m, torch.zeros_like(m)))

    def terms(self, xs: Tensor, codes: ArchCodes) -> list[SAETerms]:
        """The SAE's terms (one item): the full dictionary's residual and squared error, Matryoshka's other
        prefixes' squared errors (``extra_sum``), JumpReLU's ``l0_sum`` (``Σ_b L0_b``), AuxK sums (AuxK on)."""
        s, x, cd = self.sae, xs.to(self.device), self.compute_dtype
        extra = None
        if self.arch == "matryoshka":
            errors = x - s.prefix_reconstructions(codes.values, codes.indices).to(xs.dtype)  # [P, B, d], one decode
            e, extra = errors[-1], errors[:-1].pow(2).sum()
        else:
            e = x - ops.sparse_decode(codes.values, codes.indices, s.W_dec.to(cd), s.b_dec.to(cd),
                                      backend=self.backend).to(xs.dtype)
        out = SAETerms(values=codes.values, residual=e, recon_sum=e.pow(2).sum(), extra_sum=extra)
        if codes.l0 is not None:
            out.l0_sum = codes.l0 * codes.values.shape[0]
        if codes.dead is not None:
            add_auxk_terms(out, codes.aux_values, codes.aux_indices, s.W_dec.to(cd), self.zero_bias,
                           codes.dead.any(), self.backend)
        return [out]


def make_arch_groups(saes: list, k_aux: list[int], *, compute_dtype: torch.dtype | None,
                     backend: str | None) -> list[ArchGroup]:
    """One :class:`ArchGroup` per SAE that is not Top-K, in SAE order."""
    return [ArchGroup(i, saes, k_aux, compute_dtype, backend) for i, s in enumerate(saes) if s.cfg.arch != "topk"]


# ---- the state beyond parameters and optimiser moments ----------------------------------------------------------


def extra_state(sae) -> dict[str, Tensor]:
    """What besides its parameters decides an SAE's next step, by name: BatchTopK / Matryoshka ``threshold`` (0-d)
    and ``threshold_updates`` (0-d int64); JumpReLU ``cap`` (0-d int64, its adaptive code width); nothing for
    Top-K (or a latent shard)."""
    if isinstance(sae, BatchTopKSAE):
        return {"threshold": sae.threshold, "threshold_updates": sae.threshold_updates}
    if isinstance(sae, JumpReLUSAE):
        return {"cap": torch.tensor(sae.cap, dtype=torch.int64)}
    return {}


@torch.no_grad()
def set_extra_state(sae, tensors: dict[str, Tensor]) -> None:
    """Set what :func:`extra_state` names from ``tensors`` (checked: same names, shapes, dtypes)."""
    if isinstance(sae, BatchTopKSAE):
        sae.threshold.copy_(tensors["threshold"])
        sae.threshold_updates.copy_(tensors["threshold_updates"])
    elif isinstance(sae, JumpReLUSAE):
        sae.cap = int(tensors["cap"])


def broadcast_tensors(sae) -> list[Tensor]:
    """The SAE's tensors rank 0 hands every rank at the start of a fresh run: its trained parameters
    (:func:`~dlmscope.train.step.param_names`, in that order) and the BatchTopK family's threshold buffers."""
    tensors = [getattr(sae, p).data for p in param_names(sae)]
    if isinstance(sae, BatchTopKSAE):
        tensors += [sae.threshold, sae.threshold_updates]
    return tensors


@torch.no_grad()
def fold_norm_factor(sae, s: float) -> None:
    """The architecture's thresholds of an SAE trained on ``x / s``, rescaled for raw ``x`` (the trainer scales
    ``b_enc`` and ``b_dec``): pre-activations scale by s, so JumpReLU's θ and the BatchTopK inference threshold do
    too (``log_threshold += log s``; ``threshold *= s``). Top-K has none."""
    if isinstance(sae, BatchTopKSAE):
        sae.threshold.mul_(s)
    elif isinstance(sae, JumpReLUSAE):
        sae.log_threshold.add_(math.log(s))


# ---- a run's identity -------------------------------------------------------------------------------------------


def identity_fields(sae) -> dict:
    """The SAE's training options that its config does not hold and that change what is trained (BatchTopK family:
    ``threshold_beta``); the code width caps are left out (the rules are exact at any width)."""
    return {"threshold_beta": sae.threshold_beta} if isinstance(sae, BatchTopKSAE) else {}


def run_config(config: dict, saes: list) -> dict:
    """The TrainConfig dict of a run's identity: without :data:`JUMPRELU_FIELDS` when no SAE is a JumpReLU (they
    change nothing then, and a Top-K run's identity stays what it was before they existed)."""
    if any(s.cfg.arch == "jumprelu" for s in saes):
        return config
    return {k: v for k, v in config.items() if k not in JUMPRELU_FIELDS}
