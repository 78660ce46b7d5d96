"""EleutherAI sparsify (``eai-sparsify``): one directory per hookpoint with ``cfg.json`` + ``sae.safetensors``.

Layout (``SparseCoder.save_to_disk``, checked against eai-sparsify 1.3.3):

- ``sae.safetensors`` (``safetensors.torch.save_model`` of the module): ``encoder.weight [n, d]``,
  ``encoder.bias [n]``, ``W_dec [n, d]``, ``b_dec [d]`` (and ``W_skip [d, d]`` when ``skip_connection``).
- ``cfg.json``: ``SparseCoderConfig.to_dict()`` + ``"d_in"``: ``activation`` ("topk" | "groupmax"),
  ``expansion_factor``, ``normalize_decoder``, ``num_latents`` (0 = ``d_in * expansion_factor``), ``k``,
  ``multi_topk``, ``skip_connection``, ``transcode``. sparsify reads it with ``drop_extra_fields=True``, so our
  ``dlmscope_meta`` rides along harmlessly.

Semantics: ``encode`` = top-k of ``relu(encoder(x - b_dec))``; ``decode`` = ``acts @ W_dec + b_dec`` — identical to
ours. Not representable here (rejected with a ValueError): ``activation="groupmax"``, ``transcode``,
``skip_connection``.
``multi_topk`` and ``normalize_decoder`` only affect training.
"""
from __future__ import annotations

from pathlib import Path

from torch import Tensor

from . import _checks as C
from .config import SAEConfig

NAME = "sparsify"
#: the SAE architectures (``SAEConfig.arch``) this format holds
SUPPORTED_ARCHS = ("topk",)
CFG = "cfg.json"
WEIGHTS = "sae.safetensors"
KEYS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
DESCRIPTION = f"{CFG} with \"d_in\" + {WEIGHTS} (one hookpoint directory)"

_DEFAULTS = {  # SparseCoderConfig's fields and defaults in eai-sparsify 1.3.3
    "activation": "topk",
    "expansion_factor": 32,
    "normalize_decoder": True,
    "num_latents": 0,
    "k": 32,
    "multi_topk": False,
    "skip_connection": False,
    "transcode": False,
}


def detect(path: Path, files: set[str], cfg: dict | None) -> bool:
    return WEIGHTS in files and isinstance(cfg, dict) and "d_in" in cfg and cfg.get("format") is None


def save(sc: SAEConfig, tensors: dict[str, Tensor], directory: Path) -> None:
    base, embed = C.peer_base(sc.meta, NAME)
    cfg = {**_DEFAULTS, **{k: v for k, v in base.items() if k != "d_in"}}
    cfg.update(activation="topk", k=sc.k, skip_connection=False, transcode=False)
    if sc.n % sc.d == 0:
        cfg["expansion_factor"] = sc.n // sc.d
    if not (base.get("num_latents") == 0 and sc.n % sc.d == 0):  # keep a peer file's "0 = by expansion factor"
        cfg["num_latents"] = sc.n
    cfg["d_in"] = sc.d
    if embed is not None:
        cfg[C.META_KEY] = embed
    t = C.cpu_tensors(tensors)
    C.write_safetensors(directory / WEIGHTS, {"encoder.weight": t["W_enc"], "encoder.bias": t["b_enc"],
                                              "W_dec": t["W_dec"], "b_dec": t["b_dec"]}, metadata={"format": "pt"})
    C.write_json(directory / CFG, cfg)


def load(path: Path) -> tuple[SAEConfig, dict[str, Tensor]]:
    cfg_file, weights_file = path / CFG, path / WEIGHTS
    cfg = C.read_json(cfg_file)
    d = C.cfg_int(cfg, "d_in", cfg_file)
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise ValueError(f"{cfg_file}: activation={activation!r} is not supported (only 'topk' SAEs load as TopKSAE)")
    for flag in ("transcode", "skip_connection"):
        if cfg.get(flag, False):
            raise ValueError(f"{cfg_file}: {flag}=true is not supported (a TopKSAE has no {flag.replace('_', ' ')})")
    k = C.cfg_int(cfg, "k", cfg_file)
    if cfg.get("num_latents", 0) != 0:  # 0 (sparsify's default) means d_in * expansion_factor
        n = C.cfg_int(cfg, "num_latents", cfg_file)
    else:
        n = d * C.cfg_int({"expansion_factor": cfg.get("expansion_factor", _DEFAULTS["expansion_factor"])},
                          "expansion_factor", cfg_file)
    C.require_k(k, n, cfg_file)

    t = C.read_safetensors(weights_file)
    C.require_tensors(t, KEYS, weights_file)
    if "W_skip" in t:
        raise ValueError(f"{weights_file}: holds 'W_skip' (skip connection), which a TopKSAE cannot represent")
    why = f"n={n}, d_in={d} from {CFG}"
    C.require_shape(t, "encoder.weight", (n, d), weights_file, f"[n, d_in] with {why}")
    C.require_shape(t, "encoder.bias", (n,), weights_file, f"[n] with {why}")
    C.require_shape(t, "W_dec", (n, d), weights_file, f"[n, d_in] with {why}")
    C.require_shape(t, "b_dec", (d,), weights_file, f"[d_in] with {why}")
    C.require_float_finite(t, KEYS, weights_file)
    meta = C.meta_from_peer(cfg, NAME, cfg_file)
    return C.build_state(d=d, n=n, k=k, meta=meta, file=cfg_file, W_enc=t["encoder.weight"], b_enc=t["encoder.bias"],
                       W_dec=t["W_dec"], b_dec=t["b_dec"])
