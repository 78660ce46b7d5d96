"""Tiny random LLaDA / Dream / AR checkpoints loaded back through ``models.load``, and token batches for them.

Fixtures act only in the modules that import them: ``llada``, ``ar`` (module-scoped) and ``single_thread``
(autouse: importing it runs that module single-threaded).
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from dlmscope import models

VOCAB, D, LAYERS = 50, 32, 3
MASK = 49  # the mask token id of the tiny DLMs
PAD = 0


def _llama_config(causal: bool):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_hidden_layers=LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False, is_causal=causal, use_cache=False, pad_token_id=PAD,
                       bos_token_id=1, eos_token_id=2)


def make_llada(path, seed: int = 0):
    """A tiny random LLaDA-format checkpoint loaded back through ``models.load``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(causal=False))
    models.save_llada_checkpoint(model, path, mask_token_id=MASK, eos_token_id=2, pad_token_id=PAD)
    return models.load(path)


def make_dream(path, seed: int = 1, lm_head_scale: float = 1.0):
    """A tiny random Dream-format checkpoint (Qwen2, bidirectional, shifted logits) loaded through ``models.load``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, is_causal=False, use_cache=False, pad_token_id=PAD,
                      bos_token_id=1, eos_token_id=2)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(lm_head_scale)
    models.save_dream_checkpoint(model, path, mask_token_id=MASK, pad_token_id=PAD, eos_token_id=2, bos_token_id=1)
    return models.load(path)


def make_ar(path, seed: int = 2):
    """A tiny causal Llama (AR baseline, no mask token) loaded through ``models.load``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(causal=True))
    model.save_pretrained(path)
    return models.load(path)


def build_tiny_llada(path):
    """A 2-block LLaDA-format checkpoint with the world tokenizer at ``path`` (returned)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dlmscope.world import TOKENIZER_DIR
    from dlmscope.world.tokenizer import load_tokenizer

    tok = load_tokenizer(TOKENIZER_DIR)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, is_causal=False, tie_word_embeddings=False)
    models.save_llada_checkpoint(LlamaForCausalLM(config), path, mask_token_id=tok.mask_token_id,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    for f in os.listdir(TOKENIZER_DIR):
        shutil.copy(f"{TOKENIZER_DIR}/{f}", path / f)
    return path


def token_batch(seed: int = 0, batch: int = 3, seq: int = 12, pad_tail: bool = True):
    """Random non-special ids [batch, seq] and an attention mask with right padding on some rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, MASK, (batch, seq), generator=g)
    am = torch.ones(batch, seq, dtype=torch.long)
    if pad_tail:
        for b in range(1, batch):
            am[b, seq - 2 * b:] = 0
        ids = ids.masked_fill(am == 0, PAD)
    return ids, am


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on shared cores OpenMP spin-waits make every
    32-wide matmul take ~15 ms; run these modules single-threaded and restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    """The tiny LLaDA of :func:`make_llada`, once per importing module."""
    return make_llada(tmp_path_factory.mktemp("llada"))


@pytest.fixture(scope="module")
def ar(tmp_path_factory):
    """The tiny causal Llama of :func:`make_ar`, once per importing module."""
    return make_ar(tmp_path_factory.mktemp("ar"))
