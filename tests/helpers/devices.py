"""Where each backend is tested and how closely: the test device, every backend with the device it runs on here
(the ``backend`` fixture's parameters in tests/conftest.py), tolerances per dtype."""
from __future__ import annotations

import os

import pytest
import torch

import dlmscope
from dlmscope.backends import get_backend

#: Where backends that run on CUDA (triton, torch) are tested: ``DLMSCOPE_TEST_DEVICE=cuda`` on a GPU machine.
TEST_DEVICE = os.environ.get("DLMSCOPE_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")

ALL_BACKENDS = ("torch", "cpu", "triton", "chunked", "cuda")


def backend_device(name: str) -> torch.device | None:
    """The device on which backend ``name`` is tested here, or None if it cannot run here."""
    if name not in dlmscope.available_backends():
        return None
    backend = get_backend(name)
    for device in (torch.device(TEST_DEVICE), torch.device("cpu")):
        if device.type == "cuda" and not torch.cuda.is_available():
            continue
        if backend.supports(device):
            return device
    return None


def backend_params():
    params = []
    for name in ALL_BACKENDS:
        device = backend_device(name)
        marks = [] if device is not None else [pytest.mark.skip(reason=f"backend {name!r} unavailable here")]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def tolerance(dtype: torch.dtype, backend: str) -> float:
    """Relative tolerance (to the scale of the compared quantity) for results computed in ``dtype``."""
    if dtype in (torch.bfloat16,):
        return 2e-2
    if dtype in (torch.float16,):
        return 4e-3
    if dtype == torch.float64 and torch.float64 in get_backend(backend).native_dtypes:
        return 1e-10
    return 2e-5


def native_float64(backend: str) -> bool:
    return torch.float64 in get_backend(backend).native_dtypes
