"""Checkpoint formats: real peer files load and reproduce the peers' outputs, exact round trips in every format,
atomic writes, clear errors for bad checkpoints, and (when the peer libraries are importable) export -> peer load.

The peer check needs eai-sparsify / sae-lens / dictionary-learning. They are not project dependencies: run it with
``DLMSCOPE_PEER_PYTHON=/path/to/venv/bin/python pytest tests/sae/test_formats.py`` (see
tests/fixtures/make_interop_fixtures.py for that venv), or from an environment where they are importable.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dlmscope.util import atomic

from dlmscope.sae import formats
from dlmscope.sae.topk import TopKSAE
from tests.helpers.peers import run_peer
from tests.helpers.saes import perturbed_sae

FIXTURES = Path(__file__).parents[1] / "fixtures" / "interop"
D, N, K = 16, 64, 4
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")

FIXTURE_DIRS = {
    "dictionary_learning": FIXTURES / "dictionary_learning" / "resid_post_layer_3" / "trainer_0",
    "sparsify": FIXTURES / "sparsify" / "layers.3",
    "saelens": FIXTURES / "saelens" / "topk",
    "saelens_rescaled": FIXTURES / "saelens" / "topk_rescaled",
    "saelens_legacy": FIXTURES / "saelens" / "legacy_pre6",
}


def make_sae(dtype=torch.float32, meta=None, seed=0) -> TopKSAE:
    """The shared perturbed SAE, with this file's default meta (``meta={}`` for none)."""
    return perturbed_sae(dtype, meta=meta if meta is not None else {"layer": 3, "policy": "mask", "norm": 1.5},
                         seed=seed)


def save(sae: TopKSAE, path, format: str = "dlmscope") -> Path:
    """formats.save of the SAE's state."""
    return formats.save(*sae.state(), path, format=format)


def load(path) -> TopKSAE:
    """The SAE built from formats.load."""
    return TopKSAE.from_state(*formats.load(path))


def assert_same_sae(a: TopKSAE, b: TopKSAE) -> None:
    assert a.cfg == b.cfg
    for name in PARAMS:
        pa, pb = getattr(a, name), getattr(b, name)
        assert pa.dtype == pb.dtype, name
        assert torch.equal(pa, pb), name  # bitwise
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(99)).to(a.W_enc.dtype)
    assert torch.equal(a(x), b(x))
    assert torch.equal(a.encode_dense(x), b.encode_dense(x))


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if atomic.TMP_MARKER in p.name or atomic.OLD_MARKER in p.name)


# ---- real peer checkpoints ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FIXTURE_DIRS))
def test_peer_fixture_reproduces_the_peer_outputs(name):
    path = FIXTURE_DIRS[name]
    fmt = name.split("_")[0] if name.startswith("saelens") else name
    assert formats.detect_format(path) == fmt
    sae = load(path)
    assert (sae.d, sae.n, sae.k) == (D, N, K)
    assert sae.cfg.meta["source"]["format"] == fmt
    expected = load_file(str(path / "expected.safetensors"))
    x = expected["x"]
    torch.testing.assert_close(sae.encode_dense(x), expected["f"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x), expected["x_hat"], rtol=1e-5, atol=1e-5)


def test_peer_fixture_provenance():
    dl = load(FIXTURE_DIRS["dictionary_learning"])
    source = dl.cfg.meta["source"]
    assert source["cfg"]["trainer"]["lm_name"] == "tiny-dlm" and source["cfg"]["trainer"]["layer"] == 3
    assert source["threshold"] == pytest.approx(0.05)
    rescaled = load(FIXTURE_DIRS["saelens_rescaled"])
    assert rescaled.cfg.meta["source"]["folded"] == ["apply_b_dec_to_input=false", "rescale_acts_by_decoder_norm=true"]
    torch.testing.assert_close(rescaled.W_dec.norm(dim=1), torch.ones(N))  # the norms were folded into the encoder
    legacy = load(FIXTURE_DIRS["saelens_legacy"])
    assert legacy.cfg.meta["source"]["cfg"]["activation_fn_kwargs"] == {"k": K}


def test_a_checkpoint_file_path_stands_for_its_directory():
    path = FIXTURE_DIRS["dictionary_learning"] / "ae.pt"
    assert formats.detect_format(path) == "dictionary_learning"
    assert_same_sae(load(path), load(path.parent))


def _tensors(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    if fmt == "dictionary_learning":
        return torch.load(path / "ae.pt", weights_only=True)
    return load_file(str(path / ("sae_weights.safetensors" if fmt == "saelens" else "sae.safetensors")))


def _cfg(path: Path, fmt: str) -> dict:
    return json.loads((path / ("config.json" if fmt == "dictionary_learning" else "cfg.json")).read_text())


@pytest.mark.parametrize("name", ["dictionary_learning", "sparsify", "saelens"])
def test_peer_file_reexports_to_the_same_files(tmp_path, name):
    """load(peer file) -> save(same format) reproduces the peer's tensors bitwise and its config fields."""
    src = FIXTURE_DIRS[name]
    sae = load(src)
    out = save(sae, tmp_path / name, format=name)
    a, b = _tensors(src, name), _tensors(out, name)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert _cfg(out, name) == _cfg(src, name)
    assert_same_sae(load(out), sae)


def test_legacy_saelens_file_reexports_in_the_v6_layout(tmp_path):
    sae = load(FIXTURE_DIRS["saelens_legacy"])
    out = save(sae, tmp_path / "v6", format="saelens")
    cfg = _cfg(out, "saelens")
    assert cfg["architecture"] == "topk" and cfg["k"] == K
    assert cfg["metadata"]["model_name"] == "tiny-dlm" and cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert "activation_fn_kwargs" not in cfg
    again = load(out)
    for name in PARAMS:
        assert torch.equal(getattr(again, name), getattr(sae, name))


# ---- round trips ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
def test_round_trip_is_exact(tmp_path, fmt, dtype):
    sae = make_sae(dtype)
    out = save(sae, tmp_path / "ckpt", format=fmt)
    assert formats.detect_format(out) == fmt
    assert_same_sae(load(out), sae)


@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
def test_round_trip_with_empty_meta(tmp_path, fmt):
    sae = make_sae(meta={})
    assert_same_sae(load(save(sae, tmp_path / "ckpt", format=fmt)), sae)


def test_chain_through_every_format_is_exact(tmp_path):
    sae = make_sae()
    current = sae
    for i, fmt in enumerate(["dictionary_learning", "sparsify", "saelens", "dlmscope", "saelens", "sparsify",
                             "dictionary_learning", "dlmscope"]):
        current = load(save(current, tmp_path / f"{i}_{fmt}", format=fmt))
    assert_same_sae(current, sae)


def test_peer_provenance_survives_other_formats(tmp_path):
    sae = load(FIXTURE_DIRS["sparsify"])
    via = load(save(sae, tmp_path / "ours", format="dlmscope"))
    via = load(save(via, tmp_path / "dl", format="dictionary_learning"))
    assert_same_sae(via, sae)
    back = save(via, tmp_path / "sparsify", format="sparsify")
    assert _cfg(back, "sparsify") == _cfg(FIXTURE_DIRS["sparsify"], "sparsify")


def test_dlmscope_files(tmp_path):
    sae = make_sae()
    out = save(sae, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae.safetensors"]
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg == {"format": "dlmscope", "version": 1, "d": D, "n": N, "k": K, "meta": sae.cfg.meta}
    tensors = load_file(str(out / "sae.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"W_enc": (N, D), "b_enc": (N,), "W_dec": (N, D),
                                                               "b_dec": (D,)}


def test_save_accepts_aliases_and_rejects_unknown_formats(tmp_path):
    sae = make_sae()
    assert formats.detect_format(save(sae, tmp_path / "a", format="sae_lens")) == "saelens"
    with pytest.raises(ValueError, match=r"unknown checkpoint format 'onnx'; known: \['dictionary_learning', "):
        save(sae, tmp_path / "b", format="onnx")
    assert not (tmp_path / "b").exists()


def test_save_from_a_parameter_that_requires_grad_and_lives_in_a_wider_graph(tmp_path):
    sae = make_sae()
    sae(torch.randn(3, D)).sum().backward()
    assert_same_sae(load(save(sae, tmp_path / "g")), sae)


# ---- atomic writes --------------------------------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


def _raise(*args, **kwargs):
    raise Boom("simulated failure mid-save")


@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
@pytest.mark.parametrize("where", ["weights", "config"])
def test_failed_overwrite_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fmt, where):
    old = make_sae(seed=1)
    target = save(old, tmp_path / "ckpt", format="dlmscope")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    if where == "weights":
        if fmt == "dictionary_learning":
            monkeypatch.setattr(torch, "save", _raise)
        else:
            monkeypatch.setattr("dlmscope.sae.formats._checks.save_file", _raise)
    else:  # the weights are already written when the config write fails
        monkeypatch.setattr("dlmscope.util.atomic.write_json", _raise)
    with pytest.raises(Boom):
        save(make_sae(seed=2), target, format=fmt)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert_same_sae(load(target), old)
    assert leftovers(tmp_path) == []


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr("dlmscope.sae.formats._checks.save_file", _raise)
    with pytest.raises(Boom):
        save(make_sae(), tmp_path / "new" / "ckpt")
    assert not (tmp_path / "new" / "ckpt").exists()
    assert leftovers(tmp_path / "new") == []


def test_non_json_meta_fails_before_touching_the_target(tmp_path):
    target = save(make_sae(seed=1), tmp_path / "ckpt")
    bad = make_sae(meta={"tensor": torch.ones(1)})
    with pytest.raises(TypeError, match=r"not plain JSON"):
        save(bad, target)
    assert_same_sae(load(target), make_sae(seed=1))
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("exchange", ["renameat2", "rename-aside"])
def test_overwrite_replaces_the_whole_directory(tmp_path, monkeypatch, exchange):
    if exchange == "rename-aside":
        monkeypatch.setattr(atomic, "_exchange", None)
    target = save(make_sae(seed=1), tmp_path / "ckpt", format="dictionary_learning")
    new = make_sae(seed=2)
    save(new, target, format="saelens")
    assert sorted(p.name for p in target.iterdir()) == ["cfg.json", "sae_weights.safetensors"]  # no stale ae.pt
    assert_same_sae(load(target), new)
    assert leftovers(tmp_path) == []


def test_rename_aside_puts_the_old_checkpoint_back_when_the_final_rename_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", None)
    old = make_sae(seed=1)
    target = save(old, tmp_path / "ckpt")
    real_rename = os.rename

    def flaky_rename(src, dst):
        if Path(dst) == target and atomic.TMP_MARKER in Path(src).name:
            raise OSError("simulated failure of the final rename")
        return real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", flaky_rename)
    with pytest.raises(OSError, match="simulated"):
        save(make_sae(seed=2), target)
    monkeypatch.undo()
    assert_same_sae(load(target), old)
    assert leftovers(tmp_path) == []


def test_fallback_overwrite_stopped_between_its_renames_is_rolled_back_on_load(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", None)
    old = make_sae(seed=1)
    target = save(old, tmp_path / "ckpt")

    def stop(point):
        if point == "old-aside":
            raise Boom("stopped with the old checkpoint renamed aside")

    monkeypatch.setattr(atomic, "hook", stop)
    with pytest.raises(Boom):
        save(make_sae(seed=2), target)
    monkeypatch.setattr(atomic, "hook", None)
    assert not target.exists() and leftovers(tmp_path) == [".ckpt" + atomic.OLD_MARKER]
    assert_same_sae(load(target), old)  # the reader puts the old checkpoint back
    assert leftovers(tmp_path) == []
    new = make_sae(seed=3)
    stale = tmp_path / f".ckpt{atomic.OLD_MARKER}"
    stale.mkdir()  # a stale .old beside an existing target is replaced, never restored
    assert_same_sae(load(save(new, target)), new)
    assert leftovers(tmp_path) == []


def test_config_json_keeps_field_order_and_layout(tmp_path):
    out = save(make_sae(meta={"z": 1, "a": [1, 2]}), tmp_path / "ckpt")
    text = (out / "cfg.json").read_text()
    assert text == json.dumps({"format": "dlmscope", "version": 1, "d": D, "n": N, "k": K,
                               "meta": {"z": 1, "a": [1, 2]}}, indent=2) + "\n"


def test_atomic_directory_creates_parents_and_respects_the_umask(tmp_path):
    target = tmp_path / "a" / "b" / "ckpt"
    with atomic.atomic_directory(target) as tmp:
        (tmp / "f.txt").write_text("x")
        assert not target.exists()
    assert (target / "f.txt").read_text() == "x"
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == (0o777 & ~umask)


def test_save_refuses_to_replace_an_unrelated_directory(tmp_path):
    victim = tmp_path / "important"
    victim.mkdir()
    (victim / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"not an SAE checkpoint; refusing to replace it"):
        save(make_sae(), victim)
    assert (victim / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    save(make_sae(), empty)  # an empty directory is fine
    assert formats.detect_format(empty) == "dlmscope"


def test_save_refuses_to_replace_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match=r"is not a directory"):
        save(make_sae(), tmp_path / "f")
    assert (tmp_path / "f").read_text() == "x"


def test_save_rejects_non_finite_weights_and_wrong_objects(tmp_path):
    sae = make_sae()
    with torch.no_grad():
        sae.W_dec[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"cannot save: W_dec holds non-finite values"):
        save(sae, tmp_path / "x")
    with pytest.raises(TypeError, match=r"save expects a TopKSAE"):
        formats.save(torch.nn.Linear(2, 2), {}, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_save_rejects_wrong_shapes_and_missing_tensors_with_the_shared_check(tmp_path):
    cfg, tensors = make_sae().state()
    bad = {**tensors, "W_dec": tensors["W_dec"][:, :8]}
    with pytest.raises(ValueError, match=r"^cannot save: W_dec has shape \[64, 8\], the SAE's cfg \(d=16, n=64\) "
                                         r"needs \[64, 16\]$"):
        formats.save(cfg, bad, tmp_path / "x")
    with pytest.raises(ValueError, match=r"^cannot save: b_dec has shape \[15\]"):
        formats.check_state(cfg, {**tensors, "b_dec": tensors["b_dec"][:15]})
    with pytest.raises(ValueError, match=r"^cannot save: missing tensor 'b_enc'"):
        formats.check_state(cfg, {k: v for k, v in tensors.items() if k != "b_enc"})
    formats.check_state(cfg, tensors)
    assert not (tmp_path / "x").exists()


def _hidden(parent: Path, name: str) -> Path:
    path = parent / name
    path.mkdir()
    (path / "junk").write_text("x")
    return path


@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
def test_save_sweeps_the_leftovers_of_its_target_only(tmp_path, fmt):
    target = save(make_sae(seed=1), tmp_path / "ckpt", format=fmt)
    ours = [_hidden(tmp_path, f".ckpt{atomic.TMP_MARKER}0123456789ab"),
            _hidden(tmp_path, f".ckpt{atomic.TMP_MARKER}ba9876543210"),
            _hidden(tmp_path, f".ckpt{atomic.OLD_MARKER}")]
    assert all(atomic.is_leftover(p) and atomic.leftover_target(p) == "ckpt" for p in ours)
    others = [_hidden(tmp_path, f".ckpt2{atomic.TMP_MARKER}0123456789ab"),  # other targets'
              _hidden(tmp_path, f".other{atomic.OLD_MARKER}"),
              _hidden(tmp_path, f".ckpt{atomic.TMP_MARKER}not-ours"),  # not names atomic makes
              _hidden(tmp_path, ".ckpt.tmp")]
    new = make_sae(seed=2)
    save(new, target, format=fmt)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", *(p.name for p in others)])
    assert_same_sae(load(target), new)


def test_a_first_save_sweeps_what_a_crashed_first_save_left(tmp_path):
    crashed = _hidden(tmp_path, f".ckpt{atomic.TMP_MARKER}0123456789ab")  # killed before its directory was put in place
    (crashed / "sae.safetensors").write_bytes(b"partial")
    sae = make_sae()
    save(sae, tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert_same_sae(load(tmp_path / "ckpt"), sae)


@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
def test_files_inside_the_atomic_directory_are_written_plainly(tmp_path, monkeypatch, fmt):
    """No per-file temp + fsync + rename inside the directory (atomic_directory fsyncs the tree as a whole); the JSON
    keeps its layout: 2-space indent, the dict's order, a final newline."""

    def no_per_file_write(path):
        raise AssertionError(f"per-file durable write of {path} inside an atomic directory")

    monkeypatch.setattr(atomic, "_replacing", no_per_file_write)
    sae = make_sae(seed=1, meta={"z": [1.5], "a": {"b": None}})
    target = save(sae, tmp_path / "ckpt", format=fmt)
    for file in target.glob("*.json"):
        text = file.read_text(encoding="utf-8")
        assert text == json.dumps(json.loads(text), indent=2) + "\n", file.name
    assert_same_sae(load(target), sae)


def test_plain_and_durable_json_writes_give_the_same_bytes(tmp_path):
    obj = {"z": 1, "a": [1.5, None, "é"], "m": {"y": True, "b": float("inf")}}
    for kwargs in ({"sort_keys": True}, {"sort_keys": False}):
        atomic.write_json(tmp_path / "durable.json", obj, **kwargs)
        atomic.write_json(tmp_path / "plain.json", obj, durable=False, **kwargs)
        assert (tmp_path / "plain.json").read_bytes() == (tmp_path / "durable.json").read_bytes()
        want = json.dumps(atomic.nan_to_null(obj), indent=2, **kwargs) + "\n"  # inf is written as null
        assert (tmp_path / "plain.json").read_text(encoding="utf-8") == want
    with pytest.raises(TypeError, match=r"cannot write x.json: the data is not plain JSON"):
        atomic.write_json(tmp_path / "x.json", {"nan": float("nan")}, allow_nan=False, durable=False)
    assert not (tmp_path / "x.json").exists()


# ---- detection and validation errors -------------------------------------------------------------------------------


def test_missing_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load(tmp_path / "nope")


def test_unknown_directory_names_path_and_files(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\0")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError) as info:
        formats.detect_format(tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg and "['model.bin', 'notes.txt']" in msg and "not a recognised SAE checkpoint" in msg
    assert "sae_weights.safetensors" in msg  # it says what it expected


def test_empty_directory_is_unknown(tmp_path):
    with pytest.raises(ValueError, match=r"found files \[\]"):
        load(tmp_path)


def test_a_run_directory_points_at_its_hookpoints(tmp_path):
    save(make_sae(), tmp_path / "run" / "layers.3", format="sparsify")
    save(make_sae(), tmp_path / "run" / "layers.5", format="sparsify")
    with pytest.raises(ValueError, match=r"subdirectories \['layers.3', 'layers.5'\] look like checkpoints: pass one"):
        load(tmp_path / "run")


def test_ambiguous_directory(tmp_path):
    out = save(make_sae(), tmp_path / "a", format="saelens")
    (out / "ae.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"ambiguous SAE checkpoint.*\['saelens', 'dictionary_learning'\]"):
        load(out)


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _edit_tensors(path: Path, fn) -> None:
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def _edit_state(path: Path, fn) -> None:
    state = torch.load(path, weights_only=True)
    fn(state)
    torch.save(state, path)


def _set(d, key, value):
    d[key] = value


def _nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


CORRUPTIONS = {
    # dlmscope
    "dlmscope: corrupt cfg": ("dlmscope", lambda p: (p / "cfg.json").write_text('{"format": "dlmscope", '),
                              r"cfg.json: corrupt JSON config"),
    "dlmscope: cfg not an object": ("dlmscope", lambda p: (p / "cfg.json").write_text("[1, 2]"),
                                    r"cfg.json: config must be a JSON object"),
    "dlmscope: missing weights": ("dlmscope", lambda p: (p / "sae.safetensors").unlink(),
                                  r"sae.safetensors: missing weights file \(the checkpoint directory holds "
                                  r"\['cfg.json'\]\)"),
    "dlmscope: corrupt weights": ("dlmscope", lambda p: (p / "sae.safetensors").write_bytes(b"garbage" * 10),
                                  r"sae.safetensors: corrupt safetensors file"),
    "dlmscope: missing tensor": ("dlmscope", lambda p: _edit_tensors(p / "sae.safetensors", lambda t: t.pop("b_enc")),
                                 r"sae.safetensors: missing tensor\(s\) \['b_enc'\]"),
    "dlmscope: extra tensor": ("dlmscope", lambda p: _edit_tensors(p / "sae.safetensors",
                                                                  lambda t: _set(t, "W_skip", torch.zeros(2))),
                               r"unexpected tensor\(s\) \['W_skip'\]"),
    "dlmscope: shape vs cfg": ("dlmscope", lambda p: _edit_json(p / "cfg.json", lambda c: _set(c, "n", 32)),
                               r"sae.safetensors: tensor 'W_enc' has shape \[64, 16\], expected \[32, 16\]"),
    "dlmscope: k > n": ("dlmscope", lambda p: _edit_json(p / "cfg.json", lambda c: _set(c, "k", 65)),
                        r"cfg.json: .*k must be <= n"),
    "dlmscope: k missing": ("dlmscope", lambda p: _edit_json(p / "cfg.json", lambda c: c.pop("k")),
                            r"cfg.json: config lacks field 'k'"),
    "dlmscope: k not int": ("dlmscope", lambda p: _edit_json(p / "cfg.json", lambda c: _set(c, "k", "4")),
                            r"cfg.json: config field 'k' must be a positive integer, got '4'"),
    "dlmscope: version": ("dlmscope", lambda p: _edit_json(p / "cfg.json", lambda c: _set(c, "version", 2)),
                          r"unsupported dlmscope format version 2"),
    "dlmscope: unknown field": ("dlmscope", lambda p: _edit_json(p / "cfg.json", lambda c: _set(c, "bogus", 1)),
                                r"cfg.json: unknown SAEConfig fields \['bogus'\]"),
    "dlmscope: NaN weight": ("dlmscope", lambda p: _edit_tensors(p / "sae.safetensors",
                                                                lambda t: _set(t, "W_dec", _nan(t["W_dec"]))),
                             r"sae.safetensors: tensor 'W_dec' has 1 non-finite value"),
    "dlmscope: int weight": ("dlmscope", lambda p: _edit_tensors(p / "sae.safetensors",
                                                                lambda t: _set(t, "b_dec", t["b_dec"].long())),
                             r"tensor 'b_dec' must be float32/float64/bfloat16/float16, got torch.int64"),
    # sparsify
    "sparsify: groupmax": ("sparsify", lambda p: _edit_json(p / "cfg.json",
                                                           lambda c: _set(c, "activation", "groupmax")),
                           r"cfg.json: activation='groupmax' is not supported"),
    "sparsify: transcoder": ("sparsify", lambda p: _edit_json(p / "cfg.json", lambda c: _set(c, "transcode", True)),
                             r"cfg.json: transcode=true is not supported"),
    "sparsify: skip": ("sparsify", lambda p: _edit_tensors(p / "sae.safetensors",
                                                          lambda t: _set(t, "W_skip", torch.zeros(D, D))),
                       r"holds 'W_skip'"),
    "sparsify: d_in mismatch": ("sparsify", lambda p: _edit_json(p / "cfg.json", lambda c: _set(c, "d_in", 8)),
                                r"sae.safetensors: tensor 'encoder.weight' has shape \[64, 16\], expected \[64, 8\]"),
    "sparsify: missing W_dec": ("sparsify", lambda p: _edit_tensors(p / "sae.safetensors", lambda t: t.pop("W_dec")),
                                r"sae.safetensors: missing tensor\(s\) \['W_dec'\]"),
    "sparsify: k > n": ("sparsify", lambda p: _edit_json(p / "cfg.json", lambda c: _set(c, "k", 100)),
                        r"cfg.json: k=100 exceeds the number of latents n=64"),
    # saelens
    "saelens: jumprelu": ("saelens", lambda p: _edit_json(p / "cfg.json",
                                                         lambda c: _set(c, "architecture", "jumprelu")),
                          r"cfg.json: SAELens architecture 'jumprelu' is not a Top-K SAE"),
    "saelens: normalisation": ("saelens", lambda p: _edit_json(p / "cfg.json", lambda c: _set(
        c, "normalize_activations", "expected_average_only_in")), r"normalize_activations='expected_average_only_in'"),
    "saelens: transposed W_enc": ("saelens", lambda p: _edit_tensors(
        p / "sae_weights.safetensors", lambda t: _set(t, "W_enc", t["W_enc"].T.contiguous())),
        r"sae_weights.safetensors: tensor 'W_enc' has shape \[64, 16\], expected \[16, 64\]"),
    "saelens: bad dtype": ("saelens", lambda p: _edit_json(p / "cfg.json", lambda c: _set(c, "dtype", "int8")),
                           r"unsupported dtype 'int8'"),
    "saelens: missing cfg": ("saelens", lambda p: (p / "cfg.json").unlink(), r"cfg.json: missing config file"),
    # dictionary_learning
    "dl: gated": ("dictionary_learning", lambda p: _edit_json(
        p / "config.json", lambda c: c["trainer"].update(dict_class="GatedAutoEncoder")),
        r"config.json: dict_class 'GatedAutoEncoder' is not supported"),
    "dl: k disagrees": ("dictionary_learning", lambda p: _edit_json(
        p / "config.json", lambda c: c["trainer"].update(k=8)),
        r"ae.pt: buffer k=4 disagrees with config.json trainer.k=8"),
    "dl: dict_size disagrees": ("dictionary_learning", lambda p: _edit_json(
        p / "config.json", lambda c: c["trainer"].update(dict_size=128)),
        r"ae.pt: tensor 'encoder.weight' has shape \[64, 16\] but config.json says dict_size=128"),
    "dl: decoder not transposed": ("dictionary_learning", lambda p: _edit_state(
        p / "ae.pt", lambda s: _set(s, "decoder.weight", s["decoder.weight"].T.contiguous())),
        r"ae.pt: tensor 'decoder.weight' has shape \[64, 16\], expected \[16, 64\]"),
    "dl: k > n": ("dictionary_learning", lambda p: (_edit_state(p / "ae.pt", lambda s: _set(s, "k", torch.tensor(65))),
                                                    _edit_json(p / "config.json", lambda c: c["trainer"].update(k=65))),
                  r"ae.pt: k=65 exceeds the number of latents n=64"),
    "dl: missing encoder bias": ("dictionary_learning", lambda p: _edit_state(p / "ae.pt",
                                                                             lambda s: s.pop("encoder.bias")),
                                 r"ae.pt: missing tensor\(s\) \['encoder.bias'\]"),
    "dl: inf bias": ("dictionary_learning", lambda p: _edit_state(
        p / "ae.pt", lambda s: _set(s, "b_dec", torch.full_like(s["b_dec"], float("inf")))),
        r"ae.pt: tensor 'b_dec' has 16 non-finite value"),
    "dl: garbage ae.pt": ("dictionary_learning", lambda p: (p / "ae.pt").write_bytes(b"not a checkpoint"),
                          r"ae.pt: cannot read torch checkpoint"),
    "dl: pickled object": ("dictionary_learning", lambda p: torch.save({"encoder": torch.nn.Linear(2, 2)}, p / "ae.pt"),
                           r"ae.pt: cannot read torch checkpoint"),
    "dl: corrupt config": ("dictionary_learning", lambda p: (p / "config.json").write_text("{"),
                           r"config.json: corrupt JSON config"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_bad_checkpoints_raise_clear_errors(tmp_path, case):
    fmt, corrupt, pattern = CORRUPTIONS[case]
    path = save(make_sae(), tmp_path / "ckpt", format=fmt)
    corrupt(path)
    with pytest.raises(ValueError, match=pattern) as info:
        load(path)
    assert str(path) in str(info.value)  # the message names the file


def test_corrupt_cfg_without_other_markers_is_reported_as_corrupt(tmp_path):
    (tmp_path / "cfg.json").write_text("{oops")
    (tmp_path / "sae.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"cfg.json: corrupt JSON config"):
        formats.detect_format(tmp_path)


def test_dictionary_learning_without_config_uses_the_k_buffer(tmp_path):
    sae = make_sae()
    path = save(sae, tmp_path / "ckpt", format="dictionary_learning")
    (path / "config.json").unlink()
    loaded = load(path)
    for name in PARAMS:
        assert torch.equal(getattr(loaded, name), getattr(sae, name))
    assert loaded.k == K


# ---- export -> the peer libraries themselves (optional) ------------------------------------------------------------

_PEER_MODULES = {"sparsify": "sparsify", "saelens": "sae_lens", "dictionary_learning": "dictionary_learning"}

_PEER_BODY = """
if case == "sparsify":
    from sparsify import SparseCoder
    sae = SparseCoder.load_from_disk(path)
    acts, idx, _ = sae.encode(x)
    x_hat = sae.decode(acts, idx)
    f = torch.zeros(x.shape[0], sae.num_latents).scatter_(-1, idx, acts)
elif case == "saelens":
    from sae_lens import SAE
    sae = SAE.load_from_disk(path)
    f = sae.encode(x)
    x_hat = sae.decode(f)
else:
    from dictionary_learning.utils import load_dictionary
    sae, _config = load_dictionary(str(path), device="cpu")
    x_hat, f = sae(x, output_features=True)
out, name = {"x_hat": x_hat, "f": f}, "ok"
"""



def _peer_python() -> tuple[str | None, list[str]]:
    """(python executable that has the peer libraries, the formats whose library it has)."""
    env = os.environ.get("DLMSCOPE_PEER_PYTHON")
    if env:
        code = ("import importlib.util, json; print(json.dumps([m for m in %r if importlib.util.find_spec(m)]))"
                % list(_PEER_MODULES.values()))
        found = json.loads(subprocess.run([env, "-c", code], capture_output=True, text=True, check=True).stdout)
        return env, [fmt for fmt, mod in _PEER_MODULES.items() if mod in found]
    here = [fmt for fmt, mod in _PEER_MODULES.items() if importlib.util.find_spec(mod) is not None]
    return (sys.executable if here else None), here


@pytest.fixture(scope="module")
def peer_outputs(tmp_path_factory):
    python, available = _peer_python()
    if python is None:
        pytest.skip("no peer SAE library importable (eai-sparsify, sae-lens, dictionary-learning); set "
                    "DLMSCOPE_PEER_PYTHON to a python that has them")
    root = tmp_path_factory.mktemp("peer_export")
    sae = make_sae(meta={"layer": 3, "note": "exported by dlmscope"})  # meta travels as an extra cfg key
    x = torch.randn(8, D, generator=torch.Generator().manual_seed(5)) * 2
    save_file({"x": x}, str(root / "x.safetensors"))
    for fmt in available:
        save(sae, root / fmt, format=fmt)
    report = run_peer(python, root, _PEER_BODY, available, timeout=300)
    return sae, x, root, available, report


@pytest.mark.parametrize("fmt", sorted(_PEER_MODULES))
def test_exported_checkpoint_loads_in_the_peer_library(peer_outputs, fmt):
    sae, x, root, available, report = peer_outputs
    if fmt not in available:
        pytest.skip(f"{_PEER_MODULES[fmt]} is not importable by the peer python")
    assert report[fmt] == "ok", report[fmt]
    out = load_file(str(root / f"{fmt}.out.safetensors"))
    torch.testing.assert_close(out["f"], sae.encode_dense(x).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["x_hat"], sae(x).detach(), rtol=1e-5, atol=1e-5)
