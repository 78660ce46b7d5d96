"""Autoregressive baselines (Llama-3, Qwen2.5, ...) loaded natively and left causal."""
from __future__ import annotations

import torch

from .base import Adapter, from_pretrained_strict, load_tokenizer

__all__ = ["AR_MODEL_TYPES", "load_ar"]

#: transformers model types whose ``*ForCausalLM`` exposes ``model.model.layers`` like Llama does.
AR_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def load_ar(path: str, cfg: dict, *, device=None, dtype=None):
    """An Adapter over ``AutoModelForCausalLM`` (causal attention, next-token logits, no mask token)."""
    from transformers import AutoConfig, AutoModelForCausalLM  # transformers loads model code on first use

    config = AutoConfig.from_pretrained(path)
    if getattr(config, "is_causal", True) is False:
        raise ValueError(f"{path}: config sets is_causal=false; an AR baseline must be causal")
    kw = {"config": config}
    if dtype is not None:
        kw["dtype"] = dtype
    model = from_pretrained_strict(AutoModelForCausalLM, path, **kw)
    model = model.to(torch.device(device) if device is not None else torch.device("cpu")).eval()
    return Adapter(model, load_tokenizer(path), family=str(cfg.get("model_type")), mask_token_id=None,
                   is_diffusion=False, logit_shift=0, source=path)
