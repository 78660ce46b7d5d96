"""BatchTopKSAE: a BatchTopK sparse autoencoder (Bussmann et al. 2024) on dlmscope's fused Top-K encoder.

Training mode: the B·k largest relu'd pre-activations of the whole batch are kept (``k`` = the mean active latents
per row; :func:`dlmscope.sae.sparsity.batch_topk_encode`). Eval mode: a JumpReLU-like rule with one global
threshold, the entries with ``pre > threshold`` (:func:`dlmscope.sae.sparsity.threshold_encode`).

The inference threshold (a 0-d buffer, saved as the state's ``threshold`` tensor) is an exponential moving average,
updated by every training-mode ``encode``: ``θ ← β·θ + (1 − β)·m`` with ``m`` the smallest kept activation of the
batch (``reference.batchtopk_min_selected``, Bussmann et al.'s "minimum positive activation") and ``β =
threshold_beta`` (0.999, dictionary_learning's default; SAELens's ``topk_threshold_lr`` 0.01 is β = 0.99); the first
update sets ``θ = m`` (dictionary_learning starts it the same way, from a −1 sentinel, with the same global minimum
``f[f > 0].min()``; a short run wants a smaller β, or θ still reflects its first batches). A batch
that keeps nothing leaves θ unchanged. A loaded SAE with θ > 0 counts as updated, so further training continues
its average. The code's width is ``cap`` (default ``min(n, 4k)``), wider only for a batch where a row has more.

``cap`` and ``threshold_beta`` travel in the saved config's meta (:data:`CAP_KEY`, :data:`BETA_KEY`) where they
are not the defaults, so a default SAE's files are what they were; a checkpoint without them loads with the
defaults. The loaded SAE holds them as attributes, not in ``cfg.meta``.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Mapping

import torch
from torch import Tensor

from .formats import SAEConfig
from .sparsity import batch_topk_encode, batch_topk_encode_aux, threshold_encode, update_threshold_ema
from .topk import TopKSAE

__all__ = ["BatchTopKSAE", "CAP_KEY", "BETA_KEY", "DEFAULT_THRESHOLD_BETA"]

#: dictionary_learning's default moving-average factor of the inference threshold
DEFAULT_THRESHOLD_BETA = 0.999
#: the encoder starts at this multiple of the decoder (W_enc = 0.1·W_dec): with a full-size tied start every latent
#: stays alive for hundreds of steps and ends mixing directions; a small start lets latents die early and the
#: survivors align (on planted data at k = 6: FVE 0.793 → 0.846, planted directions recovered 0.54 → 0.82; any
#: scale from 0.01 to 0.3 does as well; docs/architectures.md)
DEFAULT_ENCODER_INIT_SCALE = 0.1
#: ``cfg.meta`` keys of a saved state's ``cap`` and ``threshold_beta`` (written where not the defaults)
CAP_KEY, BETA_KEY = "batchtopk_cap", "batchtopk_threshold_beta"


class BatchTopKSAE(TopKSAE):
    """BatchTopK SAE with ``d`` inputs, ``n`` latents, ``k`` active latents per input on average over a batch.

    Parameters and initialisation as :class:`TopKSAE`, except that ``W_enc`` starts at ``encoder_init_scale``
    (default :data:`DEFAULT_ENCODER_INIT_SCALE`) times ``W_dec``; buffers ``threshold`` (0-d, float32 or float64, the
    inference threshold) and ``threshold_updates`` (0-d int64, how many batches have updated it).
    ``cap``: the initial width of the sparse code (>= k; default ``min(n, 4k)``); ``threshold_beta`` in [0, 1)."""

    ARCH = "batchtopk"

    def __init__(self, d: int, n: int, k: int, *, cap: int | None = None,
                 threshold_beta: float = DEFAULT_THRESHOLD_BETA,
                 meta: dict | None = None, backend: str | None = None, device=None, dtype: torch.dtype = torch.float32,
                 generator: torch.Generator | None = None, encoder_init_scale: float = DEFAULT_ENCODER_INIT_SCALE):
        super().__init__(d, n, k, meta=meta, backend=backend, device=device, dtype=dtype, generator=generator,
                         encoder_init_scale=encoder_init_scale)
        self.cfg = SAEConfig(d=d, n=n, k=k, meta=self.cfg.meta, arch=BatchTopKSAE.ARCH)  # a subclass sets its own
        self.cap = min(n, 4 * k) if cap is None else int(cap)
        if not k <= self.cap <= n:
            raise ValueError(f"cap must satisfy k <= cap <= n ({k} <= cap <= {n}), got {self.cap}")
        if not 0.0 <= float(threshold_beta) < 1.0:
            raise ValueError(f"threshold_beta must lie in [0, 1), got {threshold_beta}")
        self.threshold_beta = float(threshold_beta)
        # the EMA runs in at least float32: a bf16 buffer would stall at (1 − β)·Δ below its resolution
        wide = torch.promote_types(dtype, torch.float32)
        self.register_buffer("threshold", torch.zeros((), device=device, dtype=wide))
        self.register_buffer("threshold_updates", torch.zeros((), device=device, dtype=torch.int64))

    # ---- forward ------------------------------------------------------------------------------------
    def encode(self, x: Tensor, k: int | None = None, *, update_threshold: bool | None = None
               ) -> tuple[Tensor, Tensor]:
        """(values [..., c], indices [..., c]) of x [..., d] in the padded sparse layout (zeros = inactive slots).

        Training mode: BatchTopK over all leading rows with ``k`` (default ``self.k``) per row on average, then
        the threshold update (unless ``update_threshold=False``). Eval mode: the entries with pre > threshold."""
        self._check_input(x)
        W_enc, b_enc, _, b_dec = self._weights_as(x.dtype)
        if not self.training:
            return threshold_encode(x, W_enc, b_enc, b_dec, self.threshold.to(x.dtype), self.cap,
                                    backend=self.backend)
        k = self.k if k is None else k
        values, indices, _ = batch_topk_encode(x, W_enc, b_enc, b_dec, k, self.cap, backend=self.backend)
        if update_threshold is None or update_threshold:
            self.update_threshold(values)
        return values, indices

    def encode_with_aux(self, x: Tensor, aux_mask: Tensor, k_aux: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(values [..., c], indices [..., c], aux_values [..., k_aux], aux_indices [..., k_aux]): the training rule's
        code of x (whatever the mode; the threshold is not updated) and AuxK's selection, the ``k_aux`` largest
        relu'd pre-activations among the latents where ``aux_mask`` [n] (bool) is True, zero-padded where fewer —
        both from one encoder op call (:func:`~dlmscope.sae.sparsity.batch_topk_encode_aux`), no host sync for it."""
        self._check_input(x)
        W_enc, b_enc, _, b_dec = self._weights_as(x.dtype)
        values, indices, _, aux_values, aux_indices = batch_topk_encode_aux(
            x, W_enc, b_enc, b_dec, self.k, self.cap, aux_mask, k_aux, backend=self.backend)
        return values, indices, aux_values, aux_indices

    @torch.no_grad()
    def update_threshold(self, values: Tensor) -> None:
        """Fold one training batch's code [..., c] into the threshold's moving average (see the module doc)."""
        update_threshold_ema(self.threshold, self.threshold_updates, values, self.threshold_beta)

    # ---- persistence --------------------------------------------------------------------------------
    @classmethod
    def from_state(cls, cfg: SAEConfig | dict, tensors: Mapping[str, Tensor], *,
                   backend: str | None = None) -> "BatchTopKSAE":
        """As :meth:`TopKSAE.from_state`, plus the 0-d ``threshold`` tensor (copied, its dtype kept) and ``cap`` /
        ``threshold_beta`` from the meta (the defaults where absent; ValueError naming the key where malformed)."""
        sae = super().from_state(cfg, tensors, backend=backend)
        for key in (CAP_KEY, BETA_KEY):
            sae.cfg.meta.pop(key, None)  # held as attributes; state() writes them back
        threshold = tensors["threshold"].detach().clone(memory_format=torch.contiguous_format)
        sae.threshold = threshold
        sae.threshold_updates = torch.tensor(int(bool(threshold > 0)), device=threshold.device)
        return sae

    @classmethod
    def _config_kwargs(cls, cfg: SAEConfig) -> dict:
        """``cap`` and ``threshold_beta`` where the meta records them."""
        out = {}
        if CAP_KEY in cfg.meta:
            cap = cfg.meta[CAP_KEY]
            if isinstance(cap, bool) or not isinstance(cap, numbers.Integral) or not cfg.k <= cap <= cfg.n:
                raise ValueError(f"meta[{CAP_KEY!r}] must be an int in [k, n] = [{cfg.k}, {cfg.n}], got {cap!r}")
            out["cap"] = int(cap)
        if BETA_KEY in cfg.meta:
            beta = cfg.meta[BETA_KEY]
            if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 <= beta < 1:
                raise ValueError(f"meta[{BETA_KEY!r}] must be a number in [0, 1), got {beta!r}")
            out["threshold_beta"] = float(beta)
        return out

    def state(self) -> tuple[SAEConfig, dict[str, Tensor]]:
        """As :meth:`TopKSAE.state`, plus ``threshold`` (the buffer, detached); where ``cap`` or ``threshold_beta`` is
        not the default, the config is a copy whose meta records it (the module doc)."""
        cfg, tensors = super().state()
        options = {}
        if self.cap != min(self.n, 4 * self.k):
            options[CAP_KEY] = self.cap
        if self.threshold_beta != DEFAULT_THRESHOLD_BETA:
            options[BETA_KEY] = self.threshold_beta
        if options or CAP_KEY in cfg.meta or BETA_KEY in cfg.meta:  # the attributes decide, not a stale meta entry
            meta = {key: v for key, v in cfg.meta.items() if key not in (CAP_KEY, BETA_KEY)}
            cfg = dataclasses.replace(cfg, meta={**meta, **options})
        return cfg, {**tensors, "threshold": self.threshold.detach()}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, cap={self.cap}, threshold={float(self.threshold):.4g}"

