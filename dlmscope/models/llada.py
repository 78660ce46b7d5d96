"""LLaDA checkpoints ↔ transformers' native ``LlamaForCausalLM`` with bidirectional attention.

LLaDA (GSAI-ML/LLaDA-8B-*) ships hub-only remote code (an OLMo-derived ``LLaDAModelLM``). Its math is a
Llama block with full (non-causal) attention and unshifted logits, so it loads into
``LlamaForCausalLM(config.is_causal=False)`` after a key rename (docs/reference.md §8). This module maps the
config and the keys both ways and can *write* a checkpoint in LLaDA's exact published format, which is
how the embedded world's tiny DLM is stored.
"""
from __future__ import annotations

import os
import re

import torch

from dlmscope.util import atomic
from .base import Adapter, build_from_state_dict, load_tokenizer, read_state_dict, resolve_mask_token_id

__all__ = [
    "LLADA_DEFAULT_MASK_TOKEN_ID",
    "is_llada_config",
    "llada_config_to_llama",
    "llama_config_to_llada",
    "llada_key_to_llama",
    "llama_key_to_llada",
    "llada_state_dict_to_llama",
    "llama_state_dict_to_llada",
    "save_llada_checkpoint",
    "load_llada",
]

#: LLaDA-8B's ``[MASK]`` id (used only when a config omits ``mask_token_id`` and the vocabulary has it).
LLADA_DEFAULT_MASK_TOKEN_ID = 126336

# (LLaDA name, Llama name) for the per-block parameters, docs/reference.md §8.
_BLOCK_RENAMES = (
    ("q_proj", "self_attn.q_proj"),
    ("k_proj", "self_attn.k_proj"),
    ("v_proj", "self_attn.v_proj"),
    ("attn_out", "self_attn.o_proj"),
    ("ff_proj", "mlp.gate_proj"),
    ("up_proj", "mlp.up_proj"),
    ("ff_out", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
    ("ff_norm", "post_attention_layernorm"),
)
_TOP_RENAMES = (
    ("model.transformer.wte", "model.embed_tokens"),
    ("model.transformer.ln_f", "model.norm"),
    ("model.transformer.ff_out", "lm_head"),
)
_L2H_BLOCK = dict(_BLOCK_RENAMES)
_H2L_BLOCK = {h: l for l, h in _BLOCK_RENAMES}
_LLADA_BLOCK_RE = re.compile(r"^model\.transformer\.blocks\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_LLAMA_BLOCK_RE = re.compile(r"^model\.layers\.(\d+)\.([a-z_.]+)\.(weight|bias)$")


def is_llada_config(cfg: dict) -> bool:
    archs = cfg.get("architectures") or []
    return str(cfg.get("model_type", "")).lower() == "llada" or any("llada" in str(a).lower() for a in archs)


# --------------------------------------------------------------------------------------------- keys
def llada_key_to_llama(key: str) -> str:
    """One LLaDA parameter name → its ``LlamaForCausalLM`` name (ValueError if it has none)."""
    m = _LLADA_BLOCK_RE.match(key)
    if m:
        idx, name, kind = m.groups()
        if name not in _L2H_BLOCK:
            raise ValueError(f"unknown LLaDA block parameter {key!r}")
        return f"model.layers.{idx}.{_L2H_BLOCK[name]}.{kind}"
    for old, new in _TOP_RENAMES:
        if key.startswith(old + "."):
            return new + key[len(old):]
    raise ValueError(f"unknown LLaDA parameter {key!r}")


def llama_key_to_llada(key: str) -> str:
    """One ``LlamaForCausalLM`` parameter name → LLaDA's name (ValueError if it has none)."""
    m = _LLAMA_BLOCK_RE.match(key)
    if m:
        idx, name, kind = m.groups()
        if name not in _H2L_BLOCK:
            raise ValueError(f"Llama parameter {key!r} has no LLaDA counterpart")
        return f"model.transformer.blocks.{idx}.{_H2L_BLOCK[name]}.{kind}"
    for old, new in _TOP_RENAMES:
        if key.startswith(new + "."):
            return old + key[len(new):]
    raise ValueError(f"Llama parameter {key!r} has no LLaDA counterpart")


def llada_state_dict_to_llama(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {llada_key_to_llama(k): v for k, v in sd.items()}


def llama_state_dict_to_llada(sd: dict[str, torch.Tensor], *, weight_tying: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if weight_tying and k == "lm_head.weight":
            continue  # LLaDA with weight_tying stores only wte
        out[llama_key_to_llada(k)] = v
    return out


# ------------------------------------------------------------------------------------------- config
def llada_config_to_llama(cfg: dict, *, source: str = "LLaDA config"):
    """A ``LlamaConfig`` (``is_causal=False``) equivalent to a LLaDA ``config.json`` dict.

    Raises ValueError for LLaDA options a Llama block cannot express (ALiBi, non-RMS norms, QK norm, ...).
    """
    from transformers import LlamaConfig

    def get(name, default=None):
        return cfg.get(name, default)

    for field in ("d_model", "n_heads", "n_layers"):
        if get(field) is None:
            raise ValueError(f"{source}: LLaDA config lacks {field!r}")
    problems = []
    if str(get("block_type", "llama")).lower() != "llama":
        problems.append(f"block_type={get('block_type')!r} (only 'llama' blocks are supported)")
    if get("alibi", False):
        problems.append("alibi=true")
    if not get("rope", True):
        problems.append("rope=false")
    if str(get("layer_norm_type", "rms")).lower() != "rms":
        problems.append(f"layer_norm_type={get('layer_norm_type')!r}")
    if not get("layer_norm_with_affine", True):
        problems.append("layer_norm_with_affine=false")
    if get("bias_for_layer_norm", False):
        problems.append("bias_for_layer_norm=true")
    if get("attention_layer_norm", False):
        problems.append("attention_layer_norm=true")
    if get("input_emb_norm", False):
        problems.append("input_emb_norm=true")
    if get("scale_logits", False):
        problems.append("scale_logits=true")
    if str(get("activation_type", "silu")).lower() not in ("silu", "swiglu"):
        problems.append(f"activation_type={get('activation_type')!r}")
    if get("include_qkv_bias", False) and not get("include_bias", False):
        problems.append("include_qkv_bias=true without include_bias")
    if get("multi_query_attention"):
        problems.append("multi_query_attention=true")
    if problems:
        raise ValueError(f"{source}: LLaDA options not expressible as a Llama block: " + ", ".join(problems))

    d_model = int(get("d_model"))
    n_heads = int(get("n_heads"))
    if d_model % n_heads:
        raise ValueError(f"{source}: d_model {d_model} not divisible by n_heads {n_heads}")
    mlp_hidden = get("mlp_hidden_size")
    if mlp_hidden is None:
        mlp_hidden = int(get("mlp_ratio", 4)) * d_model
    vocab = get("embedding_size") or get("vocab_size")
    if vocab is None:
        raise ValueError(f"{source}: LLaDA config lacks 'embedding_size' / 'vocab_size'")
    include_bias = bool(get("include_bias", False))
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=d_model,
        intermediate_size=int(mlp_hidden),
        num_hidden_layers=int(get("n_layers")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(get("n_kv_heads") or n_heads),
        hidden_act="silu",
        max_position_embeddings=int(get("max_sequence_length", 4096)),
        rms_norm_eps=float(get("rms_norm_eps", 1e-5)),
        rope_theta=float(get("rope_theta", 10000.0)),
        attention_bias=include_bias,
        mlp_bias=include_bias,
        tie_word_embeddings=bool(get("weight_tying", False)),
        pad_token_id=get("pad_token_id"),
        eos_token_id=get("eos_token_id"),
        bos_token_id=get("bos_token_id"),
        mask_token_id=get("mask_token_id"),
        is_causal=False,
        use_cache=False,
    )


def _rope_theta(config) -> float:
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict):
        if rp.get("rope_type", "default") != "default":
            raise ValueError(f"LLaDA has plain RoPE; this Llama uses rope_type={rp.get('rope_type')!r}")
        return float(rp["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def llama_config_to_llada(
    config,
    *,
    mask_token_id: int,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> dict:
    """A LLaDA ``config.json`` dict (LLaDA's own field names) describing a Llama config."""
    d_model = int(config.hidden_size)
    n_heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None and int(head_dim) != d_model // n_heads:
        raise ValueError(f"LLaDA requires head_dim == d_model / n_heads; got head_dim={head_dim}")
    if str(config.hidden_act) != "silu":
        raise ValueError(f"LLaDA blocks use SiLU-gated MLPs; got hidden_act={config.hidden_act!r}")
    attn_bias, mlp_bias = bool(getattr(config, "attention_bias", False)), bool(getattr(config, "mlp_bias", False))
    if attn_bias != mlp_bias:
        raise ValueError("LLaDA's include_bias covers attention and MLP together; attention_bias != mlp_bias")
    vocab = int(config.vocab_size)
    if not 0 <= int(mask_token_id) < vocab:
        raise ValueError(f"mask_token_id {mask_token_id} outside the vocabulary [0, {vocab})")
    eos = eos_token_id if eos_token_id is not None else config.eos_token_id
    pad = pad_token_id if pad_token_id is not None else config.pad_token_id
    n_kv = int(config.num_key_value_heads or n_heads)
    return {
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "auto_map": {
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
            "AutoModel": "modeling_llada.LLaDAModelLM",
        },
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": d_model,
        "embedding_dropout": 0.0,
        "embedding_size": vocab,
        "eos_token_id": eos,
        "flash_attention": False,
        "include_bias": attn_bias,
        "include_qkv_bias": False,
        "init_cutoff_factor": None,
        "init_device": "meta",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": int(mask_token_id),
        "max_sequence_length": int(config.max_position_embeddings),
        "mlp_hidden_size": int(config.intermediate_size),
        "mlp_ratio": max(1, int(config.intermediate_size) // d_model),
        "model_type": "llada",
        "multi_query_attention": None,
        "n_heads": n_heads,
        "n_kv_heads": n_kv,
        "n_layers": int(config.num_hidden_layers),
        "pad_token_id": pad,
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": float(config.rms_norm_eps),
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": _rope_theta(config),
        "scale_logits": False,
        "use_cache": False,
        "vocab_size": vocab,
        "weight_tying": bool(getattr(config, "tie_word_embeddings", False)),
    }


# ------------------------------------------------------------------------------------------ save/load
def save_llada_checkpoint(
    model,
    out_dir: str | os.PathLike,
    *,
    mask_token_id: int,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> str:
    """Write ``model`` (a ``LlamaForCausalLM``) as a checkpoint in LLaDA's published format.

    ``out_dir/config.json`` uses LLaDA's field names (``d_model``, ``n_layers``, ``mlp_hidden_size``, ...,
    ``model_type: "llada"``) and ``out_dir/model.safetensors`` LLaDA's key names
    (``model.transformer.blocks.{i}.q_proj.weight``, ...). Tensors are saved in their current dtype.
    Other files in ``out_dir`` (a tokenizer, say) are left alone. Returns ``out_dir``.
    """

    config = model.config
    llada_cfg = llama_config_to_llada(
        config, mask_token_id=mask_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id
    )
    sd = llama_state_dict_to_llada(model.state_dict(), weight_tying=llada_cfg["weight_tying"])
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) == 1:
        llada_cfg["torch_dtype"] = str(dtypes.pop()).removeprefix("torch.")
    atomic.save_safetensors(os.path.join(out_dir, "model.safetensors"), tensors)
    atomic.write_json(os.path.join(out_dir, "config.json"), llada_cfg)
    return out_dir


def load_llada(path: str, cfg: dict, *, device=None, dtype=None):
    """Load a LLaDA-format directory into an Adapter over ``LlamaForCausalLM(is_causal=False)``."""
    from transformers import LlamaForCausalLM  # transformers loads model code on first use

    config = llada_config_to_llama(cfg, source=path)
    tokenizer = load_tokenizer(path)
    mask_id = resolve_mask_token_id(cfg, tokenizer, vocab_size=config.vocab_size, default=LLADA_DEFAULT_MASK_TOKEN_ID,
                                    family="LLaDA", source=path)
    raw = read_state_dict(path)
    try:
        sd = llada_state_dict_to_llama(raw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    del raw
    model = build_from_state_dict(LlamaForCausalLM, config, sd, device=device, dtype=dtype, source=path)
    return Adapter(
        model, tokenizer, family="llada", mask_token_id=int(mask_id), is_diffusion=True, logit_shift=0, source=path
    )
