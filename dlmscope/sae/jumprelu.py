"""JumpReLUSAE: a JumpReLU sparse autoencoder (Rajamanoharan et al. 2024) on dlmscope's fused Top-K encoder.

    f_i = pre_i · H(pre_i − θ_i),   pre = W_enc (x − b_dec) + b_enc,   x_hat = W_dec.T f + b_dec

The threshold is learned as ``log_threshold`` [n] (``θ = exp(log_threshold)``, positive), as in DeepMind's JumpReLU
(Rajamanoharan et al. 2024); SAELens 6.54.12's ``JumpReLUTrainingSAE`` and dictionary_learning 0.1.0's
``JumpReluTrainer`` learn θ itself. Defaults for the trainer's normalised activations (total variance 1): initial
θ = 0.1 and bandwidth ``ε`` = 0.05 of the rectangle kernel of the straight-through estimator (∂f_i/∂θ_i =
−(θ_i/ε)·K((pre_i − θ_i)/ε), ∂L0/∂θ_i = −(1/ε)·K(·)). The peers start elsewhere: SAELens 6.54.12
(``JumpReLUTrainingSAEConfig``) at θ = 0.01, ε = 0.05; dictionary_learning 0.1.0 at θ = 0.001
(``JumpReluAutoEncoder``, after the paper's Appendix I) with ε = 0.001 (``JumpReluTrainer``'s default). With
0.001 / 0.001 on this trainer almost no pre-activation falls inside the window, so θ barely trains and L0 stays
far above target (docs/architectures.md). Both are constructor arguments. The
state's ``threshold`` tensor [n] is ``exp(log_threshold)``; loading takes its log, so a save/load round trip of θ is
exact to a few ulps, not bitwise. ε is saved in ``cfg.meta["jumprelu_bandwidth"]``. A loaded θ = 0 stays exactly 0
(log −inf) for inference, but cannot train: the trainer refuses it by latent until :meth:`JumpReLUSAE.floor_threshold_`.

The code is the padded sparse layout of :mod:`dlmscope.sae.sparsity` — values [..., c], indices [..., c], zeros in
inactive slots — never [..., n]. ``cfg.k`` is the initial width c; in training, after each batch, c becomes
``min(n, max(k, 2·m))`` with m the most candidates (entries above θ − ε/2) of any row of that batch, so the next
batch rarely needs a re-encode and c shrinks again as the SAE gets sparser. A row with more than c entries is
re-encoded wider (exact, never truncated).
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor, nn

from .formats import SAEConfig
from .sparsity import jumprelu_candidates, jumprelu_with_l0, threshold_encode
from .topk import TopKSAE

__all__ = ["JumpReLUSAE", "DEFAULT_THRESHOLD", "DEFAULT_BANDWIDTH"]

#: initial θ and bandwidth ε for the trainer's normalised activations (not a peer's: SAELens 6.54.12 starts at
#: θ 0.01, ε 0.05; dictionary_learning 0.1.0 at θ 0.001, ε 0.001, after Rajamanoharan et al. 2024)
DEFAULT_THRESHOLD = 0.1
DEFAULT_BANDWIDTH = 0.05


class JumpReLUSAE(TopKSAE):
    """JumpReLU SAE with ``d`` inputs, ``n`` latents, a learned threshold per latent; ``k`` = the initial code width.

    Parameters: those of :class:`TopKSAE` (same initialisation) and ``log_threshold`` [n] = log(init_threshold)
    (default :data:`DEFAULT_THRESHOLD`). ``eps``: the bandwidth (default: ``meta["jumprelu_bandwidth"]`` if given,
    else :data:`DEFAULT_BANDWIDTH`), written to cfg.meta."""

    ARCH = "jumprelu"

    def __init__(self, d: int, n: int, k: int, *, init_threshold: float = DEFAULT_THRESHOLD, eps: float | None = None,
                 meta: dict | None = None, backend: str | None = None, device=None, dtype: torch.dtype = torch.float32,
                 generator: torch.Generator | None = None):
        super().__init__(d, n, k, meta=meta, backend=backend, device=device, dtype=dtype, generator=generator)
        meta = self.cfg.meta
        eps = float(meta.get("jumprelu_bandwidth", DEFAULT_BANDWIDTH) if eps is None else eps)
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"eps (the JumpReLU bandwidth) must be > 0 and finite, got {eps}")
        if not (init_threshold > 0 and math.isfinite(init_threshold)):
            raise ValueError(f"init_threshold must be > 0 and finite, got {init_threshold}")
        meta["jumprelu_bandwidth"] = eps
        self.cfg = SAEConfig(d=d, n=n, k=k, meta=meta, arch=self.ARCH)
        self.eps = eps
        self.cap = k
        self.log_threshold = nn.Parameter(torch.full((n,), math.log(init_threshold), device=device, dtype=dtype))

    @property
    def threshold(self) -> Tensor:
        """θ [n] = exp(log_threshold), differentiable."""
        return self.log_threshold.exp()

    # ---- forward ------------------------------------------------------------------------------------
    def encode(self, x: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        """(values [..., c], indices [..., c]) of x [..., d]: the entries with pre > θ, value = pre.

        Training mode: with the straight-through gradient to ``log_threshold`` (:meth:`encode_with_l0`). Eval
        mode: the plain threshold rule (no window slots). ``k`` overrides the initial width c."""
        if self.training:
            values, indices, _ = self.encode_with_l0(x, k)
            return values, indices
        self._check_input(x)
        W_enc, b_enc, _, b_dec = self._weights_as(x.dtype)
        return threshold_encode(x, W_enc, b_enc, b_dec, self.threshold.detach().to(x.dtype),
                                self.cap if k is None else k, backend=self.backend)

    def encode_with_l0(self, x: Tensor, k: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(values [..., c], indices [..., c], l0 0-d) from one selection: the JumpReLU code and the L0 penalty (mean
        over rows of the active count), both with their straight-through gradients to ``log_threshold`` — the
        training loss is ``mse(decode(values, indices)) + λ·l0``. In training mode it also adapts the width c."""
        self._check_input(x)
        W_enc, b_enc, _, b_dec = self._weights_as(x.dtype)
        theta = self.threshold.to(x.dtype)
        pre, indices = jumprelu_candidates(x, W_enc, b_enc, b_dec, theta, self.eps, self.cap if k is None else k,
                                           backend=self.backend)
        if self.training and k is None:
            most = int((pre > -math.inf).sum(-1).max())  # the widest row's candidates (one host sync)
            self.cap = min(self.n, max(self.k, 2 * most))
        values, l0 = jumprelu_with_l0(pre, indices, theta, self.eps)
        return values, indices, l0

    # ---- training a loaded SAE ----------------------------------------------------------------------
    def untrainable_latents(self) -> Tensor:
        """The ids (int64, ascending) of the latents whose ``log_threshold`` is not finite — θ = 0 from a checkpoint
        gives −inf, whose gradient through exp is 0 — so that training cannot move their thresholds (one host
        sync). The trainer refuses an SAE that has any (:meth:`floor_threshold_` first)."""
        return (~torch.isfinite(self.log_threshold.detach())).nonzero().squeeze(1)

    @torch.no_grad()
    def floor_threshold_(self, theta_min: float) -> int:
        """Raise every θ below ``theta_min`` (> 0, finite) to it, in place, so that those latents train; returns how
        many were raised. Inference changes only for pre-activations in (old θ, theta_min]."""
        if not (theta_min > 0 and math.isfinite(theta_min)):
            raise ValueError(f"theta_min must be > 0 and finite, got {theta_min}")
        floor = math.log(theta_min)
        low = ~(self.log_threshold >= floor)  # NaN counts as low
        self.log_threshold.copy_(torch.where(low, torch.full_like(self.log_threshold, floor), self.log_threshold))
        return int(low.sum())

    # ---- persistence --------------------------------------------------------------------------------
    @classmethod
    def from_state(cls, cfg: SAEConfig | dict, tensors: Mapping[str, Tensor], *,
                   backend: str | None = None) -> "JumpReLUSAE":
        """As :meth:`TopKSAE.from_state`, plus ``threshold`` [n] (>= 0) as ``log_threshold = log(threshold)`` in its
        dtype. A zero threshold (SAELens stores one for a plain-ReLU latent) loads exactly, as −inf: that latent
        fires at any positive pre-activation, as in the file, but its threshold cannot train, so the trainer refuses
        the SAE, naming those latents (:meth:`untrainable_latents`), until :meth:`floor_threshold_` raises them."""
        sae = super().from_state(cfg, tensors, backend=backend)  # checks the tensors' names and shapes
        threshold = tensors["threshold"].detach()
        if bool((threshold < 0).any()):
            raise ValueError("from_state: a JumpReLU threshold must be >= 0")
        sae.log_threshold = nn.Parameter(threshold.log().contiguous())
        return sae

    def state(self) -> tuple[SAEConfig, dict[str, Tensor]]:
        """As :meth:`TopKSAE.state`, plus ``threshold`` [n] = exp(log_threshold) (a new tensor, detached)."""
        cfg, tensors = super().state()
        return cfg, {**tensors, "threshold": self.log_threshold.detach().exp()}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, cap={self.cap}, eps={self.eps:g}"
