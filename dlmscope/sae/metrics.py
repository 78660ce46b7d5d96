"""Reconstruction metrics of an SAE, computed once for the trainer's logs and for held-out evaluation.

    FVE = 1 - Σ_d Var_b(x - x̂) / Σ_d Var_b(x)        (docs/reference.md §4; FVU = 1 - FVE)

:class:`ReconstructionStats` accumulates the sums FVE, MSE, L0 and firing counts need over batches in float64,
so a held-out set of any size is scored in bounded memory; :func:`fve` is the one-batch case and
:func:`evaluate_sae` scores an SAE on held-out activations (no language model involved). :func:`failed_training`
flags the SAEs of a k sweep whose training failed (mostly dead, or FVE falling as k rises). The oracle
``reference.fraction_of_variance_explained`` is kept independent of this module and tests compare the two.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["ReconstructionStats", "fve", "fves", "evaluate_sae", "MAX_DEAD_FRACTION", "FVE_TOLERANCE",
           "training_failure", "failed_training"]


class ReconstructionStats:
    """Running sums over batches of activations ``x [B, d]``, residuals ``e = x - x̂ [B, d]`` and codes.

    All sums stay on the batches' device (no host sync until :meth:`result`).
    """

    def __init__(self, n_latents: int | None = None):
        self.n_latents = n_latents
        self.tokens = 0
        self._sx = self._sx2 = self._se = self._se2 = None
        self._active: Tensor | None = None
        self.fires: Tensor | None = None  #: [n_latents] int64: how often each latent was active

    def add(self, x: Tensor, residual: Tensor, values: Tensor | None = None, indices: Tensor | None = None) -> None:
        """Add a batch: ``x``, ``residual`` ``[B, d]``; optionally its codes ``values``/``indices`` ``[B, k]``."""
        xd, ed = x.detach().double(), residual.detach().double()
        sums = (xd.sum(0), (xd * xd).sum(0), ed.sum(0), (ed * ed).sum(0))
        if self._sx is None:
            self._sx, self._sx2, self._se, self._se2 = sums
        else:
            for acc, s in zip((self._sx, self._sx2, self._se, self._se2), sums):
                acc += s
        if values is not None:
            on = values.detach() > 0
            active = on.sum()
            self._active = active if self._active is None else self._active + active
            if self.n_latents is not None and indices is not None:
                if self.fires is None:
                    self.fires = torch.zeros(self.n_latents, dtype=torch.int64, device=values.device)
                self.fires.index_add_(0, indices.reshape(-1).long(), on.reshape(-1).to(torch.int64))
        self.tokens += x.shape[0]

    def fve_tensor(self) -> Tensor:
        """FVE as a 0-d float64 tensor on the batches' device (no host sync)."""
        if self._sx is None:
            raise ValueError("no activations were added")
        n = self.tokens
        var_x = (self._sx2 / n - (self._sx / n) ** 2).sum()
        var_e = (self._se2 / n - (self._se / n) ** 2).sum()
        return 1 - var_e / var_x

    def result(self, dead_max_fires: int = 0) -> dict[str, float]:
        """``fve``, ``fvu``, ``mse`` (mean Σ_d e²), and with codes ``l0`` and ``dead_fraction`` (latents that
        fired ``<= dead_max_fires`` times), plus ``n_tokens``; one host sync."""
        n = self.tokens
        parts = [self.fve_tensor(), self._se2.sum() / n]
        if self._active is not None:
            parts.append(self._active.double() / n)
        if self.fires is not None:
            parts.append((self.fires <= dead_max_fires).double().mean())
        vals = torch.stack(parts).tolist()
        out = {"fve": vals[0], "fvu": 1 - vals[0], "mse": vals[1]}
        if self._active is not None:
            out["l0"] = vals[2]
        if self.fires is not None:
            out["dead_fraction"] = vals[3]
        out["n_tokens"] = n
        return out


def _total_variance(t: Tensor) -> Tensor:
    """``Σ_d Var_b(t)`` in float64, from the sums as :class:`ReconstructionStats` forms them."""
    t = t.detach().double()
    n = t.shape[0]
    return (t.pow(2).sum(0) / n - (t.sum(0) / n) ** 2).sum()


def fves(x: Tensor, residuals: list[Tensor]) -> Tensor:
    """FVE of several reconstructions of one batch ``x [B, d]`` (residuals ``x - x̂_i [B, d]``): ``[R]`` float64;
    the statistics of ``x`` are computed once."""
    var_x = _total_variance(x)
    return torch.stack([1 - _total_variance(e.to(x.device)) / var_x for e in residuals])


def fve(x: Tensor, residual: Tensor) -> Tensor:
    """FVE of one batch ``x [B, d]`` with residual ``x - x̂ [B, d]``, as a 0-d float64 tensor."""
    return fves(x, [residual])[0]


# -------------------------------------------------------------------------------------- held-out evaluation
def _first_parameter(sae) -> Tensor | None:
    """The SAE's first parameter (its dtype and device are the SAE's), or None for a parameterless callable."""
    try:
        return next(sae.parameters())
    except (AttributeError, StopIteration):
        return None


@torch.no_grad()
def evaluate_sae(
    sae,
    activations: Tensor | Iterable[Tensor],
    *,
    batch_size: int = 4096,
    dead_max_fires: int = 0,
    max_tokens: int | None = None,
) -> dict[str, float]:
    """FVE, L0, dead fraction and MSE of ``sae`` on held-out activations.

    ``sae``: a :class:`~dlmscope.sae.topk.TopKSAE` or any object with ``encode(x) -> (values, indices)``,
    ``decode(values, indices)`` and ``n`` (or ``cfg.n``); the activations are cast to its parameters' dtype
    and device.
    ``activations``: a ``[N, d]`` tensor or an iterable of ``[B, d]`` batches (e.g. ``stream.for_layer(L)``).
    FVE = ``1 − Σ_d Var(x − x̂) / Σ_d Var(x)`` over all tokens (accumulated in float64); L0 = mean number of
    latents with a positive value; a latent is dead when it fired ``≤ dead_max_fires`` times on this data.
    """
    if isinstance(activations, Tensor):
        if activations.dim() != 2:
            raise ValueError(f"activations must be [N, d], got {tuple(activations.shape)}")
        batches: Iterable[Tensor] = activations.split(batch_size)
    else:
        batches = activations
    param = _first_parameter(sae)
    sdtype = param.dtype if param is not None else torch.float32
    sdevice = param.device if param is not None else None
    stats = ReconstructionStats(int(sae.n if hasattr(sae, "n") else sae.cfg.n))
    for x in batches:
        if isinstance(x, dict):
            raise ValueError("evaluate_sae takes [B, d] batches; for a multi-layer stream pass stream.for_layer(L)")
        if max_tokens is not None and stats.tokens >= max_tokens:
            break
        if max_tokens is not None and stats.tokens + x.shape[0] > max_tokens:
            x = x[: max_tokens - stats.tokens]
        x = x.reshape(-1, x.shape[-1]).to(device=sdevice if sdevice is not None else x.device, dtype=sdtype)
        values, indices = sae.encode(x)
        stats.add(x, x - sae.decode(values, indices), values, indices)
    if stats.tokens == 0:
        raise ValueError("evaluate_sae got no activations")
    return stats.result(dead_max_fires)


# ------------------------------------------------------------------------------------------ failed trainings
#: the default rule for a failed training: more than half of the latents dead on held-out tokens, or the FVE this
#: far below that of an SAE with a smaller k of the same sweep
MAX_DEAD_FRACTION = 0.5
FVE_TOLERANCE = 0.01


def training_failure(fve: float, dead_fraction: float, smaller_k_fves: Sequence[float] = (), *,
                     max_dead: float = MAX_DEAD_FRACTION, fve_tolerance: float = FVE_TOLERANCE) -> str | None:
    """Why one SAE's training failed, or None: more than ``max_dead`` of its latents dead, its FVE more than
    ``fve_tolerance`` below the best of ``smaller_k_fves`` (the FVEs of the same sweep's SAEs with a smaller k: a
    Top-K SAE with more active latents can reconstruct at least as well, so FVE falling as k rises marks the
    larger-k SAE as under-trained), or an undefined FVE or dead fraction. Numbers as :func:`evaluate_sae`
    reports them, on the same held-out activations for every SAE of the sweep; None/NaN entries of
    ``smaller_k_fves`` are skipped."""
    why = []
    fve = float("nan") if fve is None else float(fve)
    dead = float("nan") if dead_fraction is None else float(dead_fraction)
    if not (math.isfinite(fve) and math.isfinite(dead)):
        why.append("FVE or dead fraction undefined")
    if dead > max_dead:
        why.append(f"{dead:.0%} of latents dead (> {max_dead:.0%})")
    lower = [float(f) for f in smaller_k_fves if f is not None and math.isfinite(float(f))]
    if lower and fve < max(lower) - fve_tolerance:
        why.append(f"FVE {fve:.3f} below {max(lower):.3f} at a smaller k")
    return "; ".join(why) or None


def failed_training(ks: Sequence[int], fves: Sequence[float], dead_fractions: Sequence[float], *,
                    max_dead: float = MAX_DEAD_FRACTION, fve_tolerance: float = FVE_TOLERANCE) -> list[bool]:
    """Per SAE of one k sweep (one model, policy, layer and seed; any order of ``ks``): whether its training failed
    (:func:`training_failure` against the sweep's SAEs with a smaller k)."""
    if not len(ks) == len(fves) == len(dead_fractions):
        raise ValueError(f"ks, fves and dead_fractions must have one entry per SAE, got lengths "
                         f"{len(ks)}, {len(fves)}, {len(dead_fractions)}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"one SAE per k, got ks={list(ks)}")
    return [training_failure(value, dead, [f for kk, f in zip(ks, fves) if kk < k], max_dead=max_dead,
                             fve_tolerance=fve_tolerance) is not None
            for k, value, dead in zip(ks, fves, dead_fractions)]
