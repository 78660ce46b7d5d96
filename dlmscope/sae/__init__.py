"""Sparse autoencoders: the module (:mod:`.topk`), its checkpoint formats (:mod:`.formats`), its metrics
(:mod:`.metrics`: FVE, L0, dead latents, and the evaluation over activation batches), and the adapter that lets
SAEBench evaluate it (:mod:`.saebench`)."""
from .topk import SAEConfig, TopKSAE

__all__ = ["SAEConfig", "TopKSAE"]
