"""Sparse autoencoders: the module family — :class:`TopKSAE` (:mod:`.topk`), :class:`BatchTopKSAE`,
:class:`JumpReLUSAE`, :class:`MatryoshkaSAE`, whose selection rules run on the fused Top-K encoder
(:mod:`.sparsity`, :mod:`.prefix_decode`) — their checkpoint formats (:mod:`.formats`), their metrics
(:mod:`.metrics`: FVE, L0, dead latents, and the evaluation over activation batches), and the adapter that lets
SAEBench evaluate one (:mod:`.saebench`). :func:`load` reads any supported checkpoint into the right class."""
from __future__ import annotations

import os

from . import formats
from .batchtopk import BatchTopKSAE
from .jumprelu import JumpReLUSAE
from .matryoshka import MatryoshkaSAE
from .topk import SAEConfig, TopKSAE

__all__ = ["SAEConfig", "TopKSAE", "BatchTopKSAE", "JumpReLUSAE", "MatryoshkaSAE", "CLASSES", "load"]

#: ``SAEConfig.arch`` -> the class that implements it
CLASSES = {cls.ARCH: cls for cls in (TopKSAE, BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE)}


def load(path: str | os.PathLike, *, device=None, dtype=None, backend: str | None = None) -> TopKSAE:
    """The SAE saved at ``path`` (any format :mod:`.formats` reads), as the class of its architecture."""
    cfg, tensors = formats.load(path)
    sae = CLASSES[cfg.arch].from_state(cfg, tensors, backend=backend)
    if device is not None or dtype is not None:
        sae.to(device=device, dtype=dtype)
    return sae
