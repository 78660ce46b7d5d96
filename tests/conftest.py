"""Shared fixtures: every available backend on the device it runs on, tolerances per dtype, and the models that
test modules in several packages share (a tiny DiffusionGemma, the embedded world's models)."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

import dlmscope
from dlmscope import models
from dlmscope.backends import get_backend

from tests.helpers.tiny_checkpoints import save_diffusion_gemma

# The same examples on every run, so CI is reproducible; DLMSCOPE_HYPOTHESIS=explore draws new ones each run,
# DLMSCOPE_HYPOTHESIS=gpu draws 5 per test.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
# on a GPU (scripts/gpu_check.sh): few examples, since every new shape is a fresh kernel compile
settings.register_profile("gpu", derandomize=True, max_examples=5, deadline=None)
_PROFILE = os.environ.get("DLMSCOPE_HYPOTHESIS", "ci")
settings.load_profile(_PROFILE if _PROFILE in ("explore", "gpu") else "ci")

#: Where backends that run on CUDA (triton, torch) are tested: ``DLMSCOPE_TEST_DEVICE=cuda`` on a GPU machine.
TEST_DEVICE = os.environ.get("DLMSCOPE_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")


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


ALL_BACKENDS = ("torch", "cpu", "triton", "chunked", "cuda")
# small latent chunks, so the chunked encoder really splits (and merges) at the tests' shapes, n not a multiple
os.environ.setdefault("DLMSCOPE_CHUNK_LATENTS", "7")
# the triton backend's tests test the fused kernel itself, not the autotuned choice (tests/backends/test_autotune.py)
os.environ.setdefault("DLMSCOPE_AUTOTUNE", "0")


def backend_params():
    params = []
    for name in ALL_BACKENDS:
        device = backend_device(name)
        marks = [] if device is not None else [pytest.mark.skip(reason=f"backend {name!r} unavailable here")]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(params=backend_params())
def backend(request) -> str:
    return request.param


@pytest.fixture
def device(backend) -> torch.device:
    return backend_device(backend)


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


# ------------------------------------------------------------------------------ models shared across packages
@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """A tiny DiffusionGemma loaded through ``models.load``; skips where transformers has no DiffusionGemma."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DiffusionGemmaForBlockDiffusion"):
        pytest.skip("this transformers has no DiffusionGemmaForBlockDiffusion")
    return models.load(save_diffusion_gemma(tmp_path_factory.mktemp("dgemma")))


@pytest.fixture(scope="module")
def world():
    """The embedded world's base, instruct and AR models and small (train, held-out) LM batches."""
    from dlmscope.demo import load_world_model
    from dlmscope.world import world_batches

    base, inst, ar = (load_world_model(n) for n in ("dlm", "instruct", "ar"))
    train, held = world_batches(base.tokenizer, 3_000, 64, 8, seed=0)  # small LM batches: cheap forwards
    return base, inst, ar, (train, held)
