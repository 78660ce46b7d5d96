"""saprmarks/dictionary_learning — ``AutoEncoderTopK`` (also the DLM-Scope paper's released SAEs), ``BatchTopKSAE``,
``MatryoshkaBatchTopKSAE`` and ``JumpReluAutoEncoder``.

One directory per trained SAE (``resid_post_layer_{L}/trainer_{i}/``), checked against dictionary-learning 0.1.0:

- ``ae.pt``: ``torch.save`` of the module's state dict (CPU tensors). Biases are already scaled back to raw
  activations when the trainer normalised them (``scale_biases``, which scales the threshold too).
- ``config.json``: ``{"trainer": <the trainer's config>, "buffer": {...}}`` (``json.dump(indent=4)``);
  ``utils.load_dictionary`` dispatches on ``trainer.dict_class`` and passes ``trainer.k``. It is optional here
  (``from_pretrained`` needs only ``ae.pt``; when present it must agree with the tensors). Without it the class is
  told by the tensors: ``group_sizes`` -> Matryoshka, ``W_enc`` -> JumpReLU, else Top-K (a BatchTopKSAE's
  state dict is a Top-K one's: it needs its ``config.json``).

- ``AutoEncoderTopK`` -> :class:`TopKSAE`: ``b_dec, k (int32), threshold [], decoder.weight [d, n] (ours
  transposed), encoder.weight [n, d], encoder.bias``.
- ``BatchTopKSAE`` -> ``BatchTopKSAE``: the same tensors (``threshold`` = the inference threshold).
- ``MatryoshkaBatchTopKSAE`` -> ``MatryoshkaSAE``: ``W_enc [d, n] (transposed), b_enc, W_dec [n, d], b_dec, k,
  threshold [], group_sizes``.
- ``JumpReluAutoEncoder`` -> ``JumpReLUSAE``: ``W_enc [d, n] (transposed), b_enc, W_dec [n, d], b_dec,
  threshold [n]``.

Semantics: Top-K: top-k of ``relu(encoder(x - b_dec))``, identical to ours (its ``threshold`` only matters for
``encode(use_threshold=True)``, off by default; kept in ``meta["source"]["threshold"]``). BatchTopK / Matryoshka:
``forward`` uses the threshold, ``relu(pre) · [relu(pre) > θ]`` with ``pre = (x - b_dec) W + b_enc`` — ours for
θ >= 0; θ = -1 (never set, before ``threshold_start_step``) lets every positive entry through, i.e. acts as θ = 0,
which is what we load (the -1 kept in ``meta["source"]["threshold"]`` and written back on re-export); training
(``use_threshold=False``) is BatchTopK over the batch, ours too. Matryoshka prefixes = cumulative ``group_sizes``.
JumpReLU: ``relu(pre · [pre > θ])`` with ``pre = x W_enc + b_enc`` — b_dec is *not* subtracted from the input
(``apply_b_dec_to_input`` is False for a loaded one), so ``b_enc + W_enc b_dec`` is folded into our b_enc on load
and taken out again on save (outputs equal, b_enc not bitwise the file's: :func:`_checks.fold_b_dec`); negative
thresholds (its training does not clamp them) act as 0 and load as 0. ``k`` of a JumpReLU is our ``"dlmscope_k"``
or min(n, 64); ``trainer.bandwidth`` becomes ``meta["jumprelu_bandwidth"]``. ``ae.pt`` is read with
``weights_only=True``. Other dict classes (``AutoEncoder``, ``GatedAutoEncoder``, ``AutoEncoderNew``) are rejected.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from . import _checks as C
from .config import SAEConfig, default_jumprelu_k
from .saelens import K_KEY  # config.json holds a JumpReLU's k under the same key as SAELens's cfg.json

NAME = "dictionary_learning"
#: the SAE architectures (``SAEConfig.arch``) this format holds
SUPPORTED_ARCHS = ("topk", "batchtopk", "jumprelu", "matryoshka")
CFG = "config.json"
WEIGHTS = "ae.pt"
KEYS = ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec")
DESCRIPTION = f"{WEIGHTS} (+ {CFG})"
DICT_CLASS = "AutoEncoderTopK"
#: dict_class -> our architecture
DICT_CLASSES = {"AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk", "MatryoshkaBatchTopKSAE": "matryoshka",
                "JumpReluAutoEncoder": "jumprelu"}
_CLASS_OF = {arch: cls for cls, arch in DICT_CLASSES.items()}
_TRAINER_OF = {"topk": "TopKTrainer", "batchtopk": "BatchTopKTrainer", "matryoshka": "MatryoshkaBatchTopKTrainer",
               "jumprelu": "JumpReluTrainer"}
#: the parameters each class stores, named as ours: (W_enc, b_enc, W_dec, b_dec)
_PARAM_KEYS = {"topk": KEYS, "batchtopk": KEYS, "matryoshka": ("W_enc", "b_enc", "W_dec", "b_dec"),
               "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec")}
_BATCHTOPK_FIELDS = ("lr", "steps", "auxk_alpha", "warmup_steps", "decay_start", "threshold_beta",
                     "threshold_start_step", "top_k_aux", "seed", "activation_dim", "dict_size")
#: each trainer's config fields after trainer_class and dict_class, in its order (values for an SAE not trained by it)
_TRAINER_FIELDS = {
    "topk": ("lr", "steps", "auxk_alpha", "warmup_steps", "decay_start", "threshold_beta", "threshold_start_step",
             "seed", "activation_dim", "dict_size", "k", "device", "layer", "lm_name", "wandb_name",
             "submodule_name"),
    "batchtopk": _BATCHTOPK_FIELDS + ("k", "device", "layer", "lm_name", "wandb_name", "submodule_name"),
    "matryoshka": _BATCHTOPK_FIELDS + ("group_fractions", "group_weights", "group_sizes", "k", "device", "layer",
                                       "lm_name", "wandb_name", "submodule_name"),
    "jumprelu": ("lr", "steps", "seed", "activation_dim", "dict_size", "device", "layer", "lm_name", "wandb_name",
                 "submodule_name", "bandwidth", "sparsity_penalty", "sparsity_warmup_steps", "target_l0"),
}


def detect(path: Path, files: set[str], cfg: dict | None) -> bool:
    return WEIGHTS in files


def _first(meta: dict, *keys):
    for key in keys:
        if key in meta:
            return meta[key]
    return None


def _implied(config: dict) -> dict:
    """The meta entries a dictionary_learning config states itself: a JumpReLU trainer's bandwidth."""
    trainer = config.get("trainer")
    if (isinstance(trainer, dict) and trainer.get("dict_class") == _CLASS_OF["jumprelu"]
            and C.is_positive_number(trainer.get("bandwidth"))):
        return {"jumprelu_bandwidth": trainer["bandwidth"]}
    return {}


# ---- save -------------------------------------------------------------------------------------------------------


def _config(sc: SAEConfig, base: dict) -> dict:
    """config.json of ``sc``: the peer file's own (``base``) updated with the SAE's fields, or a trainer config of
    the class's trainer filled from ``meta``."""
    arch, meta = sc.arch, sc.meta
    if base:
        config = base
    else:
        trainer = {"trainer_class": _TRAINER_OF[arch], "dict_class": _CLASS_OF[arch],
                   **{field: None for field in _TRAINER_FIELDS[arch]}, "device": "cpu"}
        trainer["layer"] = _first(meta, "layer")
        trainer["lm_name"] = _first(meta, "lm_name", "model", "model_name")
        trainer["submodule_name"] = _first(meta, "submodule_name", "hook_point", "hook_name")
        config = {"trainer": trainer}
    trainer = config.setdefault("trainer", {})
    if trainer.get("dict_class") != _CLASS_OF[arch]:
        trainer["trainer_class"] = _TRAINER_OF[arch]
    trainer.update(dict_class=_CLASS_OF[arch], activation_dim=sc.d, dict_size=sc.n)
    trainer.setdefault("trainer_class", _TRAINER_OF[arch])
    if arch != "jumprelu":
        trainer["k"] = sc.k
    if arch == "matryoshka":
        sizes = [b - a for a, b in zip([0] + sc.prefixes, sc.prefixes)]
        if trainer.get("group_sizes") != sizes:
            trainer.update(group_fractions=[s / sc.n for s in sizes], group_sizes=sizes)
            if not isinstance(trainer.get("group_weights"), list) or len(trainer["group_weights"]) != len(sizes):
                trainer["group_weights"] = [1.0 / len(sizes)] * len(sizes)  # the trainer's default: uniform
    if arch == "jumprelu":
        if "jumprelu_bandwidth" in meta:
            trainer["bandwidth"] = meta["jumprelu_bandwidth"]
        config.pop(K_KEY, None)
        if sc.k != default_jumprelu_k(sc.n):
            config[K_KEY] = sc.k
    return config


def save(sc: SAEConfig, tensors: dict[str, Tensor], directory: Path) -> None:
    meta = sc.meta
    base, embed = C.peer_base(meta, NAME, _implied)
    config = _config(sc, base)
    if embed is not None:
        config[C.META_KEY] = embed
    t = C.cpu_tensors(tensors)
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    kept = source.get("threshold") if source.get("format") == NAME else None  # the file's -1 "never set"
    if sc.arch == "topk":
        theta = torch.tensor(float(kept) if C.is_finite_number(kept) else -1.0, dtype=torch.float32)
    elif sc.arch in ("batchtopk", "matryoshka"):
        theta = t["threshold"]
        if C.is_finite_number(kept) and kept < 0 and not bool(theta != 0):
            theta = torch.tensor(float(kept), dtype=theta.dtype)
    if sc.arch in ("topk", "batchtopk"):
        state = {  # the order of AutoEncoderTopK / BatchTopKSAE .state_dict()
            "b_dec": t["b_dec"],
            "k": torch.tensor(sc.k, dtype=torch.int),
            "threshold": theta,
            "decoder.weight": t["W_dec"].T.contiguous(),
            "encoder.weight": t["W_enc"],
            "encoder.bias": t["b_enc"],
        }
    elif sc.arch == "matryoshka":
        state = {  # the order of MatryoshkaBatchTopKSAE.state_dict()
            "W_enc": t["W_enc"].T.contiguous(), "b_enc": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"],
            "k": torch.tensor(sc.k, dtype=torch.int), "threshold": theta,
            "group_sizes": torch.tensor(config["trainer"]["group_sizes"]),
        }
    else:  # JumpReluAutoEncoder: its encoder does not subtract b_dec, so its b_enc holds ours − W_enc b_dec
        state = {"W_enc": t["W_enc"].T.contiguous(), "b_enc": C.fold_b_dec(t["W_enc"], t["b_enc"], t["b_dec"], -1),
                 "W_dec": t["W_dec"], "b_dec": t["b_dec"], "threshold": t["threshold"]}
    torch.save(state, directory / WEIGHTS)
    C.write_json(directory / CFG, config)


# ---- load -------------------------------------------------------------------------------------------------------


def _read_state(file: Path) -> dict:
    C.require_file(file, "weights file")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged zip or pickle fails in many ways (BadZipFile, KeyError, EOFError, ...)
        raise ValueError(f"{file}: cannot read torch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise ValueError(f"{file}: expected a state dict, got {type(state).__name__}")
    return state


def _arch(config: dict | None, state: dict, cfg_file: Path) -> tuple[str, dict]:
    """(our architecture, the config's trainer dict) from ``trainer.dict_class``, or from the tensors."""
    trainer: dict = {}
    dict_class = None
    if config is not None:
        trainer = config.get("trainer", {})
        if not isinstance(trainer, dict):
            raise ValueError(f"{cfg_file}: field 'trainer' must be a JSON object, got {type(trainer).__name__}")
        dict_class = trainer.get("dict_class")
    if dict_class is None:
        dict_class = ("MatryoshkaBatchTopKSAE" if "group_sizes" in state else
                      "JumpReluAutoEncoder" if "W_enc" in state else DICT_CLASS)
    if not isinstance(dict_class, str) or dict_class not in DICT_CLASSES:
        raise ValueError(f"{cfg_file}: dict_class {dict_class!r} is not supported (dlmscope reads "
                         f"{', '.join(DICT_CLASSES)})")
    return DICT_CLASSES[dict_class], trainer


def _k(state: dict, trainer: dict, n: int, weights_file: Path, cfg_file: Path) -> int:
    """k from the ``k`` buffer and/or ``trainer.k`` (which must agree)."""
    k_buf = state.get("k")
    k_file = C.real_scalar(k_buf, "k", weights_file, integer=True) if isinstance(k_buf, torch.Tensor) else None
    k_cfg = C.cfg_int(trainer, "k", cfg_file, where="['trainer']") if "k" in trainer else None
    if k_file is not None and k_cfg is not None and k_file != k_cfg:
        raise ValueError(f"{weights_file}: buffer k={k_file} disagrees with {CFG} trainer.k={k_cfg}")
    k = k_file if k_file is not None else k_cfg
    if k is None:
        raise ValueError(f"{weights_file}: no 'k' buffer and no {CFG} with trainer.k; cannot tell k")
    if k < 1:
        raise ValueError(f"{weights_file}: k={k} must be positive")
    C.require_k(k, n, weights_file)
    return k


def _prefixes(state: dict, trainer: dict, n: int, weights_file: Path, cfg_file: Path) -> list[int]:
    """Matryoshka prefixes: the cumulative ``group_sizes`` buffer (positive, summing to n; as in config.json)."""
    C.require_tensors(state, ["group_sizes"], weights_file)
    g = state["group_sizes"]
    if g.dim() != 1 or g.numel() == 0 or g.is_floating_point() or g.is_complex() or g.dtype == torch.bool:
        raise ValueError(f"{weights_file}: 'group_sizes' must be a 1-D integer tensor, got {g.dtype} {list(g.shape)}")
    sizes = [int(s) for s in g.tolist()]
    if any(s < 1 for s in sizes) or sum(sizes) != n:
        raise ValueError(f"{weights_file}: group_sizes {sizes} must be positive and sum to dict_size={n}")
    if "group_sizes" in trainer and trainer["group_sizes"] != sizes:
        raise ValueError(f"{weights_file}: buffer group_sizes={sizes} disagrees with {CFG} "
                         f"trainer.group_sizes={trainer['group_sizes']!r}")
    return [sum(sizes[:i + 1]) for i in range(len(sizes))]


def load(path: Path) -> tuple[SAEConfig, dict[str, Tensor]]:
    weights_file, cfg_file = path / WEIGHTS, path / CFG
    config = C.read_json(cfg_file) if cfg_file.exists() else None
    state = _read_state(weights_file)
    arch, trainer = _arch(config, state, cfg_file)
    enc, b_enc, dec, b_dec = keys = _PARAM_KEYS[arch]
    C.require_tensors(state, keys, weights_file)
    encoder = state[enc]
    if encoder.dim() != 2:
        raise ValueError(f"{weights_file}: tensor {enc!r} must be 2-D, got shape {list(encoder.shape)}")
    n, d = encoder.shape if enc == "encoder.weight" else encoder.shape[::-1]  # W_enc is [d, n]
    if config is not None:
        for field, value in (("activation_dim", d), ("dict_size", n)):
            if field in trainer:
                got = C.cfg_int(trainer, field, cfg_file, where="['trainer']")
                if got != value:
                    raise ValueError(f"{weights_file}: tensor {enc!r} has shape {list(encoder.shape)} but {CFG} "
                                     f"says {field}={got}")
    why = f"n={n}, d={d} from {enc!r}"
    C.require_shape(state, b_enc, (n,), weights_file, f"[n] with {why}")
    C.require_shape(state, dec, (d, n) if dec == "decoder.weight" else (n, d), weights_file,
                    f"{'[d, n]' if dec == 'decoder.weight' else '[n, d]'} with {why}")
    C.require_shape(state, b_dec, (d,), weights_file, f"[d] with {why}")
    C.require_float_finite(state, keys, weights_file)
    W_enc = encoder if enc == "encoder.weight" else encoder.T
    W_dec = state[dec].T if dec == "decoder.weight" else state[dec]
    bias = state[b_enc]

    extra, top, extras, prefixes = {}, {}, {}, None
    if arch == "jumprelu":
        k = C.cfg_int(config, K_KEY, cfg_file) if config is not None and K_KEY in config else default_jumprelu_k(n)
        C.require_k(k, n, cfg_file)
        theta, negative = C.nonnegative(C.require_threshold(state, "threshold", (n,), weights_file,
                                                            f"[n] with {why}"))
        bias = C.fold_b_dec(W_enc, bias, state[b_dec])  # its encoder does not subtract b_dec
        extra["folded"] = ["apply_b_dec_to_input=false"] + ([f"{negative} negative threshold(s) set to 0"]
                                                              if negative else [])
        extras["threshold"] = theta
        top = _implied(config) if config is not None else {}
    else:
        k = _k(state, trainer, n, weights_file, cfg_file)
        threshold = state.get("threshold")
        if arch == "topk":
            if isinstance(threshold, torch.Tensor):
                extra["threshold"] = C.real_scalar(threshold, "threshold", weights_file, integer=False)
        else:
            theta = C.require_threshold(state, "threshold", (), weights_file, "a 0-d inference threshold")
            if bool(theta < 0):  # -1: never set; acts as 0 (see the module doc)
                extra["threshold"] = float(theta)
                theta = torch.zeros((), dtype=theta.dtype)
            extras["threshold"] = theta
            if arch == "matryoshka":
                prefixes = _prefixes(state, trainer, n, weights_file, cfg_file)
    meta = C.meta_from_peer(dict(config) if config is not None else {}, NAME, cfg_file, top, **extra)
    return C.build_state(d=d, n=n, k=k, meta=meta, file=weights_file, arch=arch, prefixes=prefixes, W_enc=W_enc,
                         b_enc=bias, W_dec=W_dec, b_dec=state[b_dec], **extras)
