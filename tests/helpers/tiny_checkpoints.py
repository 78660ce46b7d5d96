"""Tiny checkpoints written by hand in LLaDA's and Dream's published formats, and a tiny DiffusionGemma."""
from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

VOCAB, D, H, KV, FF, LAYERS = 48, 32, 4, 2, 56, 3
LLADA_MASK, DREAM_MASK = 47, 46


def llada_config(**over) -> dict:
    """A tiny config.json with exactly LLaDA-8B-Base's field set (values shrunk)."""
    cfg = {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                     "AutoModel": "modeling_llada.LLaDAModelLM"},
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": D,
        "embedding_dropout": 0.0, "embedding_size": VOCAB, "eos_token_id": 1, "flash_attention": False,
        "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
        "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
        "layer_norm_with_affine": True, "mask_token_id": LLADA_MASK, "max_sequence_length": 64,
        "mlp_hidden_size": FF, "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None,
        "n_heads": H, "n_kv_heads": KV, "n_layers": LAYERS, "pad_token_id": 1, "precision": "amp_bf16",
        "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
        "rope_theta": 500000.0, "scale_logits": False, "transformers_version": "4.46.3", "use_cache": False,
        "vocab_size": VOCAB, "weight_tying": False,
    }
    cfg.update(over)
    return cfg


def llada_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under LLaDA's own parameter names, shaped for :func:`llada_config`."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    hd = D // H
    t = {"model.transformer.wte.weight": r(VOCAB, D, scale=1.0),
         "model.transformer.ln_f.weight": 1 + r(D, scale=0.1),
         "model.transformer.ff_out.weight": r(VOCAB, D)}
    for i in range(LAYERS):
        p = f"model.transformer.blocks.{i}."
        t |= {p + "q_proj.weight": r(D, D), p + "k_proj.weight": r(KV * hd, D), p + "v_proj.weight": r(KV * hd, D),
              p + "attn_out.weight": r(D, D), p + "ff_proj.weight": r(FF, D), p + "up_proj.weight": r(FF, D),
              p + "ff_out.weight": r(D, FF), p + "attn_norm.weight": 1 + r(D, scale=0.1),
              p + "ff_norm.weight": 1 + r(D, scale=0.1)}
    return t


def write_dir(path, cfg: dict, tensors: dict[str, torch.Tensor]):
    """A checkpoint directory at ``path`` (returned): ``cfg`` as config.json, ``tensors`` as model.safetensors."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def dream_config(**over) -> dict:
    """A tiny config.json with Dream-v0-Base-7B's field set (values shrunk)."""
    cfg = {
        "architectures": ["DreamModel"], "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "silu", "hidden_size": D,
        "initializer_range": 0.02, "intermediate_size": FF, "mask_token_id": DREAM_MASK,
        "max_position_embeddings": 64, "max_window_layers": LAYERS, "model_type": "Dream",
        "num_attention_heads": H, "num_hidden_layers": LAYERS, "num_key_value_heads": KV, "pad_token_id": 0,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 64,
        "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.46.2",
        "use_cache": True, "use_sliding_window": False, "vocab_size": VOCAB,
    }
    cfg.update(over)
    return cfg


def dream_tensors(seed: int = 1) -> dict[str, torch.Tensor]:
    """Random weights under Dream's (Qwen2's) names, q/k/v biases included, shaped for :func:`dream_config`."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    hd = D // H
    t = {"model.embed_tokens.weight": r(VOCAB, D, scale=1.0), "model.norm.weight": 1 + r(D, scale=0.1),
         "lm_head.weight": r(VOCAB, D)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": r(D, D), p + "self_attn.q_proj.bias": r(D),
              p + "self_attn.k_proj.weight": r(KV * hd, D), p + "self_attn.k_proj.bias": r(KV * hd),
              p + "self_attn.v_proj.weight": r(KV * hd, D), p + "self_attn.v_proj.bias": r(KV * hd),
              p + "self_attn.o_proj.weight": r(D, D), p + "mlp.gate_proj.weight": r(FF, D),
              p + "mlp.up_proj.weight": r(FF, D), p + "mlp.down_proj.weight": r(D, FF),
              p + "input_layernorm.weight": 1 + r(D, scale=0.1),
              p + "post_attention_layernorm.weight": 1 + r(D, scale=0.1)}
    return t


def save_diffusion_gemma(path):
    """A tiny random DiffusionGemma (uniform noise, no mask token) saved at ``path`` (returned)."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    text = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=16,
                max_position_embeddings=64, sliding_window=8, num_experts=4, top_k_experts=2,
                moe_intermediate_size=16, layer_types=["sliding_attention"] * (LAYERS - 1) + ["full_attention"])
    vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=8, position_embedding_size=16, patch_size=4)
    torch.manual_seed(3)
    model = DiffusionGemmaForBlockDiffusion(
        DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=6)
    ).eval()
    model.save_pretrained(path)
    return path
