"""Sparse autoencoders: the module (:mod:`.topk`), its checkpoint formats (:mod:`.formats`), its metrics
(:mod:`.metrics`: FVE, L0, dead latents, and the evaluation over activation batches)."""
from .topk import SAEConfig, TopKSAE

__all__ = ["SAEConfig", "TopKSAE"]
