"""dlmscope's own format: ``sae.safetensors`` + ``cfg.json``.

- ``sae.safetensors``: ``W_enc [n, d]``, ``b_enc [n]``, ``W_dec [n, d]``, ``b_dec [d]`` in the parameters' dtype,
  and the architecture's extra tensors (``threshold``; :data:`~.config.ARCHS`).
- ``cfg.json``: ``{"format": "dlmscope", "version": 1, "d": .., "n": .., "k": .., "meta": {...}}``
  (``SAEConfig.to_dict()`` plus the two header fields; ``"arch"`` and ``"prefixes"`` where not Top-K).
"""
from __future__ import annotations

from pathlib import Path

from torch import Tensor

from . import _checks as C
from .config import ARCHS, SAEConfig, param_shapes, tensor_names

NAME = "dlmscope"
#: the SAE architectures (``SAEConfig.arch``) this format holds
SUPPORTED_ARCHS = tuple(ARCHS)
VERSION = 1
CFG = "cfg.json"
WEIGHTS = "sae.safetensors"
DESCRIPTION = f"{CFG} with \"format\": \"dlmscope\" + {WEIGHTS}"


def detect(path: Path, files: set[str], cfg: dict | None) -> bool:
    return CFG in files and isinstance(cfg, dict) and cfg.get("format") == NAME


def save(cfg: SAEConfig, tensors: dict[str, Tensor], directory: Path) -> None:
    C.write_safetensors(directory / WEIGHTS, C.cpu_tensors(tensors), metadata={"format": "pt"})
    C.write_json(directory / CFG, {"format": NAME, "version": VERSION, **cfg.to_dict()})


def load(path: Path) -> tuple[SAEConfig, dict[str, Tensor]]:
    cfg_file, weights_file = path / CFG, path / WEIGHTS
    cfg = C.read_json(cfg_file)
    if cfg.get("format") != NAME:
        raise ValueError(f"{cfg_file}: field 'format' is {cfg.get('format')!r}, expected {NAME!r}")
    version = cfg.get("version")
    if version != VERSION:
        raise ValueError(f"{cfg_file}: unsupported dlmscope format version {version!r} (this build reads {VERSION})")
    fields = {k: v for k, v in cfg.items() if k not in ("format", "version")}
    for key in ("d", "n", "k"):
        C.cfg_int(fields, key, cfg_file)
    if not isinstance(fields.get("meta", {}), dict):
        raise ValueError(f"{cfg_file}: field 'meta' must be a JSON object, got {type(fields['meta']).__name__}")
    C.check_meta(fields.get("meta", {}), cfg_file)
    try:
        sc = SAEConfig.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_file}: {e}") from e

    t = C.read_safetensors(weights_file)
    keys = tensor_names(sc)
    C.require_tensors(t, keys, weights_file)
    extra = sorted(set(t) - set(keys))
    if extra:
        raise ValueError(f"{weights_file}: unexpected tensor(s) {extra} (a dlmscope {sc.arch} SAE holds {list(keys)})")
    for name, shape in param_shapes(sc).items():
        C.require_shape(t, name, shape, weights_file, f"{list(shape)} for d={sc.d}, n={sc.n} from {CFG}")
    C.require_float_finite(t, keys, weights_file)
    if sc.arch == "jumprelu" and bool((t["threshold"] < 0).any()):  # JumpReLUSAE keeps log(θ)
        raise ValueError(f"{weights_file}: tensor 'threshold' of a JumpReLU SAE must be >= 0")
    return C.build_state(d=sc.d, n=sc.n, k=sc.k, meta=sc.meta, arch=sc.arch, prefixes=sc.prefixes, file=cfg_file,
                         **{k: t[k] for k in keys})
