"""The activation cache read back when it is stale, damaged or hostile (issue 21): a cache harvested from another
model, other text or other settings is refused by name, and a damaged one raises a ValueError naming the file."""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from dlmscope.data.activations import ActivationStream
from dlmscope.data.cache import CachedActivationStream, load_cache_index, read_cache

from tests.helpers.tiny_models import (  # noqa: F401  (fixtures: single_thread is autouse; llada is module-scoped)
    D, llada, make_llada, single_thread, token_batch,
)

DATA = [token_batch(seed=s, batch=3, seq=16) for s in range(3)]
KW = dict(batch_size=8, buffer_tokens=24, seed=1)
REFUSED = "use another cache dir or delete this one"


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """A second tiny LLaDA: the same architecture and config as ``llada``, other weights in another folder."""
    return make_llada(tmp_path_factory.mktemp("twin"), seed=3)


def _stream(adapter, cache, **kw) -> ActivationStream:
    return ActivationStream(adapter, DATA, [0, 2], "mask", cache_dir=cache, shard_tokens=10, **(KW | kw))


@pytest.fixture
def cache(llada, tmp_path):
    """A complete cache of ``llada`` (several shards)."""
    path = tmp_path / "cache"
    _stream(llada, path).build_cache()
    return path


def _edit_index(cache, edit) -> None:
    index = json.loads((cache / "index.json").read_text())
    (cache / "index.json").write_text(json.dumps(edit(index)))


# ------------------------------------------------------------------------------- 21.2: identity of a harvest
def test_21_2_cache_from_another_model_is_refused(llada, twin, cache):
    index = load_cache_index(cache)
    assert index["meta"]["model"]["path"] == os.path.realpath(llada.source)
    assert index["meta"]["model"]["weights"] and len(index["meta"]["model"]["config_sha256"]) == 64
    with pytest.raises(ValueError, match=f"model.path=.*{REFUSED}"):
        list(_stream(twin, cache))
    with pytest.raises(ValueError, match=REFUSED):
        _stream(twin, cache).build_cache()
    # the same model reuses it: no forward
    assert list(_stream(llada, cache))


def test_21_2_cache_of_a_changed_model_folder_is_refused(tmp_path):
    """The same folder whose config or weights changed between the runs is another model."""
    folder = tmp_path / "model"
    model = make_llada(folder, seed=0)
    cache = tmp_path / "cache"
    _stream(model, cache).build_cache()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    with pytest.raises(ValueError, match=f"model.config_sha256=.*{REFUSED}"):
        list(_stream(model, cache))


def test_21_2_cache_of_other_text_or_packing_is_refused(llada, tmp_path):
    cache = tmp_path / "cache"
    text = {"corpus": "/data/a.jsonl", "text_field": "text", "split": "train", "seq_len": 16, "lm_batch": 3}
    _stream(llada, cache, text_source=text).build_cache()
    assert load_cache_index(cache)["meta"]["text"] == text
    assert list(_stream(llada, cache, text_source=text))
    for key, other in (("corpus", "/data/b.jsonl"), ("text_field", "body"), ("split", "test"), ("seq_len", 8),
                       ("lm_batch", 4)):
        with pytest.raises(ValueError, match=f"text.{key}=.*{REFUSED}"):
            list(_stream(llada, cache, text_source=text | {key: other}))
    with pytest.raises(ValueError, match=f"text=.*{REFUSED}"):
        list(_stream(llada, cache))  # no description of the text given now: not the same harvest either
    with pytest.raises(ValueError, match=f"dtype=.*{REFUSED}"):
        list(_stream(llada, cache, text_source=text, dtype=torch.float64))


def test_21_2_cache_without_identity_is_refused(llada, cache):
    """A cache whose index predates the identity record cannot show which model it holds: refused, not reused."""
    old_keys = ("policy", "t_min", "t_max", "seed", "source", "max_tokens")
    _edit_index(cache, lambda ix: ix | {"meta": {k: v for k, v in ix["meta"].items() if k in old_keys}})
    with pytest.raises(ValueError, match=f"does not record .*model.*{REFUSED}"):
        list(_stream(llada, cache))


def test_21_2_cache_with_another_d_is_refused(llada, cache):
    _edit_index(cache, lambda ix: ix | {"meta": ix["meta"] | {"d": D + 1}})
    with pytest.raises(ValueError, match=f"d=.*{REFUSED}"):
        list(_stream(llada, cache))


# ---------------------------------------------------------------------------- 21.13: damaged index and shards
@pytest.mark.parametrize("edit", [
    lambda ix: [ix],
    lambda ix: "index",
    lambda ix: {k: v for k, v in ix.items() if k != "shards"},
    lambda ix: {k: v for k, v in ix.items() if k != "layers"},
    lambda ix: {k: v for k, v in ix.items() if k != "d"},
    lambda ix: {k: v for k, v in ix.items() if k != "total_tokens"},
    lambda ix: {k: v for k, v in ix.items() if k != "meta"},
    lambda ix: ix | {"shards": {"file": "shard_00000.safetensors"}},
    lambda ix: ix | {"shards": [{"tokens": 3}] + ix["shards"][1:]},
    lambda ix: ix | {"shards": [{"file": 7, "tokens": 3}] + ix["shards"][1:]},
    lambda ix: ix | {"shards": [ix["shards"][0] | {"tokens": "10"}] + ix["shards"][1:]},
    lambda ix: ix | {"shards": ["shard_00000.safetensors"] + ix["shards"][1:]},
    lambda ix: ix | {"shards": ix["shards"] + ix["shards"][:1]},
    lambda ix: ix | {"layers": "0"},
    lambda ix: ix | {"layers": [0, "2"]},
    lambda ix: ix | {"d": "32"},
    lambda ix: ix | {"d": 0},
    lambda ix: ix | {"dtype": []},
    lambda ix: ix | {"dtype": "complex64"},
    lambda ix: ix | {"meta": []},
    lambda ix: ix | {"version": [1]},
    lambda ix: ix | {"layers": []},
], ids=["list", "string", "no-shards", "no-layers", "no-d", "no-total", "no-meta", "shards-dict", "shard-no-file",
        "shard-file-int", "tokens-str", "shard-str", "shard-twice", "layers-str", "layer-str", "d-str", "d-zero",
        "dtype-list", "dtype-complex", "meta-list", "version-list", "no-layer"])
def test_21_13_malformed_index_is_a_value_error_naming_it(cache, edit):
    _edit_index(cache, edit)
    where = re.escape(str(cache / "index.json"))
    with pytest.raises(ValueError, match=f"^{where}"):
        load_cache_index(cache)
    with pytest.raises(ValueError, match=f"^{where}"):
        list(CachedActivationStream(cache, **KW))


@pytest.mark.parametrize("text", ["{", "\xff\xfe", "[" * 100_000 + "]" * 100_000])
def test_21_13_unreadable_index_is_a_value_error_naming_it(cache, text):
    (cache / "index.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=f"^{re.escape(str(cache / 'index.json'))}"):
        load_cache_index(cache)


def test_21_13_wrong_total_tokens_is_refused(cache):
    """total_tokens sets the stream's length, hence the trainer's LR schedule: it must match the shards."""
    _edit_index(cache, lambda ix: ix | {"total_tokens": ix["total_tokens"] + 1000})
    with pytest.raises(ValueError, match=f"^{re.escape(str(cache / 'index.json'))}.*total_tokens"):
        CachedActivationStream(cache, **KW)


def test_21_13_shard_rows_that_disagree_with_the_index_are_refused(cache):
    _edit_index(cache, lambda ix: ix | {"shards": [ix["shards"][0] | {"tokens": ix["shards"][0]["tokens"] + 1}]
                                        + ix["shards"][1:], "total_tokens": ix["total_tokens"] + 1})
    with pytest.raises(ValueError, match="shard_00000.safetensors"):
        CachedActivationStream(cache, **KW)


def test_21_13_shard_with_the_wrong_d_is_refused(cache):
    shard = cache / "shard_00000.safetensors"
    rows = load_cache_index(cache)["shards"][0]["tokens"]
    save_file({"layer_0": torch.zeros(rows, D + 1), "layer_2": torch.zeros(rows, D + 1)}, str(shard))
    with pytest.raises(ValueError, match=f"{re.escape(str(shard))}.*\\[{rows}, {D}\\]"):
        CachedActivationStream(cache, **KW)


def test_21_13_shard_missing_a_layer_or_file_is_refused(cache):
    shard = cache / "shard_00001.safetensors"
    rows = load_cache_index(cache)["shards"][1]["tokens"]
    save_file({"layer_0": torch.zeros(rows, D)}, str(shard))
    with pytest.raises(ValueError, match=f"{re.escape(str(shard))}.*layer_2"):
        CachedActivationStream(cache, **KW)
    shard.unlink()
    with pytest.raises(ValueError, match=re.escape(str(shard))):
        CachedActivationStream(cache, **KW)


def test_21_13_truncated_shard_is_a_value_error_naming_it(cache):
    shard = cache / "shard_00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(shard))):
        list(read_cache(cache))
    with pytest.raises(ValueError, match=re.escape(str(shard))):
        CachedActivationStream(cache, **KW)
    shard.write_bytes(data[:5])  # not even a header length
    with pytest.raises(ValueError, match=re.escape(str(shard))):
        CachedActivationStream(cache, **KW)


# ---------------------------------------------------------------------------- 21.18: shard names stay inside
@pytest.mark.parametrize("name", ["../outside.safetensors", "ABSOLUTE", "sub/shard.safetensors", "..", ".", "",
                                  "a\\..\\b.safetensors"])
def test_21_18_shard_names_outside_the_cache_folder_are_refused(cache, tmp_path, name):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(cache / "shard_00000.safetensors", outside)
    (cache / "sub").mkdir()
    shutil.copy(cache / "shard_00000.safetensors", cache / "sub" / "shard.safetensors")
    name = str(outside) if name == "ABSOLUTE" else name
    _edit_index(cache, lambda ix: ix | {"shards": [ix["shards"][0] | {"file": name}] + ix["shards"][1:]})
    with pytest.raises(ValueError, match=f"^{re.escape(str(cache / 'index.json'))}.*plain file name"):
        load_cache_index(cache)
    with pytest.raises(ValueError, match=f"^{re.escape(str(cache / 'index.json'))}"):
        list(read_cache(cache))


def test_21_13_mutated_cache_files_raise_only_value_errors(cache):
    """Seeded byte flips, truncations and junk in the index and a shard: reading either works or raises a ValueError
    naming the damaged file, never another exception."""
    gen = torch.Generator().manual_seed(0)
    originals = {p: p.read_bytes() for p in (cache / "index.json", cache / "shard_00000.safetensors")}
    for trial in range(60):
        target, data = list(originals.items())[trial % 2]
        data = bytearray(data)
        kind = trial // 2 % 3
        if kind == 0:  # flip a few bytes (the index's text or the shard's header)
            for _ in range(3):
                i = int(torch.randint(0, min(len(data), 400), (1,), generator=gen))
                data[i] = int(torch.randint(0, 256, (1,), generator=gen))
        elif kind == 1:  # truncate
            data = data[: int(torch.randint(0, len(data), (1,), generator=gen))]
        else:  # insert junk
            i = int(torch.randint(0, len(data), (1,), generator=gen))
            data[i:i] = bytes(int(x) for x in torch.randint(0, 256, (8,), generator=gen))
        target.write_bytes(bytes(data))
        try:
            list(CachedActivationStream(cache, **KW))
        except ValueError as e:
            assert str(target) in str(e), (trial, str(e))
        finally:
            target.write_bytes(originals[target])
