"""Shared fixtures: every available backend on the device it runs on (the helpers behind it, tolerances per dtype
included, live in tests/helpers/devices.py), and the models that test modules in several packages share (a tiny
DiffusionGemma, the embedded world's models)."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

from dlmscope import models

from tests.helpers.devices import backend_device, backend_params
from tests.helpers.tiny_checkpoints import save_diffusion_gemma

# The same examples on every run, so CI is reproducible; DLMSCOPE_HYPOTHESIS=explore draws new ones each run,
# DLMSCOPE_HYPOTHESIS=gpu draws 5 per test.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
# on a GPU (scripts/gpu_check.sh): few examples, since every new shape is a fresh kernel compile
settings.register_profile("gpu", derandomize=True, max_examples=5, deadline=None)
_PROFILE = os.environ.get("DLMSCOPE_HYPOTHESIS", "ci")
settings.load_profile(_PROFILE if _PROFILE in ("explore", "gpu") else "ci")

# small latent chunks, so the chunked encoder really splits (and merges) at the tests' shapes, n not a multiple
os.environ.setdefault("DLMSCOPE_CHUNK_LATENTS", "7")
# the triton backend's tests test the fused kernel itself, not the autotuned choice (tests/backends/test_autotune.py)
os.environ.setdefault("DLMSCOPE_AUTOTUNE", "0")


@pytest.fixture(params=backend_params())
def backend(request) -> str:
    return request.param


@pytest.fixture
def device(backend) -> torch.device:
    return backend_device(backend)


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


@pytest.fixture(scope="module")
def dlm():
    """The embedded world's DLM."""
    from dlmscope.demo import load_world_model

    return load_world_model("dlm")
