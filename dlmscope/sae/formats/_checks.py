"""Shared reading / writing / validation helpers for the checkpoint formats.

Every failure is a ``ValueError`` that names the file (and the key or field) at fault, so a user holding a bad
checkpoint learns what is wrong with which file without reading a traceback into the library.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from dlmscope.util import atomic
from .config import PARAMS, SAEConfig

#: Key under which a peer-format cfg carries dlmscope's own ``SAEConfig.meta`` (peers ignore unknown keys).
META_KEY = "dlmscope_meta"

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# ---- files --------------------------------------------------------------------------------------------------


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        present = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
        raise ValueError(f"{path}: missing {what} (the checkpoint directory holds {present})")
    return path


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number (a config holds finite numbers only)")


def read_json(path: Path) -> dict:
    """The JSON object in ``path``; ``ValueError`` naming the file for anything else: bad UTF-8 or JSON, NaN or
    Infinity, nesting too deep to parse, a number too long to convert, a top level that is not an object."""
    require_file(path, "config file")
    data = atomic.read_json(path, "corrupt JSON config", parse_constant=_no_constant)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: config must be a JSON object, got {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> dict[str, Tensor]:
    require_file(path, "weights file")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError, MemoryError, OverflowError) as e:
        raise ValueError(f"{path}: corrupt safetensors file ({e})") from e


# The savers write into the temp directory of :func:`dlmscope.util.atomic.atomic_directory`, which fsyncs the tree as a
# whole before putting it in place: every file is written plainly.


def write_safetensors(path: Path, tensors: Mapping[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Plain write of CPU, contiguous tensors (:func:`cpu_tensors`; a transposed one made contiguous by the caller)."""
    save_file(dict(tensors), str(path), metadata=metadata)


def write_json(path: Path, obj: dict) -> None:
    """Plain write of a format's JSON config: 2-space indent, keys in the dict's order, no NaN/Inf, a newline."""
    atomic.write_json(path, obj, sort_keys=False, allow_nan=False, durable=False)


# ---- cfg fields ---------------------------------------------------------------------------------------------


def cfg_int(cfg: Mapping[str, Any], key: str, file: Path, *, where: str = "") -> int:
    if key not in cfg:
        raise ValueError(f"{file}: config{where} lacks field {key!r} (has {sorted(cfg)})")
    value = cfg[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{file}: config field {where}{key!r} must be a positive integer, got {value!r}")
    return value


# ---- tensors ------------------------------------------------------------------------------------------------


def require_tensors(tensors: Mapping[str, Any], keys: Iterable[str], file: Path) -> None:
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise ValueError(f"{file}: missing tensor(s) {missing} (found {sorted(map(str, tensors))})")
    for k in keys:
        t = tensors[k]
        if not isinstance(t, Tensor):
            raise ValueError(f"{file}: entry {k!r} must be a tensor, got {type(t).__name__}")


def require_shape(tensors: Mapping[str, Tensor], key: str, shape: tuple[int, ...], file: Path, why: str) -> None:
    got = tuple(tensors[key].shape)
    if got != tuple(shape):
        raise ValueError(f"{file}: tensor {key!r} has shape {list(got)}, expected {list(shape)} ({why})")


def require_float_finite(tensors: Mapping[str, Tensor], keys: Iterable[str], file: Path) -> None:
    for k in keys:
        t = tensors[k]
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{file}: tensor {k!r} must be float32/float64/bfloat16/float16, got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{file}: tensor {k!r} has {bad} non-finite value(s) (NaN or Inf)")


def real_scalar(t: Tensor, key: str, file: Path, *, integer: bool) -> int | float:
    """The value of the one-element tensor ``t`` (buffer ``key``): an integer (not bool) for ``integer``, else a
    finite real number; ``ValueError`` naming ``file`` otherwise."""
    ok = t.numel() == 1 and not t.dtype.is_complex and t.dtype != torch.bool
    ok = ok and (not t.is_floating_point() if integer else True)
    if not ok:
        kind = "an integer" if integer else "a real number"
        raise ValueError(f"{file}: buffer {key!r} must be {kind} scalar, got {t.dtype} {list(t.shape)}")
    value = t.item()
    if not integer and not math.isfinite(value):
        raise ValueError(f"{file}: buffer {key!r} must be finite, got {value}")
    return int(value) if integer else float(value)


def require_k(k: int, n: int, file: Path) -> None:
    if k > n:
        raise ValueError(f"{file}: k={k} exceeds the number of latents n={n}")


# ---- thresholds and folds (the BatchTopK / JumpReLU / Matryoshka architectures) ------------------------------


def require_threshold(tensors: Mapping[str, Any], key: str, shape: tuple[int, ...], file: Path, why: str) -> Tensor:
    """The float, finite tensor ``tensors[key]`` of ``shape`` (a one-element tensor counts as 0-d for
    ``shape == ()``), reshaped to ``shape``; ``ValueError`` naming ``file`` otherwise."""
    require_tensors(tensors, [key], file)
    t = tensors[key]
    if shape == () and t.numel() == 1:
        t = t.reshape(())
    require_shape({key: t}, key, shape, file, why)
    require_float_finite({key: t}, [key], file)
    return t


def nonnegative(theta: Tensor) -> tuple[Tensor, int]:
    """(θ with its negative entries set to 0, how many there were). A peer JumpReLU whose output is a ReLU'd
    ``pre · [pre > θ]`` treats θ < 0 exactly as θ = 0 (the entries in (θ, 0] come out 0), so nothing changes."""
    negative = int((theta < 0).sum())
    return (theta.clamp_min(0) if negative else theta), negative


def constant(theta: Tensor) -> Tensor | None:
    """The 0-d value of a per-latent threshold [n] whose entries are all equal, else None."""
    first = theta.reshape(-1)[0]
    return first.clone() if bool((theta == first).all()) else None


def integral(value) -> int | None:
    """``value`` as an int if it is an integral JSON number (4 or 4.0, not True), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    return int(value)


def fold_b_dec(W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, sign: int = 1) -> Tensor:
    """``b_enc + sign · (W_enc @ b_dec)`` (W_enc [n, d]) in float64, rounded to b_enc's dtype.

    An encoder that does not subtract b_dec from its input, ``pre = W_enc x + b_enc``, is ours,
    ``W_enc (x − b_dec) + b_enc'``, with ``b_enc' = b_enc + W_enc b_dec`` (``sign=1``); ``sign=-1`` undoes it. The
    outputs agree to rounding, the bias is not bitwise the file's (one rounding each way)."""
    return (b_enc.double() + sign * (W_enc.double() @ b_dec.double())).to(b_enc.dtype)

# ---- the loaded state ---------------------------------------------------------------------------------------


def build_state(*, d: int, n: int, k: int, meta: dict, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor,
                file: Path, arch: str = "topk", prefixes: list[int] | None = None,
                **extras: Tensor) -> tuple[SAEConfig, dict[str, Tensor]]:
    """(config, contiguous tensors) of a loaded checkpoint; a config failing SAEConfig's checks names ``file``.
    ``extras``: the architecture's tensors beyond the four parameters (e.g. ``threshold``)."""
    try:
        cfg = SAEConfig(d=d, n=n, k=k, meta=meta, arch=arch, prefixes=prefixes)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from e
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, **extras}
    return cfg, {name: t.contiguous() for name, t in tensors.items()}


def cpu_tensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The SAE's tensors (the four parameters first), detached, on CPU, contiguous (ready to serialise)."""
    names = list(PARAMS) + [name for name in tensors if name not in PARAMS]
    return {name: tensors[name].detach().cpu().contiguous() for name in names}


def check_meta(meta: dict, file: Path) -> dict:
    """``meta`` (dlmscope's ``SAEConfig.meta`` read from ``file``), checked where a reader relies on it: a recorded
    ``norm_factor`` (the activation scale a trainer folded into the weights) and ``jumprelu_bandwidth`` are positive
    finite numbers."""
    if not isinstance(meta, dict):
        raise ValueError(f"{file}: dlmscope's meta must be a JSON object, got {type(meta).__name__}")
    if "norm_factor" in meta and not is_positive_number(meta["norm_factor"]):
        raise ValueError(f"{file}: meta field 'norm_factor' must be a positive finite number (the activation scale "
                         f"folded into the weights), got {meta['norm_factor']!r}")
    if "jumprelu_bandwidth" in meta and not is_positive_number(meta["jumprelu_bandwidth"]):
        raise ValueError(f"{file}: meta field 'jumprelu_bandwidth' must be a positive finite number (the JumpReLU "
                         f"straight-through bandwidth), got {meta['jumprelu_bandwidth']!r}")
    return meta


def meta_from_peer(cfg: dict, fmt: str, file: Path, top: dict | None = None, **extra) -> dict:
    """``SAEConfig.meta`` for a loaded peer checkpoint.

    A file written by dlmscope carries our meta under :data:`META_KEY` and gets it back verbatim; a file written by
    the peer library itself gets ``{"source": {"format": fmt, "cfg": <its cfg>, ...extra}, ...top}`` (provenance,
    and what re-exporting to the same format needs to reproduce the peer's fields; ``top``: meta entries our SAE
    classes read, such as ``jumprelu_bandwidth``).
    """
    if META_KEY in cfg:
        meta = cfg.pop(META_KEY)
        if not isinstance(meta, dict):
            raise ValueError(f"{file}: field {META_KEY!r} must be a JSON object, got {type(meta).__name__}")
        return check_meta(meta, file)
    return {"source": {"format": fmt, "cfg": cfg, **extra}, **(top or {})}


def peer_base(meta: dict, fmt: str, implied: Callable[[dict], dict] | None = None) -> tuple[dict, dict | None]:
    """(the peer's own fields to start from, the meta to embed or None) when exporting to ``fmt``.

    ``implied(base)``: the meta entries that the peer config ``base`` already states (e.g. a JumpReLU bandwidth
    read from it on load); meta holding nothing else than those and the provenance counts as the peer's own."""
    source = meta.get("source")
    if isinstance(source, dict) and source.get("format") == fmt:
        base = json.loads(json.dumps(source.get("cfg") or {}))
        stated = implied(base) if implied is not None else {}
        rest = {k: v for k, v in meta.items() if k != "source" and not (k in stated and stated[k] == v)}
        # meta that is nothing but this format's provenance is written as the peer's own file, untouched
        return base, (meta if rest else None)
    return {}, meta  # even when empty: its presence tells load() this file came from dlmscope


def is_finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_positive_number(x) -> bool:
    """A finite JSON number > 0 (a norm factor, a bandwidth)."""
    return is_finite_number(x) and x > 0
