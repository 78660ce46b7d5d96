"""A :class:`~dlmscope.sae.topk.TopKSAE` as SAEBench's custom SAE (:class:`SAEBenchSAE`), weights shared.

SAEBench (github.com/adamkarvonen/SAEBench) is not imported. Per SAEBench's
``sae_bench/custom_saes/base_sae.py`` and ``custom_sae_config.py`` (read in the zachmccrth/ and d0rbu/SAEBench copies),
upstream ``custom_saes/topk_sae.py`` and ``custom_saes/README.md``, a custom SAE is an ``nn.Module`` with
``encode(x) -> [..., d_sae]`` dense latents, ``decode(f)``, ``forward``, ``W_enc [d_in, d_sae]``, ``W_dec [d_sae,
d_in]`` (unit-norm rows), ``b_enc``, ``b_dec``, ``device``, ``dtype`` and a ``cfg`` with CustomSAEConfig's fields
(:class:`SAEBenchConfig`; ``cfg.dtype`` a string like ``"float32"``; default hook ``blocks.{L}.hook_resid_post``).
SAEBench reads a field from the cfg, else from ``cfg.metadata`` (SAELens 6), so both carry it: :class:`SAEBenchSAE`.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

from torch import Tensor, nn

__all__ = ["SAEBenchConfig", "SAEBenchSAE"]


@dataclasses.dataclass
class SAEBenchConfig:
    """SAEBench's CustomSAEConfig fields, with the values that describe a dlmscope Top-K SAE, plus ``k``."""

    model_name: str
    d_in: int
    d_sae: int
    hook_layer: int
    hook_name: str
    context_size: int | None = None
    hook_head_index: int | None = None
    architecture: str = "topk"
    k: int | None = None
    apply_b_dec_to_input: bool = True           # our encoder subtracts b_dec
    finetuning_scaling_factor: bool = False
    activation_fn_str: str = "topk"
    activation_fn_kwargs: dict = dataclasses.field(default_factory=dict)
    prepend_bos: bool = True
    normalize_activations: str = "none"         # the norm factor is folded into the saved weights
    dtype: str = ""
    device: str = ""
    model_from_pretrained_kwargs: dict = dataclasses.field(default_factory=dict)
    dataset_path: str = ""
    dataset_trust_remote_code: bool = True
    seqpos_slice: tuple = (None,)
    training_tokens: int = -100_000
    sae_lens_training_version: str | None = None
    neuronpedia_id: str | None = None

    @property
    def metadata(self) -> SimpleNamespace:
        """The SAELens-6 ``cfg.metadata`` view of the model fields (a fresh copy at every read)."""
        keys = ("model_name", "hook_name", "hook_layer", "hook_head_index", "context_size", "prepend_bos",
                "seqpos_slice", "dataset_path", "model_from_pretrained_kwargs", "neuronpedia_id")
        return SimpleNamespace(**{key: getattr(self, key) for key in keys})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: fields that describe the wrapped SAE's maths: set by the wrapper, never by the caller
_FIXED = {"d_in", "d_sae", "k", "dtype", "device", "architecture", "apply_b_dec_to_input", "activation_fn_str",
          "activation_fn_kwargs", "normalize_activations", "finetuning_scaling_factor", "model_name", "hook_layer",
          "hook_name"}
_SAE_ATTRS = ("encode", "encode_dense", "decode", "W_enc", "b_enc", "W_dec", "b_dec", "cfg")


class SAEBenchSAE(nn.Module):
    """A TopKSAE as SAEBench's custom SAE. Weights are shared, not copied: ``W_enc`` is a transposed view of the
    TopKSAE's ``W_enc [n, d]``, the others are its parameters; moving or casting the wrapper moves the TopKSAE.
    ``device``, ``dtype`` and ``cfg.dtype`` / ``cfg.device`` always describe the shared weights. ``cfg_fields``
    sets further CustomSAEConfig fields (``training_tokens``, ``neuronpedia_id``, ``seqpos_slice``, ...)."""

    def __init__(self, sae: nn.Module, *, model_name: str, hook_layer: int, hook_name: str | None = None,
                 context_size: int | None = 128, prepend_bos: bool = True, dataset_path: str = "", **cfg_fields):
        super().__init__()
        missing = [a for a in _SAE_ATTRS if not hasattr(sae, a)]
        if not isinstance(sae, nn.Module) or missing:
            raise TypeError(f"SAEBenchSAE wraps a dlmscope TopKSAE, got {type(sae).__name__}"
                            + (f" (it lacks {missing})" if missing else " (not an nn.Module)"))
        d, n, k = (getattr(sae.cfg, a, None) for a in ("d", "n", "k"))
        if not all(isinstance(v, int) for v in (d, n, k)):
            raise TypeError(f"SAEBenchSAE: the SAE's cfg must give ints d, n, k; got d={d!r} n={n!r} k={k!r}")
        for name, shape in (("W_enc", (n, d)), ("b_enc", (n,)), ("W_dec", (n, d)), ("b_dec", (d,))):
            if tuple(getattr(sae, name).shape) != shape:
                raise ValueError(f"SAEBenchSAE: {name} has shape {list(getattr(sae, name).shape)}, expected "
                                 f"{list(shape)} (the TopKSAE layout W_enc/W_dec [n, d])")
        if isinstance(hook_layer, bool) or not isinstance(hook_layer, int) or hook_layer < 0:
            raise ValueError(f"hook_layer must be an int >= 0 (the block whose output the SAE reads), "
                             f"got {hook_layer!r}")
        if not isinstance(model_name, str) or not model_name:
            raise ValueError(f"model_name must be a non-empty string, got {model_name!r}")
        fields = {f.name for f in dataclasses.fields(SAEBenchConfig)}
        bad = sorted(set(cfg_fields) - (fields - _FIXED))
        if bad:
            why = "they follow from the wrapped SAE" if set(bad) <= _FIXED else f"settable: {sorted(fields - _FIXED)}"
            raise ValueError(f"cannot set cfg fields {bad}: {why}")
        self.sae = sae
        self._cfg = SAEBenchConfig(model_name=model_name, d_in=d, d_sae=n, hook_layer=hook_layer,
                                   hook_name=hook_name or f"blocks.{hook_layer}.hook_resid_post",
                                   context_size=context_size, k=k, activation_fn_kwargs={"k": k},
                                   prepend_bos=prepend_bos, dataset_path=dataset_path, **cfg_fields)

    # the shared weights in SAEBench's layout: W_enc a transposed view of the TopKSAE's [n, d], the rest as they are
    W_enc = property(lambda self: self.sae.W_enc.t(), doc="[d_in, d_sae] view of the TopKSAE's W_enc [n, d]")
    W_dec = property(lambda self: self.sae.W_dec, doc="[d_sae, d_in], unit-norm rows")
    b_enc = property(lambda self: self.sae.b_enc, doc="[d_sae]")
    b_dec = property(lambda self: self.sae.b_dec, doc="[d_in]")
    k = property(lambda self: self.sae.cfg.k, doc="active latents per input")
    # setting device / dtype moves the weights (BaseSAE.to updates these attributes, so SAEBench may set them)
    device = property(lambda self: self.sae.W_dec.device, lambda self, v: self.to(device=v))
    dtype = property(lambda self: self.sae.W_dec.dtype, lambda self, v: self.to(dtype=v))

    @property
    def cfg(self) -> SAEBenchConfig:
        self._cfg.dtype, self._cfg.device = str(self.dtype).removeprefix("torch."), str(self.device)
        return self._cfg

    def encode(self, x: Tensor) -> Tensor:
        """Dense latents ``[..., d_sae]``: the TopKSAE's own encoder (b_dec subtracted), zeros off the top k."""
        return self.sae.encode_dense(x)

    def decode(self, feature_acts: Tensor) -> Tensor:
        """``f @ W_dec + b_dec`` for any dense latents ``[..., d_sae]`` (not only top-k ones: ablations work)."""
        n = self.sae.cfg.n
        if not isinstance(feature_acts, Tensor) or feature_acts.dim() < 1 or feature_acts.shape[-1] != n:
            raise ValueError(f"decode takes dense latents [..., d_sae={n}], got "
                             f"{list(feature_acts.shape) if isinstance(feature_acts, Tensor) else type(feature_acts)}")
        W_dec, b_dec = (p if p.dtype == feature_acts.dtype else p.to(feature_acts.dtype)
                        for p in (self.sae.W_dec, self.sae.b_dec))
        return feature_acts @ W_dec + b_dec

    def forward(self, x: Tensor) -> Tensor:
        """``decode(encode(x))``: the same numbers as SAEBench's own encode-then-decode check."""
        return self.decode(self.encode(x))
