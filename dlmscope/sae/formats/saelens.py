"""SAELens (``sae-lens``): ``cfg.json`` + ``sae_weights.safetensors``.

Weights (``SAE.save_model``, i.e. the module's state dict): ``W_enc [d_in, d_sae]`` (transposed w.r.t. ours),
``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``.

Config, two generations (checked against sae-lens 6.54.12, whose loader converts the old one itself):

- **v6+** (``metadata.sae_lens_version >= 6``): ``{"architecture": "topk", "d_in", "d_sae", "k", "dtype",
  "device", "apply_b_dec_to_input", "normalize_activations", "reshape_activations",
  "rescale_acts_by_decoder_norm", "metadata": {"sae_lens_version", "model_name", "hook_name", ...}}``.
- **pre-6** (no version, or < 6): ``"architecture": "standard"`` (or absent) with ``"activation_fn_str": "topk"``
  and ``"activation_fn_kwargs": {"k": K}``; ``normalize_activations`` may be a bool; model fields at top level.

Semantics: ``pre = (x - b_dec·apply_b_dec_to_input) @ W_enc + b_enc``, optionally ``* ‖W_dec_i‖``
(``rescale_acts_by_decoder_norm``); acts = relu of the top-k pre-activations; decode ``acts (/ ‖W_dec_i‖) @ W_dec +
b_dec``. ``apply_b_dec_to_input=false`` and ``rescale_acts_by_decoder_norm=true`` are folded into the weights on load
(same outputs, but the weights differ bitwise from the file's; recorded in ``meta["source"]["folded"]``).
Rejected: any other architecture, ``normalize_activations`` other than none (the scale is not in the file),
a non-trivial finetuning scaling factor. SAELens casts weights to ``cfg["dtype"]`` on load; so do we.
We write the v6 layout with ``metadata.sae_lens_version = "6.0.0"`` (the layout version; SAELens' own writer
puts its package version there).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from . import _checks as C
from .config import SAEConfig

NAME = "saelens"
CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")
DESCRIPTION = f"{CFG} + {WEIGHTS}"
LAYOUT_VERSION = "6.0.0"

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
#: pre-6 top-level fields that SAELens moves into ``metadata`` (sae_lens.loading.pretrained_sae_loaders)
_METADATA_KEYS = ("model_name", "hook_name", "model_class_name", "hook_head_index", "model_from_pretrained_kwargs",
                  "prepend_bos", "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice",
                  "dataset_path", "sae_lens_version", "sae_lens_training_version", "hook_name_out",
                  "hook_head_index_out", "hf_hook_name", "hf_hook_name_out")
_PRE6_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index"}


def detect(path: Path, files: set[str], cfg: dict | None) -> bool:
    return WEIGHTS in files


def _major_version(cfg: dict) -> int | None:
    version = cfg.get("sae_lens_version")
    if not version and isinstance(cfg.get("metadata"), dict):
        version = cfg["metadata"].get("sae_lens_version")
    if not version or not isinstance(version, str):
        return None
    try:
        return int(version.split(".")[0])
    except ValueError:
        return None


def _is_v6(cfg: dict) -> bool:
    major = _major_version(cfg)
    return major is not None and major >= 6


def _topk_k(cfg: dict, file: Path) -> int:
    """k of a Top-K SAELens cfg (either generation); ValueError for any other architecture."""
    architecture = cfg.get("architecture", "standard")
    if _is_v6(cfg):
        if architecture != "topk":
            raise ValueError(f"{file}: SAELens architecture {architecture!r} is not a Top-K SAE (need 'topk')")
        return C.cfg_int(cfg, "k", file)
    activation = cfg.get("activation_fn_str", cfg.get("activation_fn"))
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if activation == "topk" and isinstance(kwargs, dict) and kwargs.get("k") is not None:
        return C.cfg_int(kwargs, "k", file, where="['activation_fn_kwargs']")
    if architecture == "topk":
        return C.cfg_int(cfg, "k", file)
    raise ValueError(f"{file}: SAELens cfg (pre-6 layout) describes architecture={architecture!r}, "
                     f"activation_fn={activation!r}; only Top-K SAEs load as TopKSAE")


def save(sc: SAEConfig, tensors: dict[str, Tensor], directory: Path) -> None:
    base, embed = C.peer_base(sc.meta, NAME)
    if base and not _is_v6(base):  # a pre-6 file re-exported: carry its model fields into v6 metadata
        metadata = {_PRE6_RENAMES.get(k, k): v for k, v in base.items() if _PRE6_RENAMES.get(k, k) in _METADATA_KEYS}
        base = {"metadata": metadata}
    t = C.cpu_tensors(tensors)
    dtype = t["W_enc"].dtype
    if any(v.dtype != dtype for v in t.values()):
        raise ValueError(f"SAELens stores one dtype per SAE; parameters have {[str(v.dtype) for v in t.values()]}")
    metadata = dict(base.get("metadata") or {})
    metadata.setdefault("sae_lens_version", LAYOUT_VERSION)
    cfg = dict(base)
    cfg.update({
        "d_in": sc.d, "d_sae": sc.n, "dtype": _DTYPE_NAMES[dtype], "device": cfg.get("device", "cpu"),
        "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": cfg.get("reshape_activations", "none"), "metadata": metadata,
        "architecture": "topk", "k": sc.k, "rescale_acts_by_decoder_norm": False,
    })
    if embed is not None:
        cfg[C.META_KEY] = embed
    C.write_safetensors(directory / WEIGHTS, {"W_enc": t["W_enc"].T.contiguous(), "b_enc": t["b_enc"],
                                              "W_dec": t["W_dec"], "b_dec": t["b_dec"]})
    C.write_json(directory / CFG, cfg)


def load(path: Path) -> tuple[SAEConfig, dict[str, Tensor]]:
    cfg_file, weights_file = path / CFG, path / WEIGHTS
    cfg = C.read_json(cfg_file)
    k = _topk_k(cfg, cfg_file)
    d = C.cfg_int(cfg, "d_in", cfg_file)
    n = C.cfg_int(cfg, "d_sae", cfg_file)
    C.require_k(k, n, cfg_file)
    norm = cfg.get("normalize_activations", "none")
    if norm is None or norm is False:
        norm = "none"
    if norm != "none":
        raise ValueError(f"{cfg_file}: normalize_activations={norm!r} is not supported (the normalisation scale is "
                         "not part of the checkpoint; fold it into the weights first)")
    if cfg.get("finetuning_scaling_factor"):
        raise ValueError(f"{cfg_file}: finetuning_scaling_factor=true is not supported")
    if not isinstance(cfg.get("metadata", {}), dict):
        raise ValueError(f"{cfg_file}: field 'metadata' must be a JSON object, got {type(cfg['metadata']).__name__}")
    dtype_name = cfg.get("dtype", "float32")
    if isinstance(dtype_name, str) and dtype_name.startswith("torch."):
        dtype_name = dtype_name[len("torch."):]
    if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
        raise ValueError(f"{cfg_file}: unsupported dtype {cfg.get('dtype')!r} (one of {sorted(_DTYPES)})")
    dtype = _DTYPES[dtype_name]

    t = C.read_safetensors(weights_file)
    C.require_tensors(t, KEYS, weights_file)
    if "scaling_factor" in t and not bool((t["scaling_factor"] == 1).all()):
        raise ValueError(f"{weights_file}: a non-trivial 'scaling_factor' (finetuning scaling) is not supported")
    why = f"d_in={d}, d_sae={n} from {CFG}"
    C.require_shape(t, "W_enc", (d, n), weights_file, f"[d_in, d_sae] with {why}")
    C.require_shape(t, "b_enc", (n,), weights_file, f"[d_sae] with {why}")
    C.require_shape(t, "W_dec", (n, d), weights_file, f"[d_sae, d_in] with {why}")
    C.require_shape(t, "b_dec", (d,), weights_file, f"[d_in] with {why}")
    C.require_float_finite(t, KEYS, weights_file)
    W_enc, b_enc, W_dec, b_dec = (t[key] if t[key].dtype == dtype else t[key].to(dtype) for key in KEYS)
    W_enc = W_enc.T  # -> [n, d]

    folded = []
    if not cfg.get("apply_b_dec_to_input", True):
        # x @ W_enc + b_enc == (x - b_dec) @ W_enc + (b_enc + W_enc b_dec)
        b_enc = (b_enc.double() + W_enc.double() @ b_dec.double()).to(dtype)
        folded.append("apply_b_dec_to_input=false")
    if cfg.get("rescale_acts_by_decoder_norm", False):
        norms = W_dec.double().norm(dim=-1)
        if not bool((norms > 0).all()):
            raise ValueError(f"{weights_file}: rescale_acts_by_decoder_norm=true with zero-norm decoder rows")
        W_enc = (W_enc.double() * norms[:, None]).to(dtype)
        b_enc = (b_enc.double() * norms).to(dtype)
        W_dec = (W_dec.double() / norms[:, None]).to(dtype)
        folded.append("rescale_acts_by_decoder_norm=true")
    cfg_copy = json.loads(json.dumps(cfg))
    meta = C.meta_from_peer(cfg_copy, NAME, cfg_file, **({"folded": folded} if folded else {}))
    return C.build_state(d=d, n=n, k=k, meta=meta, file=cfg_file, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec)
