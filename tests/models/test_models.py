"""Model adapters: tiny checkpoints written by hand in LLaDA's and Dream's published formats.

The LLaDA checkpoint is checked against an independent plain-PyTorch implementation of LLaDA's forward
(bidirectional Llama block, written from LLaDA's own parameter names), not only against our own mapping.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dlmscope import models
from dlmscope.models import llada as llada_mod

from tests.helpers.tiny_checkpoints import (
    D, DREAM_MASK, FF, H, KV, LAYERS, LLADA_MASK, VOCAB, dream_config, dream_tensors, llada_config, llada_tensors,
    write_dir,
)


# ------------------------------------------------------------------------------------- reference forward
def llada_reference_logits(cfg: dict, sd: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """LLaDA's forward in plain PyTorch from LLaDA's own names: Llama block, full attention, no shift."""
    B, T = ids.shape
    d, nh, nkv = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"]
    hd, eps = d // nh, cfg["rms_norm_eps"]
    inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.outer(torch.arange(T, dtype=torch.float64), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1).float(), torch.cat([ang.sin()] * 2, -1).float()

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope(t):
        t1, t2 = t.chunk(2, -1)
        return t * cos + torch.cat([-t2, t1], -1) * sin

    x = sd["model.transformer.wte.weight"][ids]
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        h = rms(x, sd[p + "attn_norm.weight"])
        q = rope((h @ sd[p + "q_proj.weight"].T).view(B, T, nh, hd).transpose(1, 2))
        k = rope((h @ sd[p + "k_proj.weight"].T).view(B, T, nkv, hd).transpose(1, 2))
        v = (h @ sd[p + "v_proj.weight"].T).view(B, T, nkv, hd).transpose(1, 2)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1)  # no causal mask
        x = x + (att @ v).transpose(1, 2).reshape(B, T, d) @ sd[p + "attn_out.weight"].T
        h = rms(x, sd[p + "ff_norm.weight"])
        x = x + (F.silu(h @ sd[p + "ff_proj.weight"].T) * (h @ sd[p + "up_proj.weight"].T)) @ sd[p + "ff_out.weight"].T
    return rms(x, sd["model.transformer.ln_f.weight"]) @ sd["model.transformer.ff_out.weight"].T


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def llada_dir(tmp_path_factory):
    return write_dir(tmp_path_factory.mktemp("llada"), llada_config(), llada_tensors())


@pytest.fixture(scope="module")
def llada(llada_dir):
    return models.load(llada_dir)


@pytest.fixture(scope="module")
def dream_dir(tmp_path_factory):
    return write_dir(tmp_path_factory.mktemp("dream"), dream_config(), dream_tensors())


@pytest.fixture(scope="module")
def dream(dream_dir):
    return models.load(dream_dir)


def _save_ar(kind: str, path):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(2)
    common = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
                  num_attention_heads=H, num_key_value_heads=KV, max_position_embeddings=64)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ar_llama(tmp_path_factory):
    return models.load(_save_ar("llama", tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="module")
def ar_qwen2(tmp_path_factory):
    return models.load(_save_ar("qwen2", tmp_path_factory.mktemp("qwen2")))


@pytest.fixture(params=["ar_llama", "ar_qwen2"])
def ar(request):
    return request.getfixturevalue(request.param)


def ids(seed=0, batch=2, seq=10):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB - 3, (batch, seq), generator=g)


# ---------------------------------------------------------------------------------------------- LLaDA
def test_llada_facts(llada):
    assert llada.family == "llada" and llada.is_diffusion and llada.logit_shift == 0
    assert llada.mask_token_id == LLADA_MASK == llada.require_mask_token()
    assert llada.num_layers == LAYERS == len(llada.blocks)
    assert type(llada.model).__name__ == "LlamaForCausalLM" and llada.model.config.is_causal is False
    c = llada.model.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (D, FF, H, KV)
    assert c.rope_parameters["rope_theta"] == 500000.0 and c.rms_norm_eps == 1e-5
    assert llada.tokenizer is None  # none shipped in this directory


def test_llada_weights_land_in_the_right_place(llada, llada_dir):
    from transformers import LlamaForCausalLM

    raw = load_file(str(llada_dir / "model.safetensors"))
    # docs/reference.md §8 rename table, written out independently of the adapter's table.
    table = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
             "attn_out": "self_attn.o_proj", "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
             "ff_out": "mlp.down_proj", "attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm"}
    sd = llada.model.state_dict()
    assert torch.equal(sd["model.embed_tokens.weight"], raw["model.transformer.wte.weight"])
    assert torch.equal(sd["model.norm.weight"], raw["model.transformer.ln_f.weight"])
    assert torch.equal(sd["lm_head.weight"], raw["model.transformer.ff_out.weight"])
    for i in range(LAYERS):
        for old, new in table.items():
            assert torch.equal(sd[f"model.layers.{i}.{new}.weight"], raw[f"model.transformer.blocks.{i}.{old}.weight"])
    # ... and a LlamaForCausalLM built from the same tensors computes the same logits.
    twin = LlamaForCausalLM(llada_mod.llada_config_to_llama(llada_config())).eval()
    twin.load_state_dict(llada_mod.llada_state_dict_to_llama(raw))
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(llada.logits(x), twin(x).logits, rtol=0, atol=0)


def test_llada_matches_independent_reference_forward(llada, llada_dir):
    raw = load_file(str(llada_dir / "model.safetensors"))
    x = ids(3)
    with torch.no_grad():
        torch.testing.assert_close(llada.logits(x), llada_reference_logits(llada_config(), raw, x),
                                   rtol=1e-4, atol=1e-4)


def test_llada_save_load_round_trip_exact(llada, llada_dir, tmp_path):
    out = models.save_llada_checkpoint(llada.model, tmp_path / "rt", mask_token_id=LLADA_MASK, eos_token_id=1,
                                       pad_token_id=1)
    cfg = json.loads((tmp_path / "rt" / "config.json").read_text())
    ref = llada_config()
    # Same field names as the published format; same values for everything that defines the model.
    assert set(ref) - {"transformers_version"} <= set(cfg)
    for k in ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "vocab_size", "embedding_size",
              "rope_theta", "rms_norm_eps", "weight_tying", "include_bias", "mask_token_id", "eos_token_id",
              "pad_token_id", "model_type", "architectures", "block_type", "max_sequence_length"):
        assert cfg[k] == ref[k], k
    a, b = load_file(str(llada_dir / "model.safetensors")), load_file(str(tmp_path / "rt" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = models.load(out)
    x = ids(4)
    with torch.no_grad():
        assert torch.equal(again.logits(x), llada.logits(x))


def test_llada_weight_tying_and_bad_options(tmp_path):
    t = llada_tensors()
    del t["model.transformer.ff_out.weight"]
    a = models.load(write_dir(tmp_path / "tied", llada_config(weight_tying=True), t))
    assert torch.equal(a.model.lm_head.weight, t["model.transformer.wte.weight"])
    with pytest.raises(ValueError, match="alibi"):
        models.load(write_dir(tmp_path / "alibi", llada_config(alibi=True), llada_tensors()))
    bad = llada_tensors()
    bad["model.transformer.blocks.0.mystery.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match="mystery"):
        models.load(write_dir(tmp_path / "extra", llada_config(), bad))
    short = llada_tensors()
    del short["model.transformer.blocks.2.ff_norm.weight"]
    with pytest.raises(ValueError, match="missing"):
        models.load(write_dir(tmp_path / "short", llada_config(), short))


def test_llada_key_rename_is_a_bijection():
    raw = llada_tensors()
    there = llada_mod.llada_state_dict_to_llama(raw)
    back = llada_mod.llama_state_dict_to_llada(there)
    assert back.keys() == raw.keys()
    with pytest.raises(ValueError):
        llada_mod.llada_key_to_llama("model.transformer.blocks.0.q_norm.weight")


# ---------------------------------------------------------------------------------------------- Dream
def test_dream_facts(dream):
    assert dream.family == "dream" and dream.is_diffusion and dream.logit_shift == 1
    assert dream.mask_token_id == DREAM_MASK and dream.num_layers == LAYERS
    assert type(dream.model).__name__ == "Qwen2ForCausalLM" and dream.model.config.is_causal is False


def test_dream_identical_keys_and_shift(dream, dream_dir):
    from transformers import Qwen2ForCausalLM

    raw = load_file(str(dream_dir / "model.safetensors"))
    sd = dream.model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in raw.items())
    twin = Qwen2ForCausalLM(models.dream.dream_config_to_qwen2(dream_config())).eval()
    twin.load_state_dict(raw, strict=True)
    x = ids(5)
    with torch.no_grad():
        unshifted = twin(x).logits
        aligned = dream.logits(x)
    torch.testing.assert_close(aligned[:, 1:], unshifted[:, :-1], rtol=0, atol=0)
    torch.testing.assert_close(aligned[:, 0], unshifted[:, 0], rtol=0, atol=0)
    # Without the shift this test fails: the raw logits differ from the aligned ones.
    assert not torch.allclose(aligned, unshifted)
    torch.testing.assert_close(dream.raw_logits(x), unshifted, rtol=0, atol=0)


def test_dream_save_round_trip(dream, dream_dir, tmp_path):
    models.save_dream_checkpoint(dream.model, tmp_path / "rt", mask_token_id=DREAM_MASK, pad_token_id=0,
                                 eos_token_id=0, bos_token_id=0)
    cfg = json.loads((tmp_path / "rt" / "config.json").read_text())
    assert set(dream_config()) - {"transformers_version"} <= set(cfg)
    assert cfg["model_type"] == "Dream" and cfg["mask_token_id"] == DREAM_MASK
    a, b = load_file(str(dream_dir / "model.safetensors")), load_file(str(tmp_path / "rt" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------ all families
@pytest.fixture(params=["llada", "dream", "ar_llama", "ar_qwen2"])
def any_adapter(request):
    return request.getfixturevalue(request.param)


def test_bidirectionality(any_adapter):
    x = ids(6)
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % VOCAB
    with torch.no_grad():
        # raw logits: for Dream the aligned position 0 is a copy of raw position 0 anyway
        a, b = any_adapter.raw_logits(x)[:, 0], any_adapter.raw_logits(y)[:, 0]
    if any_adapter.is_diffusion:
        assert (a - b).abs().max() > 1e-4, "changing the last token must change position 0 (bidirectional)"
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_padding_mask_is_honoured(any_adapter):
    x = ids(7)
    am = torch.ones_like(x)
    am[:, -3:] = 0
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % VOCAB
    with torch.no_grad():
        a, b = any_adapter.logits(x, am), any_adapter.logits(y, am)
    torch.testing.assert_close(a[:, :-3], b[:, :-3], rtol=1e-5, atol=1e-5)


def test_hook_module_and_forward_until_match_hidden_states(any_adapter):
    a = any_adapter
    x = ids(8)
    with torch.no_grad():
        out = a.model(input_ids=x, output_hidden_states=True)
        got = a.forward_until(x, [0, 1, a.num_layers - 1])
    hs = out.hidden_states
    assert len(hs) == a.num_layers + 1  # embeddings + one per block
    for layer in range(a.num_layers - 1):
        if layer in got:
            torch.testing.assert_close(got[layer], hs[layer + 1], rtol=0, atol=0)
    # HF's last hidden state is post final-norm; resid_post of the last block is before it.
    last = got[a.num_layers - 1]
    torch.testing.assert_close(a.model.model.norm(last), hs[-1], rtol=1e-6, atol=1e-6)
    assert a.hook_module(1) is a.blocks[1]
    captured = {}
    h = a.hook_module(1).register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    try:
        with torch.no_grad():
            a.logits(x)
    finally:
        h.remove()
    out1 = captured["x"][0] if isinstance(captured["x"], tuple) else captured["x"]
    torch.testing.assert_close(out1, got[1], rtol=0, atol=0)


def test_forward_until_stops_early(llada):
    calls = {}
    handles = [blk.register_forward_hook(lambda m, i, o, j=j: calls.__setitem__(j, calls.get(j, 0) + 1))
               for j, blk in enumerate(llada.blocks)]
    handles.append(llada.model.model.norm.register_forward_hook(lambda *a: calls.__setitem__("norm", 1)))
    handles.append(llada.model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("head", 1)))
    try:
        with torch.no_grad():
            got = llada.forward_until(ids(), 1)
    finally:
        for h in handles:
            h.remove()
    assert list(got) == [1] and got[1].shape == (2, 10, D)
    assert calls == {0: 1, 1: 1}, calls
    # hooks are removed afterwards: a full forward runs normally
    with torch.no_grad():
        assert llada.logits(ids()).shape == (2, 10, VOCAB)


def test_ar_facts(ar):
    assert not ar.is_diffusion and ar.mask_token_id is None and ar.logit_shift == 0
    assert getattr(ar.model.config, "is_causal", True) is not False and ar.num_layers == LAYERS
    with pytest.raises(ValueError, match="autoregressive and has no mask token"):
        ar.require_mask_token()


# -------------------------------------------------------------------------------------------- bad input
def test_layer_out_of_range(llada):
    for bad in (LAYERS, -1, 100):
        with pytest.raises(ValueError, match=rf"0\.\.{LAYERS - 1}"):
            llada.hook_module(bad)
        with pytest.raises(ValueError, match=rf"0\.\.{LAYERS - 1}"):
            llada.forward_until(ids(), [0, bad])
    for bad in (1.5, "2", True):
        with pytest.raises(ValueError, match="integer"):
            llada.hook_module(bad)
    with pytest.raises(ValueError, match="no layers"):
        llada.forward_until(ids(), [])


def test_unknown_model_type_and_missing_path(tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match=r"bert.*unsupported model_type 'bert'|unsupported model_type 'bert'") as e:
        models.load(d)
    assert str(d) in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.load(tmp_path / "empty")
    d2 = tmp_path / "noweights"
    d2.mkdir()
    (d2 / "config.json").write_text(json.dumps(llada_config()))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        models.load(d2)


def test_bad_input_ids(llada):
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        llada.logits(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="integer"):
        llada.logits(torch.zeros(1, 3))


def _save_tokenizer(path, mask_id: int):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    vocab["[MASK]"] = mask_id
    del vocab[f"w{mask_id}"]
    tok = Tokenizer(WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, mask_token="[MASK]", unk_token="w0").save_pretrained(path)


def test_tokenizer_is_loaded_when_shipped(tmp_path):
    d = write_dir(tmp_path / "withtok", llada_config(), llada_tensors())
    _save_tokenizer(d, LLADA_MASK)
    a = models.load(d)
    assert a.tokenizer is not None and a.tokenizer.mask_token_id == LLADA_MASK
    assert a.tokenizer("w3 [MASK]")["input_ids"] == [3, LLADA_MASK]


# ------------------------------------------------------------------------------------- DiffusionGemma
def test_diffusion_gemma(gemma):
    assert gemma.family == "diffusion_gemma" and gemma.is_diffusion and gemma.logit_shift == 0
    assert gemma.mask_token_id is None and gemma.noise == "uniform"
    with pytest.raises(ValueError, match="uniform-noise"):
        gemma.require_mask_token()
    assert gemma.num_layers == LAYERS and gemma.blocks is gemma.model.model.decoder.layers
    canvas, prompt = ids(9, seq=6), ids(10, seq=3)
    changed = canvas.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB
    with torch.no_grad():
        a = gemma.logits(canvas, prompt_ids=prompt)
        b = gemma.logits(changed, prompt_ids=prompt)
        full = gemma.model(input_ids=prompt, decoder_input_ids=canvas, output_hidden_states=True)
        got = gemma.forward_until(canvas, [0, 1], prompt_ids=prompt)
    assert a.shape == (2, 6, VOCAB)
    torch.testing.assert_close(a, full.logits, rtol=0, atol=0)
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-4  # bidirectional canvas
    for layer in (0, 1):
        torch.testing.assert_close(got[layer], full.hidden_states[layer + 1], rtol=0, atol=0)
    with pytest.raises(ValueError, match=rf"0\.\.{LAYERS - 1}"):
        gemma.hook_module(LAYERS)


def test_sharded_checkpoint_and_dtype(tmp_path, llada):
    t = llada_tensors()
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(llada_config()))
    keys = sorted(t)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: t[k] for k in ks}, str(d / name))
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    a = models.load(d)
    x = ids(11)
    with torch.no_grad():
        assert torch.equal(a.logits(x), llada.logits(x))
    b = models.load(d, dtype=torch.bfloat16)
    assert b.dtype == torch.bfloat16 and b.model.model.rotary_emb.inv_freq.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(b.logits(x).float(), llada.logits(x), rtol=0.1, atol=0.1)


def test_mask_token_resolution(tmp_path):
    cfg = llada_config()
    del cfg["mask_token_id"]
    d = write_dir(tmp_path / "tokmask", cfg, llada_tensors())
    with pytest.raises(ValueError, match="no mask_token_id"):  # tiny vocab: LLaDA-8B's default 126336 does not fit
        models.load(d)
    _save_tokenizer(d, 40)
    assert models.load(d).mask_token_id == 40  # falls back to the tokenizer's [MASK]
    d2 = write_dir(tmp_path / "clash", llada_config(), llada_tensors())
    _save_tokenizer(d2, 40)
    with pytest.raises(ValueError, match="disagrees"):
        models.load(d2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        models.load(write_dir(tmp_path / "big", dream_config(mask_token_id=VOCAB), dream_tensors()))


def test_detect_family():
    assert models.detect_family({"architectures": ["LLaDAModelLM"]}) == "llada"
    assert models.detect_family({"model_type": "Dream"}) == "dream"
    assert models.detect_family({"model_type": "qwen2"}) == "ar"
    assert models.detect_family({"model_type": "llama"}) == "ar"
    assert models.detect_family({"model_type": "diffusion_gemma"}) == "diffusion_gemma"
    with pytest.raises(ValueError, match="unsupported model_type None"):
        models.detect_family({})


@pytest.mark.parametrize("shard", ["ABS", "../outside.safetensors", "sub/model.safetensors", "..", ""])
def test_21_18_weight_map_names_only_files_inside_the_checkpoint_folder(tmp_path, shard):
    t = llada_tensors()
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(llada_config()))
    save_file(t, str(tmp_path / "outside.safetensors"))  # a complete checkpoint outside the folder
    save_file(t, str(d / "sub" / "model.safetensors"))
    name = str(tmp_path / "outside.safetensors") if shard == "ABS" else shard
    index = d / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: name for k in t}}))
    with pytest.raises(ValueError, match="model.safetensors.index.json.*plain file names") as info:
        models.load(d)
    assert str(index) in str(info.value)


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"weight_map": [1]}', "[]",
                                  '{"weight_map": {"a": 1}}', "\udcff"])
def test_21_18_a_bad_weight_index_names_the_file(tmp_path, text):
    d = write_dir(tmp_path / "ckpt", llada_config(), llada_tensors())
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    index = d / "model.safetensors.index.json"
    index.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError) as info:
        models.load(d)
    assert str(index) in str(info.value)
