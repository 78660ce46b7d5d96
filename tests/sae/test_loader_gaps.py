"""Bad SAE checkpoints in every format raise ``ValueError`` naming the file at fault, never a ``TypeError``,
``KeyError``, ``AttributeError`` or ``RecursionError`` from inside the loader (issue 21.13)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dlmscope.sae import formats
from dlmscope.sae.topk import TopKSAE
from tests.helpers.saes import perturbed_sae

CFG = {"dlmscope": "cfg.json", "saelens": "cfg.json", "sparsify": "cfg.json", "dictionary_learning": "config.json"}
WEIGHTS = {"dlmscope": "sae.safetensors", "saelens": "sae_weights.safetensors", "sparsify": "sae.safetensors",
           "dictionary_learning": "ae.pt"}
#: each format's name for the encoder matrix, and whether it is stored [d, n] (transposed w.r.t. ours)
W_ENC = {"dlmscope": ("W_enc", False), "saelens": ("W_enc", True), "sparsify": ("encoder.weight", False),
         "dictionary_learning": ("encoder.weight", False)}


def saved(tmp_path: Path, fmt: str, meta: dict | None = None) -> Path:
    return formats.save(*perturbed_sae(meta=meta or {}).state(), tmp_path / fmt, fmt)


def edit_cfg(folder: Path, fmt: str, edit) -> None:
    file = folder / CFG[fmt]
    cfg = json.loads(file.read_text())
    edit(cfg)
    file.write_text(json.dumps(cfg))


def read_weights(folder: Path, fmt: str) -> dict:
    file = folder / WEIGHTS[fmt]
    return torch.load(file, weights_only=True) if fmt == "dictionary_learning" else load_file(file)


def write_weights(folder: Path, fmt: str, tensors: dict) -> None:
    file = folder / WEIGHTS[fmt]
    if fmt == "dictionary_learning":
        torch.save(tensors, file)
    else:
        save_file({k: v.contiguous() for k, v in tensors.items()}, file)


def refused(path: Path, file: str, match: str = "") -> None:
    """Loading ``path`` raises ValueError naming ``file`` (and ``match``)."""
    with pytest.raises(ValueError) as info:
        TopKSAE.load(path)
    assert str(path / file) in str(info.value), info.value
    assert match in str(info.value), info.value


@pytest.mark.parametrize("dtype", [[], {}, 3, None])
def test_21_13_saelens_dtype_of_the_wrong_type(tmp_path, dtype):
    path = saved(tmp_path, "saelens")
    edit_cfg(path, "saelens", lambda c: c.update(dtype=dtype))
    refused(path, "cfg.json", "dtype")


@pytest.mark.parametrize("fmt", sorted(CFG))
@pytest.mark.parametrize("where", ["top", "field"])
def test_21_13_deeply_nested_json_config(tmp_path, fmt, where):
    path = saved(tmp_path, fmt)
    deep = "[" * 100_000 + "]" * 100_000
    (path / CFG[fmt]).write_text(deep if where == "top" else '{"d_in": 16, "x": ' + deep + "}")
    refused(path, CFG[fmt], "corrupt JSON")


@pytest.mark.parametrize("fmt", sorted(CFG))
def test_21_13_a_number_too_long_to_convert(tmp_path, fmt):
    path = saved(tmp_path, fmt)
    (path / CFG[fmt]).write_text('{"d_in": ' + "1" * 5000 + "}")
    refused(path, CFG[fmt])


@pytest.mark.parametrize("buffer, value", [("k", torch.tensor(4 + 0j)), ("k", torch.tensor(True)),
                                           ("k", torch.tensor(4.0)), ("threshold", torch.tensor(1 + 1j)),
                                           ("threshold", torch.tensor(float("nan")))])
def test_21_13_dictionary_learning_scalar_buffers_of_the_wrong_kind(tmp_path, buffer, value):
    path = saved(tmp_path, "dictionary_learning")
    state = read_weights(path, "dictionary_learning")
    state[buffer] = value
    write_weights(path, "dictionary_learning", state)
    refused(path, "ae.pt", buffer)


@pytest.mark.parametrize("fmt", sorted(CFG))
@pytest.mark.parametrize("norm", [0, -1.5, "2", [1.0], "NaN", "Infinity"])
def test_21_13_norm_factor_that_is_not_a_positive_finite_number(tmp_path, fmt, norm):
    path = saved(tmp_path, fmt, meta={"norm_factor": 2.0, "norm_factor_folded": True})
    file = path / CFG[fmt]
    text = file.read_text()
    assert text.count('"norm_factor": 2.0') == 1
    value = norm if norm in ("NaN", "Infinity") else json.dumps(norm)  # the bare constants, which are not JSON
    file.write_text(text.replace('"norm_factor": 2.0', f'"norm_factor": {value}'))
    refused(path, CFG[fmt], "norm_factor")


@pytest.mark.parametrize("fmt", sorted(CFG))
def test_21_13_a_positive_norm_factor_loads(tmp_path, fmt):
    path = saved(tmp_path, fmt, meta={"norm_factor": 2.0, "norm_factor_folded": True})
    assert TopKSAE.load(path).cfg.meta["norm_factor"] == 2.0


def test_21_13_wrong_types_in_peer_configs(tmp_path):
    sparsify = saved(tmp_path, "sparsify")
    edit_cfg(sparsify, "sparsify", lambda c: c.update(num_latents=[]))
    refused(sparsify, "cfg.json", "num_latents")
    saelens = saved(tmp_path, "saelens")
    edit_cfg(saelens, "saelens", lambda c: c.update(metadata=[]))
    refused(saelens, "cfg.json", "metadata")


@pytest.mark.parametrize("fmt", sorted(CFG))
def test_21_13_broadcastable_wrong_shapes(tmp_path, fmt):
    path = saved(tmp_path, fmt)
    t = read_weights(path, fmt)
    name, transposed = W_ENC[fmt]
    t[name] = t[name][:, :1] if transposed else t[name][:1]  # [1, d]: broadcasts against [n, d]
    write_weights(path, fmt, t)
    refused(path, WEIGHTS[fmt])


@pytest.mark.parametrize("fmt", sorted(CFG))
def test_21_13_nan_weights(tmp_path, fmt):
    path = saved(tmp_path, fmt)
    t = read_weights(path, fmt)
    name, _ = W_ENC[fmt]
    t[name][0, 0] = float("nan")
    write_weights(path, fmt, t)
    refused(path, WEIGHTS[fmt], "non-finite")


@pytest.mark.parametrize("fmt", sorted(CFG))
@pytest.mark.parametrize("keep", [0, 3, 8, 100, 0.5])
def test_21_13_truncated_weights_file(tmp_path, fmt, keep):
    path = saved(tmp_path, fmt)
    file = path / WEIGHTS[fmt]
    data = file.read_bytes()
    file.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    refused(path, WEIGHTS[fmt])
