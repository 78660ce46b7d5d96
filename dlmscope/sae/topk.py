"""TopKSAE: a Top-K sparse autoencoder module backed by dlmscope's fused ops.

    f = TopK_k(relu(W_enc (x - b_dec) + b_enc)),   x_hat = W_dec.T f + b_dec

Parameters (docs/design.md conventions): ``W_enc [n, d]``, ``b_enc [n]``, ``W_dec [n, d]`` (row i = unit decoder
direction of latent i), ``b_dec [d]``. Works on any leading shape ``[..., d]``. The parameters may be stored in
a wider dtype than the activations (fp32 master weights, bf16 activations): they are cast to the activations'
dtype for the op call and gradients flow back to the stored dtype.

Persistence: an SAE's state is an :class:`SAEConfig` plus its four tensors (:mod:`dlmscope.sae.formats.config`).
``TopKSAE.from_state`` / ``TopKSAE.state`` convert between the module and that state; :mod:`dlmscope.sae.formats` reads
and writes it in several checkpoint formats, and ``TopKSAE.save`` / ``TopKSAE.load`` join the two.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from . import formats
from dlmscope import ops
from .formats import PARAMS, SAEConfig, check_state

__all__ = ["PARAMS", "SAEConfig", "TopKSAE"]


class TopKSAE(nn.Module):
    """Top-K SAE with ``d`` inputs, ``n`` latents, ``k`` active latents per input.

    Initialisation follows the paper's recipe: unit-norm random decoder rows, ``W_enc = W_dec`` (i.e. the
    encoder matrix is the decoder's transpose in the usual [d, n] orientation), zero biases.
    """

    #: the architecture this class implements (``SAEConfig.arch``)
    ARCH = "topk"

    def __init__(self, d: int, n: int, k: int, *, meta: dict | None = None, backend: str | None = None,
                 device=None, dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None,
                 encoder_init_scale: float = 1.0):
        super().__init__()
        if not float(encoder_init_scale) > 0:
            raise ValueError(f"encoder_init_scale must be > 0, got {encoder_init_scale}")
        self.cfg = SAEConfig(d=d, n=n, k=k, meta=dict(meta or {}))
        self.backend = backend
        W_dec = torch.randn(n, d, generator=generator, dtype=torch.float32)
        W_dec = nn.functional.normalize(W_dec, dim=1).to(device=device, dtype=dtype)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec * float(encoder_init_scale))  # tied at init, scaled (1 for Top-K)
        self.b_enc = nn.Parameter(torch.zeros(n, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))

    # ---- shape helpers ------------------------------------------------------------------------------
    @property
    def d(self) -> int:
        return self.cfg.d

    @property
    def n(self) -> int:
        return self.cfg.n

    @property
    def k(self) -> int:
        return self.cfg.k

    def _weights_as(self, dtype: torch.dtype):
        return [p if p.dtype == dtype else p.to(dtype) for p in (self.W_enc, self.b_enc, self.W_dec, self.b_dec)]

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.d:
            raise ValueError(f"x has shape {list(x.shape)} but this SAE expects [..., d={self.d}]")

    # ---- forward ------------------------------------------------------------------------------------
    def encode(self, x: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        """(values [..., k], indices [..., k] int64) of the k active latents of x [..., d]."""
        self._check_input(x)
        W_enc, b_enc, _, b_dec = self._weights_as(x.dtype)
        return ops.topk_encode(x, W_enc, b_enc, b_dec, self.k if k is None else k, backend=self.backend)

    def encode_dense(self, x: Tensor) -> Tensor:
        """The latent code as a dense [..., n] tensor (zeros off the top-k), for analysis."""
        values, indices = self.encode(x)
        dense = values.new_zeros(*values.shape[:-1], self.n)
        return dense.scatter_(-1, indices, values)

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        """x_hat [..., d] from values/indices [..., k]."""
        _, _, W_dec, b_dec = self._weights_as(values.dtype)
        return ops.sparse_decode(values, indices, W_dec, b_dec, backend=self.backend)

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction x_hat [..., d] of x [..., d]."""
        return self.decode(*self.encode(x))

    # ---- decoder geometry ---------------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit norm (the invariant the trainer keeps)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).tiny))

    # ---- persistence --------------------------------------------------------------------------------
    @classmethod
    def from_state(cls, cfg: SAEConfig | dict, tensors: Mapping[str, Tensor], *,
                   backend: str | None = None) -> "TopKSAE":
        """An SAE whose parameters equal ``tensors`` (``W_enc [n, d]``, ``b_enc [n]``, ``W_dec [n, d]``, ``b_dec [d]``;
        same values, dtype and device) and whose config is ``cfg`` (an SAEConfig or its dict).

        The parameters are contiguous copies (clones) and the config is copied too: the SAE owns its storage, so
        ``TopKSAE.from_state(*other.state())`` is an independent copy of ``other`` (training either leaves the other
        unchanged) and later writes to ``tensors`` do not reach it. No random initialisation is materialised."""
        if isinstance(cfg, dict):
            cfg = SAEConfig.from_dict(cfg)
        if cfg.arch != cls.ARCH:
            raise ValueError(f"{cls.__name__}.from_state got a {cfg.arch!r} SAE's state; dlmscope.sae.load builds "
                             f"any architecture's class")
        check_state(cfg, tensors, where="from_state")
        with torch.device("meta"):
            sae = cls(cfg.d, cfg.n, cfg.k, meta=copy.deepcopy(cfg.meta), backend=backend, **cls._config_kwargs(cfg))
        for name in PARAMS:
            setattr(sae, name, nn.Parameter(tensors[name].detach().clone(memory_format=torch.contiguous_format)))
        return sae

    @classmethod
    def _config_kwargs(cls, cfg: SAEConfig) -> dict:
        """The constructor arguments beyond d, n, k and meta that ``cfg`` fixes (none for Top-K)."""
        return {}

    def state(self) -> tuple[SAEConfig, dict[str, Tensor]]:
        """(config, parameters detached on their device): what :func:`dlmscope.sae.formats.save` writes.

        Both are the SAE's own objects, not copies — the tensors are views of the parameters' storage, so saving
        copies nothing — and they change as the SAE trains: copy them (or use :meth:`from_state`, which does) to keep
        a snapshot."""
        return self.cfg, {name: getattr(self, name).detach() for name in PARAMS}

    def save(self, path: str | Path, format: str = "dlmscope") -> Path:
        """Write the SAE to directory ``path`` (atomically) in ``format``; returns the directory.

        ``path`` must be missing, empty, or hold only a previous checkpoint (any format), which is replaced as a
        whole; a directory holding anything else (e.g. ``eval_results.json`` beside a checkpoint) is refused with
        ``FileExistsError`` before anything is written. See :func:`dlmscope.sae.formats.save`."""
        return formats.save(*self.state(), path, format)

    @classmethod
    def load(cls, path: str | Path, *, device=None, dtype: torch.dtype | None = None,
             backend: str | None = None) -> "TopKSAE":
        """Load an SAE from ``path``, detecting its format (dlmscope, dictionary_learning, sparsify, SAELens)."""
        sae = cls.from_state(*formats.load(path), backend=backend)
        if device is not None or dtype is not None:
            sae.to(device=device, dtype=dtype)
        return sae

    def extra_repr(self) -> str:
        return f"d={self.d}, n={self.n}, k={self.k}, backend={self.backend or 'auto'}"

    def cfg_json(self) -> str:
        return json.dumps(self.cfg.to_dict(), indent=2, sort_keys=True)
