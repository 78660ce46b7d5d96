"""The checkpoint state of every SAE architecture (``SAEConfig.arch``, the extra ``threshold`` tensor, Matryoshka's
``prefixes``): validated, round-tripped bit-exactly by the dlmscope format, refused by the Top-K-only sparsify format."""
from __future__ import annotations

import json

import pytest
import torch

from dlmscope.sae import formats
from dlmscope.sae.formats import ARCHS, SAEConfig, param_shapes, tensor_names
from dlmscope.sae.topk import TopKSAE


def _state(arch: str, d: int = 6, n: int = 8, k: int = 2, prefixes=None):
    cfg = SAEConfig(d=d, n=n, k=k, meta={"layer": 3}, arch=arch, prefixes=prefixes)
    g = torch.Generator().manual_seed(0)
    tensors = {name: torch.rand(shape, generator=g) for name, shape in param_shapes(cfg).items()}
    return cfg, tensors


def test_config_validates_arch_and_prefixes():
    assert SAEConfig(d=4, n=8, k=2).arch == "topk" and "arch" not in SAEConfig(d=4, n=8, k=2).to_dict()
    with pytest.raises(ValueError, match="arch must be one of"):
        SAEConfig(d=4, n=8, k=2, arch="relu")
    with pytest.raises(ValueError, match="prefixes is required"):
        SAEConfig(d=4, n=8, k=2, arch="matryoshka")
    with pytest.raises(ValueError, match="only for it"):
        SAEConfig(d=4, n=8, k=2, prefixes=[8])
    for bad in ([2, 2, 8], [4, 6], [0, 8], [2.0, 8], []):
        with pytest.raises(ValueError, match="increasing positive ints ending at n=8"):
            SAEConfig(d=4, n=8, k=2, arch="matryoshka", prefixes=bad)
    cfg = SAEConfig(d=4, n=8, k=2, arch="matryoshka", prefixes=[2, 4, 8])
    assert SAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert tensor_names(cfg) == ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
    assert param_shapes(SAEConfig(d=4, n=8, k=2, arch="jumprelu"))["threshold"] == (8,)
    assert param_shapes(SAEConfig(d=4, n=8, k=2, arch="batchtopk"))["threshold"] == ()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_dlmscope_format_round_trips_every_architecture(tmp_path, arch):
    cfg, tensors = _state(arch, prefixes=[2, 5, 8] if arch == "matryoshka" else None)
    formats.save(cfg, tensors, tmp_path / "sae")
    got_cfg, got = formats.load(tmp_path / "sae")
    assert got_cfg == cfg and sorted(got) == sorted(tensors)
    for name, t in tensors.items():
        assert torch.equal(got[name], t)


def test_a_checkpoint_missing_its_threshold_or_with_a_wrong_one_is_refused(tmp_path):
    cfg, tensors = _state("jumprelu")
    with pytest.raises(TypeError, match="jumprelu SAE has tensors"):
        formats.save(cfg, {k: v for k, v in tensors.items() if k != "threshold"}, tmp_path / "a")
    formats.save(cfg, tensors, tmp_path / "b")
    from safetensors.torch import load_file, save_file
    weights = tmp_path / "b" / "sae.safetensors"
    t = load_file(weights)
    t["threshold"] = torch.ones(3)
    save_file(t, weights)
    with pytest.raises(ValueError, match="threshold"):
        formats.load(tmp_path / "b")
    cfg_file = tmp_path / "b" / "cfg.json"
    raw = json.loads(cfg_file.read_text())
    raw["arch"] = "relu"
    cfg_file.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="cfg.json.*arch"):
        formats.load(tmp_path / "b")


@pytest.mark.parametrize("fmt", ["sparsify"])  # SAELens and dictionary_learning hold them (test_arch_interop)
def test_peer_formats_refuse_other_architectures_before_writing(tmp_path, fmt):
    cfg, tensors = _state("batchtopk")
    with pytest.raises(ValueError, match=f"cannot save a batchtopk SAE in the {fmt} format"):
        formats.save(cfg, tensors, tmp_path / "x", fmt)
    assert not (tmp_path / "x").exists()


def test_topk_class_refuses_another_architectures_state_and_old_checkpoints_load_as_topk(tmp_path):
    cfg, tensors = _state("jumprelu")
    with pytest.raises(ValueError, match="dlmscope.sae.load"):
        TopKSAE.from_state(cfg, tensors)
    sae = TopKSAE(6, 8, 2)
    sae.save(tmp_path / "old")
    raw = json.loads((tmp_path / "old" / "cfg.json").read_text())
    assert "arch" not in raw and "prefixes" not in raw   # a Top-K checkpoint's cfg.json is as before
    assert TopKSAE.load(tmp_path / "old").cfg.arch == "topk"
