"""Measurements that join a model and an SAE; each returns tensors or dicts and writes nothing.

``splice`` (SAE spliced in, zero-ablation, ΔLM), ``steering`` (interventions during denoising),
``order`` (decoding-order replay and SAE-guided remasking), ``transfer`` (base → instruct stability).
"""
