"""Crosscoder: one shared sparse code over S sources (Lindsey et al. 2024, "Sparse Crosscoders"), for model diffing.

Each token is seen by S sources (e.g. a base and a chat model at one layer), each of width d: x [B, S, d].

    f = rule_k(relu(W_enc · concat_s(x_s − b_dec[s]) + b_enc)),     x̂_s = W_dec[s]ᵀ f + b_dec[s]

Parameters: ``W_enc [n, S·d]`` (row i = latent i's encoder over the concatenated sources, source-major),
``b_enc [n]``, ``W_dec [S, n, d]`` (one decoder per source), ``b_dec [S, d]``. The encoder is an ordinary Top-K
encoder on the concatenated input of width S·d with the concatenated ``b_dec`` (``ops.topk_encode``, or
``sparsity.batch_topk_encode`` / ``threshold_encode`` for ``rule="batchtopk"``); decoding is one
``ops.sparse_decode`` per source. The code is the padded sparse layout values / indices [B, c] (c = k for Top-K).

Decoder convention: Lindsey et al. leave the per-source decoder rows free and weight their L1 penalty by the sum
of the per-source decoder norms. Top-K / BatchTopK have no L1 term, so nothing would stop the trivial rescaling
(decoder × a, encoder / a); we fix that gauge by keeping each latent's CONCATENATED decoder row
``concat_s W_dec[s, i]`` [S·d] at unit norm (``ops.decoder_norm_step`` on the [n, S·d] view). The per-source norms
‖W_dec[s, i]‖ stay free to differ (their squares sum to 1), which is what the relative-norm analysis
(:mod:`dlmscope.analysis.crosscoder`) reads: a latent used by one source only ends with its other rows near 0.

Training is :func:`dlmscope.train.crosscoder.fit_crosscoder`, a dedicated loop (the stream is paired [B, S, d],
unlike ``dlmscope.train.Trainer``'s [B, d]). Persistence: :meth:`Crosscoder.save` / :meth:`Crosscoder.load`, a directory
with ``crosscoder.safetensors`` + ``cfg.json`` (``"format": "dlmscope-crosscoder"``), written atomically.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from dlmscope import ops
from dlmscope.util import atomic
from dlmscope.util.checks import require_int
from . import formats
from .sparsity import batch_topk_encode, batch_topk_encode_aux, threshold_encode, update_threshold_ema

__all__ = ["Crosscoder", "FORMAT", "VERSION", "CFG", "WEIGHTS", "RULES"]

FORMAT = "dlmscope-crosscoder"
VERSION = 1
CFG = "cfg.json"
WEIGHTS = "crosscoder.safetensors"
RULES = ("topk", "batchtopk")
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


class Crosscoder(nn.Module):
    """A crosscoder over ``S`` sources of width ``d`` with ``n`` shared latents and ``k`` active per token.

    ``rule="topk"``: the k largest per token. ``rule="batchtopk"``: in training mode the B·k largest of the batch
    (:func:`~dlmscope.sae.sparsity.batch_topk_encode`, code width ``cap``, default ``min(n, 4k)``, growing where a
    row needs more), updating the inference threshold (a 0-d buffer, EMA with ``threshold_beta`` of the smallest
    kept value, first update sets it, as :class:`~dlmscope.sae.batchtopk.BatchTopKSAE`); in eval mode the entries
    with pre > threshold. Init: random concatenated decoder rows of unit norm, ``W_enc`` = that [n, S·d] matrix,
    zero biases. Parameters may be wider than the activations; they are cast to x's dtype for the op calls."""

    def __init__(self, S: int, d: int, n: int, k: int, *, rule: str = "topk", cap: int | None = None,
                 threshold_beta: float = 0.999, meta: dict | None = None, backend: str | None = None, device=None,
                 dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None):
        super().__init__()
        S, d, n = require_int("S", S, 1), require_int("d", d, 1), require_int("n", n, 1)
        k = require_int("k", k, 1)
        if k > n:
            raise ValueError(f"k must be <= n ({n}), got {k}")
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        cap = min(n, 4 * k) if cap is None else require_int("cap", cap, 1)
        if not k <= cap <= n:
            raise ValueError(f"cap must satisfy k <= cap <= n ({k} <= cap <= {n}), got {cap}")
        if not 0.0 <= float(threshold_beta) < 1.0:
            raise ValueError(f"threshold_beta must lie in [0, 1), got {threshold_beta}")
        self.S, self.d, self.n, self.k, self.rule, self.cap = S, d, n, k, rule, cap
        self.threshold_beta = float(threshold_beta)
        self.meta = dict(meta or {})
        self.backend = backend
        cat = torch.randn(n, S * d, generator=generator, dtype=torch.float32)
        cat = nn.functional.normalize(cat, dim=1).to(device=device, dtype=dtype)  # unit concatenated rows
        self.W_enc = nn.Parameter(cat.clone())
        self.b_enc = nn.Parameter(torch.zeros(n, device=device, dtype=dtype))
        self.W_dec = nn.Parameter(cat.reshape(n, S, d).transpose(0, 1).contiguous())
        self.b_dec = nn.Parameter(torch.zeros(S, d, device=device, dtype=dtype))
        wide = torch.promote_types(dtype, torch.float32)  # the EMA in at least float32 (see BatchTopKSAE)
        self.register_buffer("threshold", torch.zeros((), device=device, dtype=wide))
        self.register_buffer("threshold_updates", torch.zeros((), device=device, dtype=torch.int64))

    # ---- config ------------------------------------------------------------------------------------------
    def config(self) -> dict:
        """The JSON config of ``cfg.json`` (without the format header)."""
        return {"S": self.S, "d": self.d, "n": self.n, "k": self.k, "rule": self.rule, "cap": self.cap,
                "threshold_beta": self.threshold_beta, "meta": self.meta}

    def extra_repr(self) -> str:
        return f"S={self.S}, d={self.d}, n={self.n}, k={self.k}, rule={self.rule}, backend={self.backend or 'auto'}"

    def check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a float tensor, got {x.dtype}")
        if x.dim() != 3 or tuple(x.shape[1:]) != (self.S, self.d):
            raise ValueError(f"x has shape {list(x.shape)} but this crosscoder expects [B, S={self.S}, d={self.d}]")

    def _cast(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        return t if t.dtype == dtype else t.to(dtype)

    def _encoder_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x [B, S, d] checked and concatenated to [B, S·d], with W_enc, b_enc and the concatenated b_dec [S·d] in
        x's dtype: the one encoder over all sources."""
        self.check_input(x)
        return (x.reshape(x.shape[0], self.S * self.d), self._cast(self.W_enc, x.dtype),
                self._cast(self.b_enc, x.dtype), self._cast(self.b_dec, x.dtype).reshape(self.S * self.d))

    # ---- forward -----------------------------------------------------------------------------------------
    def encode(self, x: Tensor, *, update_threshold: bool | None = None) -> tuple[Tensor, Tensor]:
        """(values [B, c], indices [B, c] int64) of x [B, S, d]: the padded sparse code (zero = inactive slot).

        The S sources are concatenated to one row of width S·d (source-major) and encoded with the concatenated
        b_dec. Top-K: c = k. BatchTopK: see the class doc (``update_threshold=False`` leaves the buffer alone)."""
        x2, W_enc, b_enc, b_cat = self._encoder_inputs(x)
        if self.rule == "topk":
            return ops.topk_encode(x2, W_enc, b_enc, b_cat, self.k, backend=self.backend)
        if not self.training:
            return threshold_encode(x2, W_enc, b_enc, b_cat, self.threshold.to(x.dtype), self.cap,
                                    backend=self.backend)
        values, indices, _ = batch_topk_encode(x2, W_enc, b_enc, b_cat, self.k, self.cap, backend=self.backend)
        if update_threshold is None or update_threshold:
            self.update_threshold(values)
        return values, indices

    def encode_with_aux(self, x: Tensor, aux_mask: Tensor, k_aux: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Training-mode :meth:`encode` plus AuxK's selection from the same encoder op call (no second encode, no
        host sync): ``(values, indices, aux_values [B, k_aux], aux_indices [B, k_aux])``, the aux code being per
        row the ``k_aux`` largest relu'd pre-activations among the latents where ``aux_mask`` [n] bool is True,
        zero-padded where fewer are (``ops.topk_encode_grouped``'s AuxK selection). Updates the BatchTopK
        threshold as :meth:`encode` does."""
        x2, W_enc, b_enc, b_cat = self._encoder_inputs(x)
        if self.rule == "topk":
            codes = ops.topk_encode_grouped(x2, W_enc, b_enc, b_cat, [self.k], [self.n], aux_mask=aux_mask,
                                            k_aux=[k_aux], backend=self.backend)
            return codes.values, codes.indices, codes.aux_values, codes.aux_indices
        values, indices, _, aux_values, aux_indices = batch_topk_encode_aux(
            x2, W_enc, b_enc, b_cat, self.k, self.cap, aux_mask, k_aux, backend=self.backend)
        self.update_threshold(values)
        return values, indices, aux_values, aux_indices

    @torch.no_grad()
    def update_threshold(self, values: Tensor) -> None:
        """Fold a training batch's BatchTopK code [B, c] into the inference threshold's moving average."""
        update_threshold_ema(self.threshold, self.threshold_updates, values, self.threshold_beta)

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        """x̂ [B, S, d] from values / indices [B, c]: one ``ops.sparse_decode`` per source."""
        W_dec, b_dec = self._cast(self.W_dec, values.dtype), self._cast(self.b_dec, values.dtype)
        return torch.stack([ops.sparse_decode(values, indices, W_dec[s], b_dec[s], backend=self.backend)
                            for s in range(self.S)], dim=1)

    def encode_dense(self, x: Tensor) -> Tensor:
        """The code of x [B, S, d] as a dense [B, n] tensor (zeros off the selection), for analysis."""
        values, indices = self.encode(x, update_threshold=False)
        return values.new_zeros(values.shape[0], self.n).scatter_add_(1, indices, values)

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction x̂ [B, S, d] of x [B, S, d]."""
        return self.decode(*self.encode(x))

    # ---- decoder geometry --------------------------------------------------------------------------------
    def decoder_cat(self) -> Tensor:
        """The concatenated decoder [n, S·d] (a copy): row i = concat_s W_dec[s, i], unit norm by convention."""
        return self.W_dec.detach().transpose(0, 1).reshape(self.n, self.S * self.d)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every latent's concatenated decoder row [S·d] to unit norm (the invariant training keeps)."""
        norms = self.W_dec.pow(2).sum(dim=(0, 2)).sqrt().clamp_min(torch.finfo(self.W_dec.dtype).tiny)
        self.W_dec.div_(norms[None, :, None])

    # ---- persistence -------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``cfg.json`` + ``crosscoder.safetensors`` to the directory ``path`` atomically; returns it.

        ``path`` may be missing, empty, or a previous crosscoder checkpoint (replaced as a whole); a directory
        holding anything else is refused with ``FileExistsError`` before anything is written."""
        target = atomic.resolve_link(path)
        atomic.restore_directory(target)
        if target.is_dir():
            foreign = sorted(set(os.listdir(target)) - {CFG, WEIGHTS})
            if foreign:
                raise FileExistsError(f"{target} holds {foreign[:5]}, not only a crosscoder checkpoint; refusing "
                                      f"to replace it")
        tensors = {name: getattr(self, name).detach().to("cpu").contiguous() for name in PARAMS}
        tensors["threshold"] = self.threshold.detach().to("cpu").contiguous()
        with atomic.atomic_directory(target) as tmp:
            formats.write_safetensors(tmp / WEIGHTS, tensors, metadata={"format": "pt"})
            formats.write_json(tmp / CFG, {"format": FORMAT, "version": VERSION, **self.config()})
        atomic.sweep_leftovers(target.parent, lambda owner: owner == target.name)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike, *, device=None, dtype: torch.dtype | None = None,
             backend: str | None = None) -> "Crosscoder":
        """The crosscoder saved at ``path``; ``ValueError`` naming the file for a wrong format or version, a
        config that is not a crosscoder's, tensors missing / extra / of the wrong shape / not finite floats."""
        path = atomic.resolve_link(path)
        atomic.restore_directory(path)
        cfg_file, weights_file = path / CFG, path / WEIGHTS
        cfg = formats.read_json(cfg_file)  # ValueError naming the file for a missing, corrupt or non-object config
        if cfg.get("format") != FORMAT:
            got = cfg.get("format")
            raise ValueError(f"{cfg_file}: field 'format' is {got!r}, expected {FORMAT!r} (not a crosscoder; an "
                             f"SAE loads with dlmscope.sae.load)")
        if cfg.get("version") != VERSION:
            raise ValueError(f"{cfg_file}: unsupported crosscoder version {cfg.get('version')!r} (reads {VERSION})")
        fields = {key: cfg.get(key) for key in ("S", "d", "n", "k", "rule", "cap", "threshold_beta", "meta")}
        try:
            with torch.device("meta"):  # shapes and checks only; the tensors come from the file
                cc = cls(fields["S"], fields["d"], fields["n"], fields["k"], rule=fields["rule"], cap=fields["cap"],
                         threshold_beta=fields["threshold_beta"], meta=fields["meta"], backend=backend)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{cfg_file}: bad crosscoder config: {e}") from e
        tensors = formats.read_safetensors(weights_file)  # ValueError naming the file when missing or corrupt
        names = PARAMS + ("threshold",)
        if set(tensors) != set(names):
            raise ValueError(f"{weights_file}: tensors {sorted(tensors)}, expected {sorted(names)}")
        for name in names:
            t, want = tensors[name], tuple(getattr(cc, name).shape)
            if tuple(t.shape) != want:
                raise ValueError(f"{weights_file}: tensor {name!r} has shape {list(t.shape)}, expected {list(want)} "
                                 f"for S={cc.S}, d={cc.d}, n={cc.n} from {CFG}")
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise ValueError(f"{weights_file}: tensor {name!r} must be finite floats")
        for name in PARAMS:
            setattr(cc, name, nn.Parameter(tensors[name]))
        cc.threshold = tensors["threshold"]
        cc.threshold_updates = torch.tensor(int(bool(tensors["threshold"] > 0)))
        if device is not None or dtype is not None:
            cc.to(device=device, dtype=dtype)
        return cc
