"""Dream checkpoints → transformers' native ``Qwen2ForCausalLM`` with bidirectional attention.

Dream-v0 (Dream-org/Dream-v0-*-7B) ships hub-only remote code; its weights use Qwen2's key names exactly,
so they load strictly into ``Qwen2ForCausalLM`` with ``config.is_causal=False``. Dream keeps the AR
convention that logits at position i predict token i+1, so the adapter shifts them right by one:
``cat([logits[:, :1], logits[:, :-1]], 1)`` (docs/reference.md §8).
"""
from __future__ import annotations

import os

import torch

from dlmscope.util import atomic
from .base import Adapter, build_from_state_dict, load_tokenizer, read_state_dict, resolve_mask_token_id

__all__ = ["DREAM_DEFAULT_MASK_TOKEN_ID", "is_dream_config", "dream_config_to_qwen2", "qwen2_config_to_dream",
           "save_dream_checkpoint", "load_dream"]

DREAM_DEFAULT_MASK_TOKEN_ID = 151666

# Fields of Dream's config.json that are not Qwen2Config arguments.
_DROP = ("model_type", "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype")


def is_dream_config(cfg: dict) -> bool:
    archs = cfg.get("architectures") or []
    return str(cfg.get("model_type", "")).lower() == "dream" or any("dream" in str(a).lower() for a in archs)


def dream_config_to_qwen2(cfg: dict, *, source: str = "Dream config"):
    """A ``Qwen2Config`` with ``is_causal=False`` from a Dream ``config.json`` dict."""
    from transformers import Qwen2Config

    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if cfg.get(field) is None:
            raise ValueError(f"{source}: Dream config lacks {field!r}")
    kw = {k: v for k, v in cfg.items() if k not in _DROP}
    if kw.get("rope_scaling") is None:
        kw.pop("rope_scaling", None)
    kw["is_causal"] = False
    kw["use_cache"] = False
    try:
        return Qwen2Config(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: Dream config is not a valid Qwen2 config: {e}") from None


def qwen2_config_to_dream(config, *, mask_token_id: int, pad_token_id=None, eos_token_id=None, bos_token_id=None,
                          dtype: torch.dtype | None = None) -> dict:
    """A Dream ``config.json`` dict (Dream's published field set) describing a Qwen2 config."""
    vocab = int(config.vocab_size)
    if not 0 <= int(mask_token_id) < vocab:
        raise ValueError(f"mask_token_id {mask_token_id} outside the vocabulary [0, {vocab})")
    rp = getattr(config, "rope_parameters", None) or {}
    if rp.get("rope_type", "default") != "default":
        raise ValueError(f"only plain RoPE is supported, got rope_type={rp.get('rope_type')!r}")
    rope_theta = float(rp.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    pad = pad_token_id if pad_token_id is not None else config.pad_token_id
    return {
        "architectures": ["DreamModel"],
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "bos_token_id": bos_token_id if bos_token_id is not None else config.bos_token_id,
        "eos_token_id": eos_token_id if eos_token_id is not None else config.eos_token_id,
        "hidden_act": str(config.hidden_act),
        "hidden_size": int(config.hidden_size),
        "initializer_range": float(config.initializer_range),
        "intermediate_size": int(config.intermediate_size),
        "mask_token_id": int(mask_token_id),
        "max_position_embeddings": int(config.max_position_embeddings),
        "max_window_layers": int(getattr(config, "max_window_layers", config.num_hidden_layers)),
        "model_type": "Dream",
        "num_attention_heads": int(config.num_attention_heads),
        "num_hidden_layers": int(config.num_hidden_layers),
        "num_key_value_heads": int(config.num_key_value_heads),
        "pad_token_id": pad,
        "rms_norm_eps": float(config.rms_norm_eps),
        "rope_scaling": None,
        "rope_theta": rope_theta,
        "sliding_window": getattr(config, "sliding_window", None),
        "tie_word_embeddings": bool(config.tie_word_embeddings),
        "torch_dtype": str(dtype).removeprefix("torch.") if dtype is not None else "float32",
        "use_cache": False,
        "use_sliding_window": False,
        "vocab_size": vocab,
    }


def save_dream_checkpoint(model, out_dir: str | os.PathLike, *, mask_token_id: int, pad_token_id: int | None = None,
                          eos_token_id: int | None = None, bos_token_id: int | None = None) -> str:
    """Write ``model`` (a ``Qwen2ForCausalLM``) in Dream's published format: Dream config.json + Qwen2 keys."""

    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    dtypes = {t.dtype for t in tensors.values()}
    cfg = qwen2_config_to_dream(model.config, mask_token_id=mask_token_id, pad_token_id=pad_token_id,
                                eos_token_id=eos_token_id, bos_token_id=bos_token_id,
                                dtype=dtypes.pop() if len(dtypes) == 1 else None)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    atomic.save_safetensors(os.path.join(out_dir, "model.safetensors"), tensors)
    atomic.write_json(os.path.join(out_dir, "config.json"), cfg)
    return out_dir


def load_dream(path: str, cfg: dict, *, device=None, dtype=None):
    """Load a Dream-format directory into an Adapter over ``Qwen2ForCausalLM(is_causal=False)``, logit shift 1."""
    from transformers import Qwen2ForCausalLM  # transformers loads model code on first use

    config = dream_config_to_qwen2(cfg, source=path)
    tokenizer = load_tokenizer(path)
    mask_id = resolve_mask_token_id(cfg, tokenizer, vocab_size=config.vocab_size, default=DREAM_DEFAULT_MASK_TOKEN_ID,
                                    family="Dream", source=path)
    model = build_from_state_dict(Qwen2ForCausalLM, config, read_state_dict(path), device=device, dtype=dtype,
                                  source=path)
    return Adapter(model, tokenizer, family="dream", mask_token_id=int(mask_id), is_diffusion=True, logit_shift=1,
                   source=path)
