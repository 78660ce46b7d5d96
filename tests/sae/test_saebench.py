"""dlmscope.sae.saebench: the SAEBench custom-SAE wrapper of a TopKSAE."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from dlmscope.sae.saebench import SAEBenchConfig, SAEBenchSAE
from dlmscope.sae.topk import TopKSAE
from tests.helpers.saes import perturbed_sae

D, N, K = 16, 64, 4


def make_sae(seed=0) -> TopKSAE:
    """The shared perturbed SAE on the torch backend."""
    return perturbed_sae(seed=seed, backend="torch")


def wrap(sae=None, **kw) -> SAEBenchSAE:
    return SAEBenchSAE(sae if sae is not None else make_sae(), model_name="world-dlm", hook_layer=4, **kw)


def test_encode_decode_forward_match_the_topk_sae():
    sae = make_sae()
    bench = wrap(sae)
    x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(1))
    f = bench.encode(x)
    assert f.shape == (3, 5, N)
    assert torch.equal(f, sae.encode_dense(x))                       # the SAE's own encoder, bit for bit
    assert ((f != 0).sum(-1) <= K).all()
    values, indices = sae.encode(x)
    assert torch.equal(f.gather(-1, indices), values)
    torch.testing.assert_close(bench.decode(f), sae.decode(values, indices))   # dense decode = sparse decode
    torch.testing.assert_close(bench(x), sae(x))
    assert torch.equal(bench(x), bench.decode(bench.encode(x)))       # SAEBench's own encode-then-decode check
    # the encoder subtracts b_dec (apply_b_dec_to_input): SAEBench's reference TopK encoder gives the same code
    pre = torch.relu((x - bench.b_dec) @ bench.W_enc + bench.b_enc)
    top = pre.topk(K, dim=-1)
    torch.testing.assert_close(f, torch.zeros_like(pre).scatter_(-1, top.indices, top.values))


def test_decode_takes_any_dense_latents():
    bench = wrap()
    f = torch.rand(2, N, generator=torch.Generator().manual_seed(2))     # every latent on: not a top-k code
    torch.testing.assert_close(bench.decode(f), f @ bench.W_dec + bench.b_dec)
    with pytest.raises(ValueError, match="d_sae=64"):
        bench.decode(torch.zeros(2, N + 1))


def test_weights_are_shared_in_saebench_layout():
    sae = make_sae()
    bench = wrap(sae)
    assert bench.W_enc.shape == (D, N) and bench.W_dec.shape == (N, D)
    assert bench.b_enc.shape == (N,) and bench.b_dec.shape == (D,)
    assert bench.W_enc.data_ptr() == sae.W_enc.data_ptr() and bench.W_dec is sae.W_dec
    assert bench.b_enc is sae.b_enc and bench.b_dec is sae.b_dec
    assert len(list(bench.parameters())) == 4                           # nothing copied
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(3))
    before = bench.encode(x)
    with torch.no_grad():
        sae.W_enc[7, 2] += 5.0
        sae.b_dec.add_(1.0)
    assert bench.W_enc[2, 7] == sae.W_enc[7, 2]
    assert torch.equal(bench.b_dec, sae.b_dec)
    assert not torch.equal(bench.encode(x), before)
    assert torch.equal(bench.encode(x), sae.encode_dense(x))
    assert bench.k == K


def test_cfg_carries_the_fields_saebench_reads():
    bench = wrap(context_size=64, dataset_path="world/corpus", training_tokens=123, neuronpedia_id="x/y")
    cfg = bench.cfg
    assert isinstance(cfg, SAEBenchConfig)
    assert (cfg.model_name, cfg.d_in, cfg.d_sae, cfg.hook_layer) == ("world-dlm", D, N, 4)
    assert cfg.hook_name == "blocks.4.hook_resid_post" and cfg.hook_head_index is None
    assert cfg.architecture == "topk" and cfg.k == K and cfg.activation_fn_kwargs == {"k": K}
    assert cfg.apply_b_dec_to_input is True and cfg.normalize_activations == "none"
    assert cfg.finetuning_scaling_factor is False and cfg.prepend_bos is True
    assert cfg.context_size == 64 and cfg.dataset_path == "world/corpus"
    assert cfg.training_tokens == 123 and cfg.neuronpedia_id == "x/y"
    assert cfg.dtype == "float32" and cfg.device == "cpu"
    assert cfg.metadata.hook_name == cfg.hook_name and cfg.metadata.model_name == "world-dlm"
    assert cfg.metadata.context_size == 64
    # every field of SAEBench's CustomSAEConfig is there
    for name in ("model_name", "d_in", "d_sae", "hook_layer", "hook_name", "context_size", "hook_head_index",
                 "architecture", "apply_b_dec_to_input", "finetuning_scaling_factor", "activation_fn_str",
                 "activation_fn_kwargs", "prepend_bos", "normalize_activations", "dtype", "device",
                 "model_from_pretrained_kwargs", "dataset_path", "dataset_trust_remote_code", "seqpos_slice",
                 "training_tokens", "sae_lens_training_version", "neuronpedia_id"):
        assert hasattr(cfg, name), name
    json.dumps(cfg.to_dict())
    assert wrap(hook_name="model.layers.4").cfg.hook_name == "model.layers.4"


def test_to_dtype_and_device_stay_consistent():
    sae = make_sae()
    bench = wrap(sae)
    assert bench.dtype == torch.float32 and bench.device == torch.device("cpu")
    assert bench.to(torch.float64) is bench
    assert sae.W_enc.dtype == torch.float64                             # the shared TopKSAE moved with it
    assert bench.dtype == torch.float64 and bench.W_enc.dtype == torch.float64 and bench.cfg.dtype == "float64"
    x = torch.randn(2, D, dtype=torch.float64)
    assert bench.encode(x).dtype == torch.float64 and bench(x).dtype == torch.float64
    bench.dtype = torch.bfloat16                                        # SAEBench's BaseSAE.to sets these attributes
    assert sae.W_dec.dtype == torch.bfloat16 and bench.cfg.dtype == "bfloat16"
    sae.float()                                                         # moving the TopKSAE shows up as well
    assert bench.dtype == torch.float32 and bench.cfg.dtype == "float32"
    bench.to("meta")
    assert bench.device == torch.device("meta") and sae.W_dec.is_meta and bench.cfg.device == "meta"


class NotASAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.W_dec = nn.Parameter(torch.zeros(N, D))


def test_saebench_bad_input():
    with pytest.raises(TypeError, match="TopKSAE.*lacks"):
        wrap(NotASAE())
    with pytest.raises(TypeError, match="TopKSAE"):
        wrap(nn.Linear(D, N))
    with pytest.raises(TypeError, match="TopKSAE"):
        SAEBenchSAE("sae.pt", model_name="m", hook_layer=0)
    for layer in (-1, 1.5, True, "4"):
        with pytest.raises(ValueError, match="hook_layer must be an int >= 0"):
            SAEBenchSAE(make_sae(), model_name="m", hook_layer=layer)
    with pytest.raises(ValueError, match="model_name"):
        SAEBenchSAE(make_sae(), model_name="", hook_layer=0)
    with pytest.raises(ValueError, match="follow from the wrapped SAE"):
        wrap(architecture="jumprelu")
    with pytest.raises(ValueError, match="settable"):
        wrap(no_such_field=1)
    with pytest.raises(ValueError, match=r"x has shape \[2, 3\]"):
        wrap().encode(torch.zeros(2, 3))


def test_config_dataclass_defaults_are_not_shared():
    a = SAEBenchConfig("m", 1, 2, 0, "h")
    b = SAEBenchConfig("m", 1, 2, 0, "h")
    a.activation_fn_kwargs["k"] = 3
    assert b.activation_fn_kwargs == {} and dataclasses.is_dataclass(a)
