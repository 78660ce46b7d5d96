"""A save replaces its target directory as a whole, so it must never replace a directory holding anything a
checkpoint format does not write: such a save is refused before anything is written, and every file stays."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from dlmscope.sae import formats
from dlmscope.sae.topk import TopKSAE
from dlmscope.util import atomic

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every entry under ``root`` (hidden ones included): relative path -> file bytes (None for a directory)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = Path(p).read_bytes()
    return out


def sae(seed: int = 0) -> TopKSAE:
    torch.manual_seed(seed)
    return TopKSAE(8, 16, 4)


def assert_same(a: TopKSAE, b: TopKSAE) -> None:
    assert a.cfg == b.cfg
    for name in PARAMS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def no_leftovers(parent: Path) -> bool:
    return not any(atomic.is_leftover(p) for p in parent.iterdir())


def test_save_never_deletes_foreign_files_beside_an_empty_checkpoint_name(tmp_path):
    folder = tmp_path / "home"
    (folder / "thesis").mkdir(parents=True)
    (folder / "thesis" / "a.txt").write_text("chapter 1")
    (folder / ".ssh").mkdir()
    (folder / ".ssh" / "id").write_bytes(b"secret key")
    (folder / "notes.txt").write_text("keep me")
    (folder / "ae.pt").write_bytes(b"")
    before = snapshot(folder)
    with pytest.raises(FileExistsError) as err:
        sae().save(folder)
    msg = str(err.value)
    assert str(folder) in msg
    assert "notes.txt" in msg and "thesis" in msg and ".ssh" in msg
    assert "new or empty" in msg
    assert snapshot(folder) == before
    assert no_leftovers(tmp_path)


@pytest.mark.parametrize("fmt", ["dlmscope", "dictionary_learning", "sparsify", "saelens"])
def test_save_never_deletes_foreign_files_beside_a_real_checkpoint(tmp_path, fmt):
    ckpt = sae(seed=1).save(tmp_path / "ckpt", fmt)
    (ckpt / "eval_results.json").write_text('{"fvu": 0.1}\n')
    (ckpt / "notebooks").mkdir()
    (ckpt / "notebooks" / "x.ipynb").write_text("{}")
    before = snapshot(ckpt)
    original = TopKSAE.load(ckpt)
    with pytest.raises(FileExistsError, match=r"eval_results\.json") as err:
        TopKSAE.load(ckpt).save(ckpt, "dlmscope")
    assert "notebooks" in str(err.value)
    assert snapshot(ckpt) == before
    assert_same(TopKSAE.load(ckpt), original)
    assert no_leftovers(tmp_path)


def test_save_refuses_a_hidden_foreign_file_too(tmp_path):
    ckpt = sae().save(tmp_path / "ckpt")
    (ckpt / ".git").mkdir()
    before = snapshot(ckpt)
    with pytest.raises(FileExistsError, match=r"\.git"):
        sae(seed=2).save(ckpt)
    assert snapshot(ckpt) == before


@pytest.mark.parametrize("old,new", [("dictionary_learning", "dlmscope"), ("dlmscope", "saelens"),
                                     ("saelens", "sparsify"), ("sparsify", "dictionary_learning")])
def test_save_over_a_checkpoint_of_another_format_still_replaces_it(tmp_path, old, new):
    target = sae(seed=1).save(tmp_path / "ckpt", old)
    fresh = sae(seed=2)
    assert fresh.save(target, new) == target
    assert formats.detect_format(target) == new
    assert_same(TopKSAE.load(target), fresh)
    assert no_leftovers(tmp_path)


def test_save_into_an_empty_existing_folder_still_works(tmp_path):
    (tmp_path / "empty").mkdir()
    fresh = sae(seed=3)
    fresh.save(tmp_path / "empty")
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["cfg.json", "sae.safetensors"]
    assert_same(TopKSAE.load(tmp_path / "empty"), fresh)
    assert no_leftovers(tmp_path)


@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
def test_every_saved_file_is_one_a_save_may_replace(tmp_path, fmt):
    """CHECKPOINT_FILES covers every file each format's saver writes, so re-saving a checkpoint is never refused."""
    target = sae().save(tmp_path / "ckpt", fmt)
    assert {p.name for p in target.iterdir()} <= formats.CHECKPOINT_FILES
    for again in sorted(formats.FORMATS):
        sae(seed=4).save(target, again)


# ---- a full disk, a read-only folder: the previous checkpoint stays loadable ---------------------------------


@pytest.mark.parametrize("fmt, where", [(fmt, "config") for fmt in sorted(formats.FORMATS)]
                         + [("dictionary_learning", "weights")])
def test_a_full_disk_mid_save_keeps_the_old_checkpoint_loadable(tmp_path, monkeypatch, fmt, where):
    """ENOSPC while a file of the new checkpoint is half written: the config (written after the weights), or the
    torch-saved weights of ``ae.pt``."""
    old = sae(0)
    path = old.save(tmp_path / "ckpt", fmt)
    before = snapshot(tmp_path)
    real_write_json, real_save = atomic.write_json, torch.save

    def half_then_enospc(target, data: bytes):
        with open(target, "wb") as f:
            f.write(data[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    def write_json(target, obj, **kwargs):
        real_write_json(target, obj, **kwargs)
        half_then_enospc(target, Path(target).read_bytes())

    def save(obj, target, *args, **kwargs):
        real_save(obj, target, *args, **kwargs)
        half_then_enospc(target, Path(target).read_bytes())

    if where == "config":
        monkeypatch.setattr(atomic, "write_json", write_json)
    else:
        monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError) as info:
        sae(1).save(path, fmt)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert snapshot(tmp_path) == before and no_leftovers(tmp_path)
    assert_same(TopKSAE.load(path), old)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes into a read-only folder anyway (chmod does not block it)")
@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
def test_a_read_only_folder_keeps_the_old_checkpoint_loadable(tmp_path, fmt):
    old = sae(0)
    path = old.save(tmp_path / "runs" / "ckpt", fmt)
    before = snapshot(tmp_path)
    os.chmod(tmp_path / "runs", 0o555)
    try:
        with pytest.raises(PermissionError):
            sae(1).save(path, fmt)
    finally:
        os.chmod(tmp_path / "runs", 0o755)
    assert snapshot(tmp_path) == before
    assert_same(TopKSAE.load(path), old)


@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
def test_a_read_only_file_system_keeps_the_old_checkpoint_loadable(tmp_path, monkeypatch, fmt):
    """EROFS (what a read-only mount answers, to root too) at the first thing a save creates."""
    old = sae(0)
    path = old.save(tmp_path / "ckpt", fmt)
    before = snapshot(tmp_path)

    def read_only(target, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(target))

    monkeypatch.setattr(os, "mkdir", read_only)
    with pytest.raises(OSError) as info:
        sae(1).save(path, fmt)
    monkeypatch.undo()
    assert info.value.errno == errno.EROFS
    assert snapshot(tmp_path) == before
    assert_same(TopKSAE.load(path), old)
