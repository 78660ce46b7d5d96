"""Single-file durable writes and what every atomic write shares: file modes follow the umask, symlinked targets
are written through, temp names are unique (two writers do not clash), the parent folder is fsynced, and JSON
outputs never hold a bare NaN."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dlmscope.sae import formats
from dlmscope.sae.topk import TopKSAE
from dlmscope.util import atomic

FORMATS = sorted(formats.FORMATS)


def strict_json(path: Path):
    """The JSON of ``path`` read by a strict parser: NaN / Infinity are not JSON."""
    def refuse(name):
        raise ValueError(f"{path} holds {name}, which is not JSON")
    return json.loads(Path(path).read_text(), parse_constant=refuse)


def hidden_leftovers(*folders: Path) -> list[str]:
    return sorted(p.name for f in folders for p in f.iterdir() if p.name.startswith("."))


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after)."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


# ---- 21.15: modes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o002, 0o027])
def test_21_15_weights_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    want = 0o666 & ~mask
    sae = TopKSAE(8, 16, 4)
    for fmt in FORMATS:
        folder = sae.save(tmp_path / fmt, fmt)
        assert oct(os.stat(folder).st_mode & 0o777) == oct(0o777 & ~mask), fmt
        for f in folder.iterdir():
            assert oct(os.stat(f).st_mode & 0o777) == oct(want), f"{fmt}: {f.name}"
    atomic.save_safetensors(tmp_path / "w.safetensors", {"a": torch.zeros(2)})
    atomic.write_text(tmp_path / "t.txt", "x")
    atomic.write_json(tmp_path / "j.json", {"a": 1})
    for name in ("w.safetensors", "t.txt", "j.json"):
        assert oct(os.stat(tmp_path / name).st_mode & 0o777) == oct(want), name


# ---- 21.16: symlinks -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_21_16_save_to_a_symlinked_checkpoint_writes_through_the_link(tmp_path, fmt):
    real_parent, link_parent = tmp_path / "store", tmp_path / "runs"
    real_parent.mkdir()
    link_parent.mkdir()
    old, new = TopKSAE(8, 16, 4, generator=torch.Generator().manual_seed(0)), TopKSAE(8, 16, 4)
    old.save(real_parent / "sae", fmt)
    link = link_parent / "sae"
    link.symlink_to(real_parent / "sae", target_is_directory=True)
    assert new.save(link, fmt) == link
    assert link.is_symlink() and os.readlink(link) == str(real_parent / "sae")
    assert torch.equal(TopKSAE.load(real_parent / "sae").W_dec, new.W_dec)
    assert hidden_leftovers(real_parent, link_parent) == []


def test_21_16_single_file_writes_go_through_a_symlink(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "report.json"
    target.write_text("{}\n")
    link = tmp_path / "report.json"
    link.symlink_to(target)
    atomic.write_json(link, {"a": 1})
    atomic.save_safetensors(tmp_path / "w.safetensors", {"a": torch.ones(2)})
    (tmp_path / "w2.safetensors").symlink_to(tmp_path / "real" / "w.safetensors")
    atomic.save_safetensors(tmp_path / "w2.safetensors", {"a": torch.zeros(3)})
    assert link.is_symlink() and json.loads(target.read_text()) == {"a": 1}
    assert (tmp_path / "w2.safetensors").is_symlink()
    assert torch.equal(load_file(tmp_path / "real" / "w.safetensors")["a"], torch.zeros(3))
    assert hidden_leftovers(tmp_path, tmp_path / "real") == []


# ---- 21.19: unique temp names, the parent fsynced ------------------------------------------------------------


def test_21_19_another_writers_temp_file_is_left_alone(tmp_path):
    target = tmp_path / "summary.json"
    stale = tmp_path / ".summary.json.tmp"  # another writer's temp file, by the name a fixed scheme would pick
    stale.write_text("another writer's bytes")
    atomic.write_json(target, {"a": 1})
    assert stale.read_text() == "another writer's bytes"
    assert json.loads(target.read_text()) == {"a": 1}


def test_21_19_two_writers_of_one_file_do_not_clash(tmp_path, monkeypatch):
    target = tmp_path / "w.safetensors"
    real_save = atomic.save_file
    calls = []

    def save_then_let_another_writer_in(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        calls.append(path)
        if len(calls) == 1:  # a second writer writes the same target while the first is between write and rename
            atomic.save_safetensors(target, {"a": torch.full((2,), 2.0)})

    monkeypatch.setattr(atomic, "save_file", save_then_let_another_writer_in)
    atomic.save_safetensors(target, {"a": torch.full((2,), 1.0)})
    assert calls[0] != calls[1]
    assert torch.equal(load_file(target)["a"], torch.full((2,), 1.0))  # the last rename wins, whole
    assert hidden_leftovers(tmp_path) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fsynced fds through /proc/self/fd")
@pytest.mark.parametrize("writer", ["text", "json", "safetensors"])
def test_21_19_durable_writes_fsync_the_file_then_its_folder(tmp_path, monkeypatch, writer):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    target = tmp_path / "out"
    {"text": lambda: atomic.write_text(target, "x"), "json": lambda: atomic.write_json(target, [1]),
     "safetensors": lambda: atomic.save_safetensors(target, {"a": torch.zeros(1)})}[writer]()
    assert synced and synced[-1] == str(tmp_path), synced
    assert any(Path(p).parent == tmp_path and Path(p).name.startswith(".out") for p in synced[:-1]), synced


# ---- 21.11: no bare NaN ---------------------------------------------------------------------------------------


def test_21_11_write_json_writes_null_for_non_finite_floats(tmp_path):
    obj = {"a": math.nan, "b": [math.inf, -math.inf, 1.5, (2, math.nan)], "c": {"d": math.nan, "e": "NaN"}, "f": 3}
    atomic.write_json(tmp_path / "r.json", obj)
    assert strict_json(tmp_path / "r.json") == {"a": None, "b": [None, None, 1.5, [2, None]],
                                                 "c": {"d": None, "e": "NaN"}, "f": 3}
    assert obj["a"] != obj["a"]  # the caller's data is not changed
    with pytest.raises(TypeError, match="r2.json"):
        atomic.write_json(tmp_path / "r2.json", obj, allow_nan=False)
    assert not (tmp_path / "r2.json").exists()
