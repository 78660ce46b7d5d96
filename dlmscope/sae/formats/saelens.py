"""SAELens (``sae-lens``): ``cfg.json`` + ``sae_weights.safetensors``.

Weights (``SAE.save_model``, i.e. the module's state dict): ``W_enc [d_in, d_sae]`` (transposed w.r.t. ours),
``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``; a JumpReLU adds ``threshold [d_sae]``, a BatchTopK /
Matryoshka training checkpoint ``topk_threshold []`` (float64).

Config, two generations (checked against sae-lens 6.54.12, whose loader converts the old one itself):

- **v6+** (``metadata.sae_lens_version >= 6``): ``{"architecture", "d_in", "d_sae", "dtype", "device",
  "apply_b_dec_to_input", "normalize_activations", "reshape_activations", "metadata": {"sae_lens_version",
  "model_name", "hook_name", "training_architecture", "training_architecture_details", ...}}`` plus the
  architecture's fields (``topk``: ``k``, ``rescale_acts_by_decoder_norm``).
- **pre-6** (no version, or < 6): ``"architecture": "standard"`` (or absent) with ``"activation_fn_str": "topk"``
  and ``"activation_fn_kwargs": {"k": K}``, or ``"architecture": "jumprelu"``; ``normalize_activations`` may be a
  bool; model fields at top level.

What each file maps to (sae-lens 6.54.12; ``BatchTopKTrainingSAE.process_state_dict_for_saving_inference`` and
``get_inference_config_class`` make the inference save of a BatchTopK or Matryoshka-BatchTopK SAE a JumpReLU whose
``threshold`` is ``topk_threshold`` for every latent, with ``metadata.training_architecture`` and
``training_architecture_details`` (``k``, ``matryoshka_widths``, ...) recording how it was trained):

- ``topk`` -> :class:`TopKSAE`.
- ``jumprelu`` trained as ``batchtopk``, one threshold for all latents, integral k -> ``BatchTopKSAE``, θ = that
  value; trained as ``matryoshka_batchtopk``, likewise -> ``MatryoshkaSAE``, ``prefixes = matryoshka_widths``.
- any other ``jumprelu`` (per-latent θ) -> ``JumpReLUSAE``, ``k`` = our ``"dlmscope_k"`` or min(n, 64).
- a ``batchtopk`` / ``matryoshka_batchtopk`` training checkpoint -> ``BatchTopKSAE`` / ``MatryoshkaSAE``,
  θ = ``topk_threshold``.

Semantics: ``pre = (x - b_dec·apply_b_dec_to_input) @ W_enc + b_enc``, optionally ``* ‖W_dec_i‖``
(``rescale_acts_by_decoder_norm``, a ``topk`` field, and a training checkpoint's, where it defaults to true); Top-K:
relu of the top-k; JumpReLU: ``relu(pre) · [pre > θ]``; BatchTopK training checkpoint: the batch's top ``k·B``
(``encode``; its inference rule is the threshold); decode ``acts (/ ‖W_dec_i‖) @ W_dec + b_dec``.
``apply_b_dec_to_input=false`` and ``rescale_acts_by_decoder_norm=true`` are folded into the weights on load (same
outputs, weights not bitwise the file's; recorded in ``meta["source"]["folded"]``), and so are negative JumpReLU
thresholds (set to 0: the ReLU makes them act as 0; a θ = 0 latent must be floored before training,
``JumpReLUSAE.floor_threshold_``). A JumpReLU's bandwidth, when its metadata records SAELens
training (``jumprelu_bandwidth``), becomes ``meta["jumprelu_bandwidth"]``. The threshold keeps its stored dtype
(SAELens's training SAE keeps it float32 whatever the SAE's dtype); the four parameters are cast to ``cfg["dtype"]``
as SAELens does. A file trained as BatchTopK whose threshold varies per latent, or whose k is not an integer, is a
JumpReLU to us (why: ``meta["source"]["note"]``).
Rejected: any other architecture (standard, gated, abstopk, transcoders, ...), ``normalize_activations`` other
than none (the scale is not in the file), a non-trivial finetuning scaling factor, a training checkpoint whose k is
not an integer.

We write the v6 layout with ``metadata.sae_lens_version = "6.0.0"`` (the layout version; SAELens' own writer
puts its package version there): a Top-K SAE as ``topk``; the others as the ``jumprelu`` inference SAE that
SAELens's own trainers save, a BatchTopK / Matryoshka threshold repeated per latent, and
``metadata.training_architecture`` (``batchtopk`` / ``matryoshka_batchtopk`` / ``jumprelu``) with ``k``,
``matryoshka_widths`` or ``jumprelu_bandwidth`` in its details, so that each reads back as its own class (a
JumpReLU read from a SAELens file keeps that file's metadata as it was). A training checkpoint is written back as
the inference save SAELens would make of it (its training fields moved into the metadata).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from . import _checks as C
from .config import SAEConfig, default_jumprelu_k

NAME = "saelens"
#: the SAE architectures (``SAEConfig.arch``) this format holds
SUPPORTED_ARCHS = ("topk", "batchtopk", "jumprelu", "matryoshka")
CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")
DESCRIPTION = f"{CFG} + {WEIGHTS}"
LAYOUT_VERSION = "6.0.0"
#: the peer config key (SAELens's cfg.json, dictionary_learning's config.json) holding a JumpReLU SAE's k where it
#: is not :func:`default_jumprelu_k`; the peers ignore unknown keys
K_KEY = "dlmscope_k"

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
#: pre-6 top-level fields that SAELens moves into ``metadata`` (sae_lens.loading.pretrained_sae_loaders)
_METADATA_KEYS = ("model_name", "hook_name", "model_class_name", "hook_head_index", "model_from_pretrained_kwargs",
                  "prepend_bos", "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice",
                  "dataset_path", "sae_lens_version", "sae_lens_training_version", "hook_name_out",
                  "hook_head_index_out", "hf_hook_name", "hf_hook_name_out")
_PRE6_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index"}
#: SAELens's BatchTopK-family training architectures -> our architecture
_BATCHTOPK = {"batchtopk": "batchtopk", "matryoshka_batchtopk": "matryoshka"}
#: our architecture -> the SAELens training architecture we record for it
_TRAINED_AS = {"batchtopk": "batchtopk", "matryoshka": "matryoshka_batchtopk", "jumprelu": "jumprelu"}
#: the fields of SAELens's inference ``SAEConfig`` (a training checkpoint's others move into the metadata)
_INFERENCE_FIELDS = ("d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
                     "reshape_activations", "metadata", "architecture")


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


def _architecture(cfg: dict, file: Path) -> str:
    """``topk``, ``jumprelu``, ``batchtopk`` or ``matryoshka_batchtopk``; ValueError for anything else."""
    architecture = cfg.get("architecture", "standard")
    if isinstance(architecture, str) and architecture in ("topk", "jumprelu", *_BATCHTOPK):
        return architecture
    if _is_v6(cfg):
        raise ValueError(f"{file}: SAELens architecture {architecture!r} is not supported (dlmscope reads topk, "
                         f"jumprelu, and batchtopk / matryoshka_batchtopk training checkpoints)")
    activation = cfg.get("activation_fn_str", cfg.get("activation_fn"))
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if activation == "topk" and isinstance(kwargs, dict) and kwargs.get("k") is not None:
        return "topk"
    raise ValueError(f"{file}: SAELens cfg (pre-6 layout) describes architecture={architecture!r}, "
                     f"activation_fn={activation!r}; only Top-K and JumpReLU SAEs load")


def _topk_k(cfg: dict, file: Path) -> int:
    """k of a Top-K SAELens cfg (either generation)."""
    activation = cfg.get("activation_fn_str", cfg.get("activation_fn"))
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if not _is_v6(cfg) and activation == "topk" and isinstance(kwargs, dict) and kwargs.get("k") is not None:
        return C.cfg_int(kwargs, "k", file, where="['activation_fn_kwargs']")
    return C.cfg_int(cfg, "k", file)


def _training(cfg: dict) -> tuple[str | None, dict]:
    """(metadata.training_architecture, its details as a dict) of a cfg; None / {} where absent or not those."""
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    details = metadata.get("training_architecture_details")
    trained_as = metadata.get("training_architecture")
    return (trained_as if isinstance(trained_as, str) else None), (details if isinstance(details, dict) else {})


def _implied(cfg: dict) -> dict:
    """The meta entries a SAELens cfg states itself: the bandwidth of a SAELens-trained JumpReLU."""
    trained_as, details = _training(cfg)
    if trained_as == "jumprelu" and C.is_positive_number(details.get("jumprelu_bandwidth")):
        return {"jumprelu_bandwidth": details["jumprelu_bandwidth"]}
    return {}


def _prefixes(widths, n: int) -> list[int] | None:
    """Matryoshka prefixes from SAELens's ``matryoshka_widths`` (cumulative; n appended when missing, as SAELens's
    config check does); None when they are not increasing positive ints."""
    if not isinstance(widths, list) or not widths or any(C.integral(w) is None for w in widths):
        return None
    widths = [C.integral(w) for w in widths]
    widths = widths if widths[-1] == n else widths + [n]
    ok = widths[0] >= 1 and all(a < b for a, b in zip(widths, widths[1:])) and widths[-1] == n
    return widths if ok else None


# ---- save -------------------------------------------------------------------------------------------------------


def _as_inference(base: dict) -> dict:
    """A BatchTopK-family training checkpoint's cfg laid out as its inference save (``get_inference_sae_cfg_dict``):
    the training fields move into ``metadata.training_architecture_details``."""
    metadata = dict(base.get("metadata") or {})
    details = dict(metadata.get("training_architecture_details") or {})
    details.update({k: v for k, v in base.items() if k not in _INFERENCE_FIELDS and k != C.META_KEY})
    metadata.update(training_architecture=base["architecture"], training_architecture_details=details)
    return {**{k: v for k, v in base.items() if k in _INFERENCE_FIELDS}, "metadata": metadata}


def save(sc: SAEConfig, tensors: dict[str, Tensor], directory: Path) -> None:
    base, embed = C.peer_base(sc.meta, NAME, _implied)
    if base and not _is_v6(base):  # a pre-6 file re-exported: carry its model fields into v6 metadata
        metadata = {_PRE6_RENAMES.get(k, k): v for k, v in base.items() if _PRE6_RENAMES.get(k, k) in _METADATA_KEYS}
        base = {"metadata": metadata}
    if isinstance(base.get("architecture"), str) and base["architecture"] in _BATCHTOPK:
        base = _as_inference(base)
    t = C.cpu_tensors(tensors)
    dtype = t["W_enc"].dtype
    if any(t[key].dtype != dtype for key in KEYS):  # the threshold may be wider (SAELens keeps it float32 too)
        raise ValueError(f"SAELens stores one dtype per SAE; parameters have {[str(t[k].dtype) for k in KEYS]}")
    metadata = dict(base.get("metadata") or {})
    metadata.setdefault("sae_lens_version", LAYOUT_VERSION)
    cfg = dict(base)
    cfg.update({
        "d_in": sc.d, "d_sae": sc.n, "dtype": _DTYPE_NAMES[dtype], "device": cfg.get("device", "cpu"),
        "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": cfg.get("reshape_activations", "none"), "metadata": metadata,
    })
    weights = {"W_enc": t["W_enc"].T.contiguous(), "b_enc": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
    if sc.arch == "topk":
        cfg.update({"architecture": "topk", "k": sc.k, "rescale_acts_by_decoder_norm": False})
    else:
        cfg["architecture"] = "jumprelu"
        for key in ("k", "rescale_acts_by_decoder_norm", K_KEY):  # not JumpReLU fields
            cfg.pop(key, None)
        if sc.arch != "jumprelu" or not base:  # a peer JumpReLU keeps its own provenance (or none)
            metadata["training_architecture"] = _TRAINED_AS[sc.arch]
        details = dict(metadata.get("training_architecture_details") or {})
        if sc.arch in _TRAINED_AS and sc.arch != "jumprelu":
            details["k"] = sc.k
        if sc.arch == "matryoshka":
            details["matryoshka_widths"] = list(sc.prefixes)
        if metadata.get("training_architecture") == "jumprelu" and "jumprelu_bandwidth" in sc.meta:
            details["jumprelu_bandwidth"] = sc.meta["jumprelu_bandwidth"]
        if details:
            metadata["training_architecture_details"] = details
        if sc.arch == "jumprelu" and sc.k != default_jumprelu_k(sc.n):
            cfg[K_KEY] = sc.k
        theta = t["threshold"]
        weights["threshold"] = theta if theta.dim() == 1 else theta.expand(sc.n).contiguous()  # in its own dtype
    if embed is not None:
        cfg[C.META_KEY] = embed
    C.write_safetensors(directory / WEIGHTS, weights)
    C.write_json(directory / CFG, cfg)


# ---- load -------------------------------------------------------------------------------------------------------


def _read_cfg(cfg: dict, cfg_file: Path) -> torch.dtype:
    """Reject what no architecture supports; the dtype SAELens casts the weights to."""
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
    return _DTYPES[dtype_name]


def _jumprelu(cfg: dict, theta: Tensor, n: int, cfg_file: Path) -> tuple[str, int, list | None, Tensor, dict, dict]:
    """(arch, k, prefixes, threshold, meta top entries, source extras) of a SAELens JumpReLU file: BatchTopK or
    Matryoshka where its metadata says so and the threshold is one value (see the module doc), else JumpReLU."""
    trained_as, details = _training(cfg)
    extra: dict = {}
    if trained_as in _BATCHTOPK:
        k, scalar = C.integral(details.get("k")), C.constant(theta)
        prefixes = _prefixes(details.get("matryoshka_widths"), n) if trained_as == "matryoshka_batchtopk" else None
        problems = [why for bad, why in (
            (scalar is None, "its threshold differs between latents"),
            (k is None or not 1 <= k <= n, f"its training k={details.get('k')!r} is not an integer in [1, n]"),
            (trained_as == "matryoshka_batchtopk" and prefixes is None,
             f"its matryoshka_widths={details.get('matryoshka_widths')!r} are not increasing positive ints <= n"),
        ) if bad]
        if not problems:
            return _BATCHTOPK[trained_as], k, prefixes, scalar, {}, extra
        extra["note"] = f"trained as {trained_as} but loaded as JumpReLU: {'; '.join(problems)}"
    k = C.cfg_int(cfg, K_KEY, cfg_file) if K_KEY in cfg else default_jumprelu_k(n)
    C.require_k(k, n, cfg_file)
    return "jumprelu", k, None, theta, _implied(cfg), extra


def load(path: Path) -> tuple[SAEConfig, dict[str, Tensor]]:
    cfg_file, weights_file = path / CFG, path / WEIGHTS
    cfg = C.read_json(cfg_file)
    architecture = _architecture(cfg, cfg_file)
    d = C.cfg_int(cfg, "d_in", cfg_file)
    n = C.cfg_int(cfg, "d_sae", cfg_file)
    k = _topk_k(cfg, cfg_file) if architecture == "topk" else None
    if k is not None:
        C.require_k(k, n, cfg_file)
    dtype = _read_cfg(cfg, cfg_file)

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
    if architecture == "jumprelu" and "threshold" not in t:
        raise ValueError(f"{cfg_file}: SAELens architecture 'jumprelu' is not a Top-K SAE and needs the per-latent "
                         f"tensor 'threshold', which {weights_file} lacks (found {sorted(t)})")
    W_enc, b_enc, W_dec, b_dec = (t[key] if t[key].dtype == dtype else t[key].to(dtype) for key in KEYS)
    W_enc = W_enc.T  # -> [n, d]

    folded = []
    if not cfg.get("apply_b_dec_to_input", True):
        # x @ W_enc + b_enc == (x - b_dec) @ W_enc + (b_enc + W_enc b_dec)
        b_enc = C.fold_b_dec(W_enc, b_enc, b_dec)
        folded.append("apply_b_dec_to_input=false")
    # a JumpReLU has no such field (SAELens ignores one); a BatchTopK training config defaults it to true
    if architecture != "jumprelu" and cfg.get("rescale_acts_by_decoder_norm", architecture in _BATCHTOPK):
        norms = W_dec.double().norm(dim=-1)
        if not bool((norms > 0).all()):
            raise ValueError(f"{weights_file}: rescale_acts_by_decoder_norm=true with zero-norm decoder rows")
        W_enc = (W_enc.double() * norms[:, None]).to(dtype)
        b_enc = (b_enc.double() * norms).to(dtype)
        W_dec = (W_dec.double() / norms[:, None]).to(dtype)
        folded.append("rescale_acts_by_decoder_norm=true")

    arch, prefixes, extras, top, extra = "topk", None, {}, {}, {}
    if architecture != "topk":
        key, shape = ("threshold", (n,)) if architecture == "jumprelu" else ("topk_threshold", ())
        theta, negative = C.nonnegative(C.require_threshold(t, key, shape, weights_file,
                                                            f"{list(shape)} for a SAELens {architecture} SAE"))
        if negative:
            folded.append(f"{negative} negative threshold(s) set to 0")
        if architecture == "jumprelu":
            arch, k, prefixes, theta, top, extra = _jumprelu(cfg, theta, n, cfg_file)
        else:  # a training checkpoint: its own architecture and fields
            arch, k = _BATCHTOPK[architecture], C.integral(cfg.get("k"))
            if k is None or not 1 <= k <= n:
                raise ValueError(f"{cfg_file}: SAELens {architecture} k={cfg.get('k')!r} is not an integer in "
                                 f"[1, d_sae={n}] (dlmscope's BatchTopK SAEs keep an integral k per row)")
            if architecture == "matryoshka_batchtopk":
                prefixes = _prefixes(cfg.get("matryoshka_widths"), n)
                if prefixes is None:
                    raise ValueError(f"{cfg_file}: matryoshka_widths={cfg.get('matryoshka_widths')!r} must be "
                                     f"increasing positive ints up to d_sae={n}")
        extras["threshold"] = theta
    if folded:
        extra["folded"] = folded
    cfg_copy = json.loads(json.dumps(cfg))
    meta = C.meta_from_peer(cfg_copy, NAME, cfg_file, top, **extra)
    return C.build_state(d=d, n=n, k=k, meta=meta, file=cfg_file, arch=arch, prefixes=prefixes, W_enc=W_enc,
                         b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, **extras)
