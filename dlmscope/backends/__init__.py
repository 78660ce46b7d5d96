"""Backend registry and selection: explicit ``backend=`` > ``DLMSCOPE_BACKEND`` > best available for the device.

Backends: ``torch`` (plain PyTorch, always available), ``cpu`` (C++/OpenMP extension ``dlmscope._C``),
``triton`` (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``), ``chunked`` (the encoder as GEMMs
over latent chunks with per-chunk top-k and one merge), ``cuda`` (the plain-CUDA kernels of csrc/cuda, loaded
from ``libdlmscope_cuda.so``; ``make cuda`` builds it). ``chunked`` and ``cuda`` are never chosen by default:
pick them by name. Shared by them: :mod:`.base` (the contract), :mod:`.autotune` (the triton backend's measured
choice per shape), :mod:`.cuda_lib` (loads the CUDA library); the chunked selection loop is :mod:`dlmscope.util.chunks`.
"""
from __future__ import annotations

import importlib
import os

import torch

from .base import Backend

#: name -> "module:class"; imported lazily so a missing extension or triton never breaks ``import dlmscope``.
_SPECS = {
    "torch": "dlmscope.backends.torch_backend:TorchBackend",
    "cpu": "dlmscope.backends.cpu_backend:CpuBackend",
    "triton": "dlmscope.backends.triton_backend:TritonBackend",
    "chunked": "dlmscope.backends.chunked_backend:ChunkedBackend",
    "cuda": "dlmscope.backends.cuda_backend:CudaBackend",
}
#: preference order per device type when nothing is requested.
_PREFERENCE = {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}

_instances: dict[str, Backend | None] = {}
_import_errors: dict[str, str] = {}

ENV_VAR = "DLMSCOPE_BACKEND"


def _load(name: str) -> Backend | None:
    if name not in _instances:
        module_name, cls_name = _SPECS[name].split(":")
        try:
            backend = getattr(importlib.import_module(module_name), cls_name)()
            _instances[name] = backend if backend.is_available() else None
            if _instances[name] is None:
                _import_errors[name] = "not available in this environment"
        except Exception as exc:  # a missing extension or triton
            _instances[name] = None
            _import_errors[name] = f"{type(exc).__name__}: {exc}"
    return _instances[name]


def available_backends() -> list[str]:
    """Names of the backends that can run here (on at least one device)."""
    return [name for name in _SPECS if _load(name) is not None]


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ValueError if unknown or unavailable (with the reason)."""
    if name not in _SPECS:
        raise ValueError(f"unknown backend {name!r}; known backends: {sorted(_SPECS)}")
    backend = _load(name)
    if backend is None:
        raise ValueError(f"backend {name!r} is not available: {_import_errors.get(name)}")
    return backend


def resolve_backend(requested: str | None, device: torch.device) -> Backend:
    """Pick the backend for tensors on ``device``: ``requested`` > $DLMSCOPE_BACKEND > best available."""
    name = requested or os.environ.get(ENV_VAR) or None
    if name is not None:
        backend = get_backend(name)
        if not backend.supports(device):
            source = "backend=" if requested else f"${ENV_VAR}="
            raise ValueError(f"{source}{name!r} cannot run on device {device}; available: {available_backends()}")
        return backend
    for candidate in _PREFERENCE.get(device.type, ("torch",)):
        backend = _load(candidate)
        if backend is not None and backend.supports(device):
            return backend
    return get_backend("torch")


@torch.compiler.assume_constant_result
def resolve_backend_name(requested: str | None, device: torch.device) -> str:
    """The name of :func:`resolve_backend`'s choice, for the public ops to dispatch on.

    ``torch.compile`` calls this once while tracing and keeps the name as a constant, so the backend's first
    (lazy) import happens outside the traced graph: a ``fullgraph=True`` compile works as the very first call.
    A compiled graph keeps the backend it was traced with, even if ``$DLMSCOPE_BACKEND`` changes later.
    """
    return resolve_backend(requested, device).name


__all__ = ["Backend", "available_backends", "get_backend", "resolve_backend", "resolve_backend_name", "ENV_VAR"]
