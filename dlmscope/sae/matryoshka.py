"""MatryoshkaSAE: nested dictionaries (Bussmann et al. 2025; Nabeshima 2024) with BatchTopK inside.

The latents are ordered: for the prefix sizes ``m_1 < … < m_P = n`` (``SAEConfig.prefixes``), the first ``m_p``
latents alone form dictionary p, and the training loss sums every dictionary's reconstruction error, so early
latents learn general features and later ones refine them. The codes are BatchTopK's (training: the B·k largest
of the batch; eval: the learned global threshold, :class:`~dlmscope.sae.batchtopk.BatchTopKSAE`), and all P
reconstructions come from one sparse decode (:func:`dlmscope.sae.prefix_decode.prefix_reconstructions`).
``forward`` is the full dictionary's reconstruction, as for any SAE.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .batchtopk import DEFAULT_ENCODER_INIT_SCALE, DEFAULT_THRESHOLD_BETA, BatchTopKSAE
from .formats import SAEConfig
from .prefix_decode import prefix_losses, prefix_reconstructions

__all__ = ["MatryoshkaSAE", "default_prefixes"]


def default_prefixes(n: int) -> tuple[int, ...]:
    """The default nested sizes of a Matryoshka SAE of ``n`` latents: n/8, n/4, n/2 and n (the distinct positive
    ones)."""
    return tuple(sorted({m for m in (n // 8, n // 4, n // 2, n) if m >= 1}))


class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE with ``d`` inputs, ``n`` latents, ``k`` active latents per input on average and
    nested dictionaries of the first ``prefixes[p]`` latents (increasing, the last = n)."""

    ARCH = "matryoshka"

    def __init__(self, d: int, n: int, k: int, *, prefixes: Sequence[int], cap: int | None = None,
                 threshold_beta: float = DEFAULT_THRESHOLD_BETA, meta: dict | None = None,
                 backend: str | None = None, device=None, dtype: torch.dtype = torch.float32,
                 generator: torch.Generator | None = None, encoder_init_scale: float = DEFAULT_ENCODER_INIT_SCALE):
        super().__init__(d, n, k, cap=cap, threshold_beta=threshold_beta, meta=meta, backend=backend, device=device,
                         dtype=dtype, generator=generator, encoder_init_scale=encoder_init_scale)
        self.cfg = SAEConfig(d=d, n=n, k=k, meta=self.cfg.meta, arch=self.ARCH, prefixes=[int(m) for m in prefixes])

    @classmethod
    def _config_kwargs(cls, cfg: SAEConfig) -> dict:
        return {**super()._config_kwargs(cfg), "prefixes": cfg.prefixes}

    @property
    def prefixes(self) -> list[int]:
        return self.cfg.prefixes

    def prefix_reconstructions(self, values: Tensor, indices: Tensor) -> Tensor:
        """``[P, ..., d]``: each nested dictionary's reconstruction from the code (values/indices ``[..., c]``)."""
        _, _, W_dec, b_dec = self._weights_as(values.dtype)
        return prefix_reconstructions(values, indices, W_dec, b_dec, self.prefixes, backend=self.backend)

    def prefix_losses(self, x: Tensor, codes: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``[P]``: each nested dictionary's mean squared error on ``x [..., d]`` (codes from :meth:`encode` unless
        given); their sum is the Matryoshka training loss."""
        values, indices = self.encode(x) if codes is None else codes
        _, _, W_dec, b_dec = self._weights_as(values.dtype)
        return prefix_losses(x, values, indices, W_dec, b_dec, self.prefixes, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, prefixes={self.prefixes}"
