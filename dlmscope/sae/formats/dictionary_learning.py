"""saprmarks/dictionary_learning ``AutoEncoderTopK`` — also the DLM-Scope paper's released SAEs.

One directory per trained SAE (``resid_post_layer_{L}/trainer_{i}/``), checked against dictionary-learning 0.1.0:

- ``ae.pt``: ``torch.save`` of the module's state dict (CPU tensors): ``b_dec [d]``, ``k`` (int32 scalar buffer),
  ``threshold`` (float32 scalar buffer, -1 = unused), ``decoder.weight [d, n]`` (an ``nn.Linear(n, d)``, i.e.
  transposed w.r.t. ours), ``encoder.weight [n, d]``, ``encoder.bias [n]``. Biases are already scaled back to raw
  activations when the trainer normalised them.
- ``config.json``: ``{"trainer": {"trainer_class": "TopKTrainer", "dict_class": "AutoEncoderTopK", "lr", "steps",
  "auxk_alpha", "warmup_steps", "decay_start", "threshold_beta", "threshold_start_step", "seed",
  "activation_dim", "dict_size", "k", "device", "layer", "lm_name", "wandb_name", "submodule_name"},
  "buffer": {...}}`` (``json.dump(indent=4)``). ``utils.load_dictionary`` dispatches on ``trainer.dict_class``
  and passes ``trainer.k``; ``AutoEncoderTopK.from_pretrained`` alone needs only ``ae.pt``, so ``config.json``
  is optional here too (when present it must agree with the tensors).

Semantics: top-k of ``relu(encoder(x - b_dec))``, decode ``decoder(f) + b_dec`` — identical to ours. The
``threshold`` buffer only matters for ``encode(use_threshold=True)`` (off by default); its value is kept in
``meta["source"]["threshold"]`` and written back on re-export. ``ae.pt`` is read with ``weights_only=True``.
Other ``dict_class`` values (BatchTopKSAE, JumpReLU, ...) are not Top-K at inference and are rejected.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from . import _checks as C
from .config import SAEConfig

NAME = "dictionary_learning"
CFG = "config.json"
WEIGHTS = "ae.pt"
KEYS = ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec")
DESCRIPTION = f"{WEIGHTS} (+ {CFG})"
DICT_CLASS = "AutoEncoderTopK"

_TRAINER_DEFAULTS = {  # TopKTrainer.config's fields, in its order; values for an SAE not trained by it
    "trainer_class": "TopKTrainer",
    "dict_class": DICT_CLASS,
    "lr": None,
    "steps": None,
    "auxk_alpha": None,
    "warmup_steps": None,
    "decay_start": None,
    "threshold_beta": None,
    "threshold_start_step": None,
    "seed": None,
    "activation_dim": None,
    "dict_size": None,
    "k": None,
    "device": "cpu",
    "layer": None,
    "lm_name": None,
    "wandb_name": None,
    "submodule_name": None,
}


def detect(path: Path, files: set[str], cfg: dict | None) -> bool:
    return WEIGHTS in files


def _first(meta: dict, *keys):
    for key in keys:
        if key in meta:
            return meta[key]
    return None


def save(sc: SAEConfig, tensors: dict[str, Tensor], directory: Path) -> None:
    meta = sc.meta
    base, embed = C.peer_base(meta, NAME)
    threshold = -1.0
    source = meta.get("source")
    if isinstance(source, dict) and source.get("format") == NAME and C.is_finite_number(source.get("threshold")):
        threshold = float(source["threshold"])
    if base:
        config = base
    else:
        trainer = dict(_TRAINER_DEFAULTS)
        trainer["layer"] = _first(meta, "layer")
        trainer["lm_name"] = _first(meta, "lm_name", "model", "model_name")
        trainer["submodule_name"] = _first(meta, "submodule_name", "hook_point", "hook_name")
        config = {"trainer": trainer}
    trainer = config.setdefault("trainer", {})
    trainer.update(dict_class=DICT_CLASS, activation_dim=sc.d, dict_size=sc.n, k=sc.k)
    trainer.setdefault("trainer_class", "TopKTrainer")
    if embed is not None:
        config[C.META_KEY] = embed
    t = C.cpu_tensors(tensors)
    state = {  # the order of AutoEncoderTopK.state_dict()
        "b_dec": t["b_dec"],
        "k": torch.tensor(sc.k, dtype=torch.int),
        "threshold": torch.tensor(threshold, dtype=torch.float32),
        "decoder.weight": t["W_dec"].T.contiguous(),
        "encoder.weight": t["W_enc"],
        "encoder.bias": t["b_enc"],
    }
    torch.save(state, directory / WEIGHTS)
    C.write_json(directory / CFG, config)


def _read_state(file: Path) -> dict:
    C.require_file(file, "weights file")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged zip or pickle fails in many ways (BadZipFile, KeyError, EOFError, ...)
        raise ValueError(f"{file}: cannot read torch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise ValueError(f"{file}: expected a state dict, got {type(state).__name__}")
    return state


def load(path: Path) -> tuple[SAEConfig, dict[str, Tensor]]:
    weights_file, cfg_file = path / WEIGHTS, path / CFG
    config = C.read_json(cfg_file) if cfg_file.exists() else None
    trainer: dict = {}
    if config is not None:
        trainer = config.get("trainer", {})
        if not isinstance(trainer, dict):
            raise ValueError(f"{cfg_file}: field 'trainer' must be a JSON object, got {type(trainer).__name__}")
        dict_class = trainer.get("dict_class", DICT_CLASS)
        if dict_class != DICT_CLASS:
            raise ValueError(f"{cfg_file}: dict_class {dict_class!r} is not supported (only {DICT_CLASS!r} is a "
                             "Top-K SAE at inference)")

    state = _read_state(weights_file)
    C.require_tensors(state, KEYS, weights_file)
    n, d = state["encoder.weight"].shape if state["encoder.weight"].dim() == 2 else (None, None)
    if n is None:
        raise ValueError(f"{weights_file}: tensor 'encoder.weight' must be 2-D [n, d], got shape "
                         f"{list(state['encoder.weight'].shape)}")
    if config is not None:
        for field, value in (("activation_dim", d), ("dict_size", n)):
            if field in trainer:
                got = C.cfg_int(trainer, field, cfg_file, where="['trainer']")
                if got != value:
                    raise ValueError(f"{weights_file}: tensor 'encoder.weight' has shape [{n}, {d}] but {CFG} says "
                                     f"{field}={got}")
    why = f"n={n}, d={d} from 'encoder.weight'"
    C.require_shape(state, "encoder.bias", (n,), weights_file, f"[n] with {why}")
    C.require_shape(state, "decoder.weight", (d, n), weights_file, f"[d, n] with {why}")
    C.require_shape(state, "b_dec", (d,), weights_file, f"[d] with {why}")
    C.require_float_finite(state, KEYS, weights_file)

    k_buf = state.get("k")
    k_file = None
    if isinstance(k_buf, torch.Tensor):
        k_file = C.real_scalar(k_buf, "k", weights_file, integer=True)
    k_cfg = C.cfg_int(trainer, "k", cfg_file, where="['trainer']") if "k" in trainer else None
    if k_file is not None and k_cfg is not None and k_file != k_cfg:
        raise ValueError(f"{weights_file}: buffer k={k_file} disagrees with {CFG} trainer.k={k_cfg}")
    k = k_file if k_file is not None else k_cfg
    if k is None:
        raise ValueError(f"{weights_file}: no 'k' buffer and no {CFG} with trainer.k; cannot tell k")
    if k < 1:
        raise ValueError(f"{weights_file}: k={k} must be positive")
    C.require_k(k, n, weights_file)

    threshold = state.get("threshold")
    extra = {}
    if isinstance(threshold, torch.Tensor):
        extra["threshold"] = C.real_scalar(threshold, "threshold", weights_file, integer=False)
    meta = C.meta_from_peer(dict(config) if config is not None else {}, NAME, cfg_file, **extra)
    return C.build_state(d=d, n=n, k=k, meta=meta, file=weights_file, W_enc=state["encoder.weight"],
                       b_enc=state["encoder.bias"], W_dec=state["decoder.weight"].T, b_dec=state["b_dec"])
