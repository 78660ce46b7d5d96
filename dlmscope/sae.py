"""TopKSAE: a Top-K sparse autoencoder module backed by dlmscope's fused ops.

    f = TopK_k(relu(W_enc (x - b_dec) + b_enc)),   x_hat = W_dec.T f + b_dec

Parameters (DESIGN.md conventions): ``W_enc [n, d]``, ``b_enc [n]``, ``W_dec [n, d]`` (row i = unit decoder
direction of latent i), ``b_dec [d]``. Works on any leading shape ``[..., d]``. The parameters may be stored in
a wider dtype than the activations (fp32 master weights, bf16 activations): they are cast to the activations'
dtype for the op call and gradients flow back to the stored dtype.

Saving and loading (several checkpoint formats, detected from the files) live in :mod:`dlmscope.formats`;
``TopKSAE.save`` / ``TopKSAE.load`` are thin entry points to it.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from . import ops


@dataclasses.dataclass
class SAEConfig:
    """Shape and metadata of one SAE; round-trips through JSON (``cfg.json``)."""

    d: int
    n: int
    k: int
    #: free-form provenance: model, layer, hook point, mask policy, training tokens, norm factor...
    meta: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("d", "n", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SAEConfig.{name} must be a positive int, got {value!r}")
        if self.k > self.n:
            raise ValueError(f"SAEConfig.k must be <= n, got k={self.k}, n={self.n}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SAEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown SAEConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


class TopKSAE(nn.Module):
    """Top-K SAE with ``d`` inputs, ``n`` latents, ``k`` active latents per input.

    Initialisation follows the paper's recipe: unit-norm random decoder rows, ``W_enc = W_dec`` (i.e. the
    encoder matrix is the decoder's transpose in the usual [d, n] orientation), zero biases.
    """

    def __init__(self, d: int, n: int, k: int, *, meta: dict | None = None, backend: str | None = None,
                 device=None, dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = SAEConfig(d=d, n=n, k=k, meta=dict(meta or {}))
        self.backend = backend
        W_dec = torch.randn(n, d, generator=generator, dtype=torch.float32)
        W_dec = nn.functional.normalize(W_dec, dim=1).to(device=device, dtype=dtype)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.clone())
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
    def save(self, path: str | Path, format: str = "dlmscope") -> Path:
        """Write the SAE to directory ``path`` (atomically) in ``format``; returns the directory."""
        from . import formats

        return formats.save(self, path, format)

    @classmethod
    def load(cls, path: str | Path, *, device=None, dtype: torch.dtype | None = None,
             backend: str | None = None) -> "TopKSAE":
        """Load an SAE from ``path``, detecting its format (dlmscope, dictionary_learning, sparsify, SAELens)."""
        from . import formats

        sae = formats.load(path)
        sae.backend = backend
        if device is not None or dtype is not None:
            sae.to(device=device, dtype=dtype)
        return sae

    def extra_repr(self) -> str:
        return f"d={self.d}, n={self.n}, k={self.k}, backend={self.backend or 'auto'}"

    def cfg_json(self) -> str:
        return json.dumps(self.cfg.to_dict(), indent=2, sort_keys=True)
