"""Trainer checkpoints under hostile conditions (issue 21): another run's checkpoints in the folder, damaged or
non-finite checkpoints, a full or read-only disk during a save, and a sharded export into folders it must not
replace.

The problem is :mod:`tests.helpers.train_worker`'s (two tiny SAEs, 13 batches); every test runs in seconds.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dlmscope.train import checkpoint as ckpt
from dlmscope.train import sharded_checkpoint as sc
from dlmscope.train.latent_parallel import LatentShard, ProcessGrid
from dlmscope.train.latent_trainer import LatentParallelTrainer
from dlmscope.train.trainer import Trainer
from dlmscope.util import atomic
from tests.helpers import latent_worker
from tests.helpers.tiny_models import single_thread  # noqa: F401  (autouse: one thread)
from tests.helpers.train_worker import N_BATCHES, final_tensors, global_stream, make_config, make_log, make_saes


def _run(directory: Path | None, batches: int = N_BATCHES, *, resume: bool = False, resume_from=None, **cfg):
    """A trainer of the worker's problem checkpointing into ``directory`` every 4 steps; fitted on ``batches``."""
    config = make_config(checkpoint_dir=str(directory) if directory else None,
                         checkpoint_every=4 if directory else None, **cfg)
    trainer = Trainer(make_saes(), config, log=make_log())
    trainer.fit(global_stream(batches), resume=resume, resume_from=resume_from)
    return trainer


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted():
    """The worker's run trained start to end without checkpoints: what every correct resume reproduces."""
    torch.set_num_threads(1)
    return final_tensors(_run(None).saes)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---- 21.6: a run's identity ----------------------------------------------------------------------------------


@pytest.mark.parametrize("same_config", [False, True])
def test_21_6_fresh_run_refuses_folder_with_another_runs_checkpoints(tmp_path, same_config):
    _run(tmp_path, 9, lr=1e-2)               # an earlier run, stopped by its stream at step 9
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=rf"(?s){tmp_path}.*step-000000009.*resume"):
        _run(tmp_path, 5, lr=1e-2 if same_config else 3e-3)
    assert _snapshot(tmp_path) == before     # nothing written, nothing removed


def test_21_6_resume_refuses_another_runs_checkpoint_naming_what_differs(tmp_path):
    _run(tmp_path, 9, lr=1e-2, norm_batches=3)
    with pytest.raises(ValueError, match=r"(?s)step-000000009.*config\.lr.*config\.norm_batches"):
        _run(tmp_path, resume=True, lr=3e-3, norm_batches=5)
    with pytest.raises(ValueError, match=r"saes\[0\]\.meta"):  # another model's SAEs (their provenance differs)
        trainer = Trainer([s.__class__(s.d, s.n, s.k, meta={"model": "other"}) for s in make_saes()],
                          make_config(checkpoint_dir=str(tmp_path), checkpoint_every=4, lr=1e-2), log=make_log())
        trainer.fit(global_stream(), resume=True)
    # the same run's resume is accepted (the checkpoint folder and frequency are not part of a run's identity)
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    shutil.copytree(tmp_path, moved)
    assert _run(moved, resume=True, lr=1e-2, norm_batches=3).step == N_BATCHES


def test_21_6_resume_from_elsewhere_refuses_a_folder_of_another_run(tmp_path):
    _run(tmp_path / "a", 9)
    _run(tmp_path / "b", 5, lr=3e-3)
    with pytest.raises(ValueError, match=rf"(?s){tmp_path / 'b'}.*another run"):
        _run(tmp_path / "b", resume_from=tmp_path / "a" / "step-000000009")


def _damage(path: Path, how: str) -> Path:
    """Damage checkpoint ``path``; returns the damaged file."""
    state, meta = path / ckpt.STATE_FILE, path / ckpt.META_FILE
    if how == "truncated-state":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
        return state
    if how == "empty-state":
        state.write_bytes(b"")
        return state
    if how == "bad-json":
        meta.write_text(meta.read_text()[:-20])
        return meta
    if how == "json-list":
        meta.write_text("[1, 2]")
        return meta
    if how == "missing-meta":
        meta.unlink()
        return meta
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated-state", "empty-state", "bad-json", "json-list", "missing-meta"])
def test_21_6_resume_skips_a_corrupt_latest_checkpoint_with_a_warning(tmp_path, uninterrupted, how):
    """The folder holds steps 5 and 9 of one run, step 9 damaged: resume warns naming it and continues from 5."""
    _run(tmp_path / "run", 5)
    _run(tmp_path / "later", 9)
    shutil.copytree(tmp_path / "later" / "step-000000009", tmp_path / "run" / "step-000000009")
    bad = _damage(tmp_path / "run" / "step-000000009", how)
    with pytest.warns(UserWarning, match=rf"(?s)skipping.*{bad}"):
        trainer = _run(tmp_path / "run", resume=True)
    assert trainer.step == N_BATCHES
    _assert_same(final_tensors(trainer.saes), uninterrupted)


def test_21_6_resume_with_every_checkpoint_damaged_raises_naming_them(tmp_path):
    _run(tmp_path, 9)
    bad = _damage(tmp_path / "step-000000009", "truncated-state")
    with pytest.warns(UserWarning, match="skipping"), pytest.raises(ValueError, match=rf"(?s){bad}"):
        _run(tmp_path, resume=True)


# ---- 21.13: checkpoints that must not load ------------------------------------------------------------------


def test_21_13_checkpoint_with_nan_tensor_is_refused_naming_the_file(tmp_path):
    _run(tmp_path, 9)
    path = tmp_path / "step-000000009"
    tensors = load_file(str(path / ckpt.STATE_FILE))
    tensors["sae.0.W_enc"][1, 2] = float("nan")
    save_file(tensors, str(path / ckpt.STATE_FILE))
    with pytest.raises(ValueError, match=rf"{path / ckpt.STATE_FILE}.*sae\.0\.W_enc"):
        ckpt.load_checkpoint(path)
    with pytest.raises(ValueError, match=rf"{path / ckpt.STATE_FILE}.*sae\.0\.W_enc"):
        _run(tmp_path, resume=True)   # a resume into NaN is refused, not skipped: the run diverged or was damaged


def test_21_13_a_non_finite_state_is_never_saved_over_the_last_checkpoint(tmp_path):
    t = {"a": torch.arange(4.0)}
    first = ckpt.save_checkpoint(tmp_path, 1, t, {"x": 1})
    with pytest.raises(ValueError, match=r"step 2.*'a'.*NaN"):
        ckpt.save_checkpoint(tmp_path, 2, {"a": torch.tensor([1.0, float("nan")])}, {"x": 2})
    assert ckpt.list_checkpoints(tmp_path) == [first]


def _meta_mutations():
    """(name, function of a meta dict) for malformed trainer checkpoint metas."""
    out = []
    for key in ("step", "total_steps", "tokens_seen", "batches_consumed", "norm_factor", "saes", "config"):
        out.append((f"no-{key}", lambda m, key=key: m.pop(key)))
    for key, value in [("step", "7"), ("step", -1), ("step", 2.5), ("tokens_seen", None), ("total_steps", "x"),
                       ("batches_consumed", [1]), ("norm_factor", 0), ("norm_factor", "big"), ("norm_factor", -2.0),
                       ("saes", {}), ("saes", [1, 2]), ("saes", []), ("config", []), ("rng", 5), ("run", "x")]:
        out.append((f"{key}={value!r}", lambda m, key=key, value=value: m.__setitem__(key, value)))
    out.append(("sae-k-str", lambda m: m["saes"][0].__setitem__("k", "3")))
    out.append(("sae-no-d", lambda m: m["saes"][0].pop("d")))
    out.append(("python-rng-bad", lambda m: m["rng"].__setitem__("python", [1])))
    out.append(("numpy-rng-bad", lambda m: m["rng"].__setitem__("numpy", {"x": 1})))
    return out


def _tensor_mutations():
    def drop(name):
        return lambda t: t.pop(name)

    def put(name, value):
        return lambda t: t.__setitem__(name, value(t))

    return [
        ("no-W_enc", drop("sae.0.W_enc")), ("no-dead", drop("dead.1")), ("no-dec-moment", drop("dec.0.exp_avg")),
        ("no-rng", drop("rng.torch")),
        ("W_enc-broadcastable", put("sae.0.W_enc", lambda t: t["sae.0.W_enc"][:1].clone())),
        ("b_dec-wrong-shape", put("sae.1.b_dec", lambda t: torch.zeros(3))),
        ("dead-wrong-length", put("dead.0", lambda t: t["dead.0"][:5].clone())),
        ("adam-moment-wrong-shape", put("adam.0.0.exp_avg", lambda t: torch.zeros(2, 2))),
        ("W_dec-int", put("sae.0.W_dec", lambda t: t["sae.0.W_dec"].to(torch.int32))),
        ("rng-float", put("rng.torch", lambda t: torch.zeros(3))),
        ("inf", put("dec.1.exp_avg_sq", lambda t: torch.full_like(t["dec.1.exp_avg_sq"], float("inf")))),
    ]


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    directory = tmp_path_factory.mktemp("good")
    _run(directory, 9)
    return ckpt.latest_checkpoint(directory)


def _resume_error(path: Path) -> BaseException | None:
    config = make_config(checkpoint_dir=None)
    try:
        Trainer(make_saes(), config, log=make_log()).fit(global_stream(), resume_from=path)
    except BaseException as exc:  # noqa: BLE001 (the test inspects whatever comes out)
        return exc
    return None


@pytest.mark.parametrize("name,mutate", _meta_mutations(), ids=[n for n, _ in _meta_mutations()])
def test_21_13_malformed_meta_raises_value_error_naming_the_file(tmp_path, good_checkpoint, name, mutate):
    path = tmp_path / good_checkpoint.name
    shutil.copytree(good_checkpoint, path)
    meta = json.loads((path / ckpt.META_FILE).read_text())
    mutate(meta)
    (path / ckpt.META_FILE).write_text(json.dumps(meta))
    exc = _resume_error(path)
    assert isinstance(exc, (ValueError, FileNotFoundError)), repr(exc)
    assert str(path) in str(exc), str(exc)


@pytest.mark.parametrize("name,mutate", _tensor_mutations(), ids=[n for n, _ in _tensor_mutations()])
def test_21_13_malformed_tensors_raise_value_error_naming_the_file(tmp_path, good_checkpoint, name, mutate):
    path = tmp_path / good_checkpoint.name
    shutil.copytree(good_checkpoint, path)
    tensors = load_file(str(path / ckpt.STATE_FILE))
    mutate(tensors)
    save_file(tensors, str(path / ckpt.STATE_FILE))
    exc = _resume_error(path)
    assert isinstance(exc, (ValueError, FileNotFoundError)), repr(exc)
    assert str(path) in str(exc), str(exc)


def test_21_13_fuzzed_checkpoint_files_raise_only_value_or_file_not_found_errors(tmp_path, good_checkpoint):
    """Random byte damage to either file: the resume succeeds (damage in tensor data) or raises ValueError /
    FileNotFoundError naming the checkpoint, never another exception."""
    rng = random.Random(21)
    for trial in range(40):
        path = tmp_path / f"t{trial}" / good_checkpoint.name
        shutil.copytree(good_checkpoint, path)
        file = path / rng.choice([ckpt.STATE_FILE, ckpt.META_FILE])
        data = bytearray(file.read_bytes())
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(min(len(data), 400))] = rng.randrange(256)
        file.write_bytes(bytes(data[: rng.choice([len(data), rng.randrange(len(data))])]))
        exc = _resume_error(path)
        if exc is not None:
            assert isinstance(exc, (ValueError, FileNotFoundError)), (trial, file.name, repr(exc))
            assert str(path) in str(exc), (trial, str(exc))


# ---- crash safety: a full or read-only disk during a checkpoint save ----------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
@pytest.mark.parametrize("writer", ["state", "meta"])
def test_checkpoint_save_failing_with_a_disk_error_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                                  uninterrupted, code, writer):
    """The second checkpoint's write fails (a full disk, a folder turned read-only): fit raises an OSError with
    that errno naming the folder and the checkpoint kept; that checkpoint loads and resumes exactly."""
    real_save, real_json = ckpt.save_file, atomic.write_json
    calls = {"n": 0}

    def failing(real):
        def write(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > 1:
                raise OSError(code, os.strerror(code))
            return real(*args, **kwargs)
        return write

    if writer == "state":
        monkeypatch.setattr(ckpt, "save_file", failing(real_save))
    else:
        monkeypatch.setattr(atomic, "write_json", failing(real_json))
    with pytest.raises(OSError, match=rf"(?s){tmp_path}.*step-000000004") as info:
        _run(tmp_path)
    assert info.value.errno == code
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000004"]  # no partial step 8, no temp directory
    ckpt.load_checkpoint(tmp_path / "step-000000004")
    _assert_same(final_tensors(_run(tmp_path, resume=True).saes), uninterrupted)


def test_checkpoint_save_into_a_read_only_folder_keeps_the_previous_checkpoint(tmp_path, uninterrupted):
    _run(tmp_path, 5)
    probe = tmp_path / "probe"
    tmp_path.chmod(0o555)
    try:
        try:
            probe.mkdir()
        except PermissionError:
            pass
        else:
            probe.rmdir()
            pytest.skip("chmod does not stop this user from writing (running as root): the read-only case is "
                        "covered by the read-only tmpfs and the EACCES / EROFS simulation")
        with pytest.raises(PermissionError, match=rf"(?s){tmp_path}.*step-000000005"):
            _run(tmp_path, resume=True)
    finally:
        tmp_path.chmod(0o755)
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000005"]
    _assert_same(final_tensors(_run(tmp_path, resume=True).saes), uninterrupted)


def _mount(*args: str) -> str | None:
    """Run ``mount *args``; the reason it failed, or None."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "mounting a tmpfs needs root and the mount command"
    proc = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    return None if proc.returncode == 0 else f"mount {' '.join(args)} failed: {proc.stderr.strip()}"


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size)``: a folder on a new tmpfs of ``size`` (mount's syntax), unmounted after the test. Skipped
    where it cannot be mounted."""
    mounted = []

    def make(size: str) -> Path:
        mnt = tmp_path / f"tmpfs{len(mounted)}"
        mnt.mkdir()
        reason = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt))
        if reason:
            pytest.skip(reason)
        mounted.append(mnt)
        return mnt

    yield make
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_checkpoint_save_on_a_full_disk_keeps_the_previous_checkpoint(tmpfs, uninterrupted):
    """112 KiB: room for one checkpoint of the worker's problem (~76 KiB), not for the next one beside it (a
    checkpoint is written in full before the previous one is pruned)."""
    mnt = tmpfs("112k")
    with pytest.raises(OSError, match=rf"(?s){mnt}.*step-000000004") as info:
        _run(mnt)
    assert info.value.errno == errno.ENOSPC
    assert [p.name for p in mnt.iterdir()] == ["step-000000004"]  # no partial step 8, no temp directory
    ckpt.load_checkpoint(mnt / "step-000000004")
    assert _mount("-o", "remount,size=1m", str(mnt)) is None  # room again: the run resumes, exactly
    _assert_same(final_tensors(_run(mnt, resume=True).saes), uninterrupted)


def test_checkpoint_save_on_a_read_only_mount_keeps_the_previous_checkpoint(tmpfs, uninterrupted):
    """A read-only file system stops root too (chmod does not)."""
    mnt = tmpfs("1m")
    _run(mnt, 5)
    assert _mount("-o", "remount,ro", str(mnt)) is None
    with pytest.raises(OSError, match=rf"(?s){mnt}.*step-000000005") as info:
        _run(mnt, resume=True)
    assert info.value.errno == errno.EROFS
    assert _mount("-o", "remount,rw", str(mnt)) is None
    assert [p.name for p in mnt.iterdir()] == ["step-000000005"]
    _assert_same(final_tensors(_run(mnt, resume=True).saes), uninterrupted)


# ---- the latent-parallel trainer (a 1 x 1 grid in this process) ----------------------------------------------


def _latent_run(directory: Path, batches: int = N_BATCHES, *, resume: bool = False, **cfg):
    shards = [LatentShard.from_sae(s, 0, s.n) for s in latent_worker.make_saes()]
    config = latent_worker.make_config(checkpoint_dir=str(directory), checkpoint_every=4, **cfg)
    trainer = LatentParallelTrainer(shards, ProcessGrid(1, 1), config, log=latent_worker.make_log())
    trainer.fit(latent_worker.data_stream(0, 1, batches), resume=resume)
    return trainer


def test_sharded_checkpoint_save_on_a_full_disk_keeps_the_previous_checkpoint(tmp_path, tmpfs):
    _latent_run(tmp_path / "sized", 4)
    pages = sum(-(-p.stat().st_size // 4096) for p in (tmp_path / "sized" / "step-000000004").iterdir())
    mnt = tmpfs(f"{(pages * 3 // 2 + 1) * 4}k")  # room for one checkpoint, not two
    with pytest.raises(OSError, match=rf"(?s){mnt}.*shard") as info:
        _latent_run(mnt)
    assert info.value.errno == errno.ENOSPC
    assert sc.latest(mnt) == mnt / "step-000000004"
    sc.load_saes(sc.latest(mnt))


def test_21_6_latent_fresh_run_refuses_folder_with_another_runs_checkpoints(tmp_path):
    _latent_run(tmp_path, 9)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=rf"(?s){tmp_path}.*step-000000009.*resume"):
        _latent_run(tmp_path, 5, lr=3e-3)
    assert _snapshot(tmp_path) == before


def test_21_6_latent_resume_refuses_another_runs_checkpoint_naming_what_differs(tmp_path):
    _latent_run(tmp_path, 9)
    with pytest.raises(ValueError, match=r"(?s)step-000000009.*config\.seed"):
        _latent_run(tmp_path, resume=True, seed=5)
    assert _latent_run(tmp_path, resume=True).step == N_BATCHES


def test_21_6_latent_resume_skips_a_corrupt_latest_checkpoint_with_a_warning(tmp_path):
    full = _latent_run(tmp_path / "full")
    _latent_run(tmp_path / "run", 5)
    _latent_run(tmp_path / "later", 9)
    shutil.copytree(tmp_path / "later" / "step-000000009", tmp_path / "run" / "step-000000009")
    shard = tmp_path / "run" / "step-000000009" / sc.shard_name(0, 1)
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.warns(UserWarning, match=rf"(?s)skipping.*{shard}"):
        resumed = _latent_run(tmp_path / "run", resume=True)
    assert resumed.step == N_BATCHES
    _assert_same(final_tensors(resumed.saes), final_tensors(full.saes))


def _shard_metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_21_13_latent_shard_with_nan_is_refused_naming_the_file(tmp_path):
    _latent_run(tmp_path, 9)
    shard = tmp_path / "step-000000009" / sc.shard_name(0, 1)
    tensors = load_file(str(shard))
    tensors["sae.0.b_enc"][0] = float("nan")
    save_file(tensors, str(shard), metadata=_shard_metadata(shard))
    with pytest.raises(ValueError, match=rf"{shard}.*sae\.0\.b_enc"):
        _latent_run(tmp_path, resume=True)


def _manifest_mutations():
    def put(key, value):
        return lambda m: m.__setitem__(key, value)

    return [("latent_size-str", put("latent_size", "1")), ("latent_size-0", put("latent_size", 0)),
            ("shards-empty", put("shards", [])), ("shards-other", put("shards", ["../x.safetensors"])),
            ("saes-dicts-empty", put("saes", [{}, {}, {}])), ("saes-str", put("saes", "x")),
            ("step-neg", put("step", -1)), ("norm-str", put("norm_factor", "x")), ("no-tokens", lambda m: m.pop(
                "tokens_seen")), ("sae-meta-list", lambda m: m["saes"][0].__setitem__("meta", [1])),
            ("sae-k-too-big", lambda m: m["saes"][0].__setitem__("k", 10 ** 6)),
            ("sae-n-other", lambda m: m["saes"][1].__setitem__("n", 20))]


def test_21_13_fuzzed_sharded_checkpoints_raise_only_value_or_file_not_found_errors(tmp_path):
    """Structured manifest damage and random byte damage to a sharded checkpoint: loading its SAEs raises
    ValueError / FileNotFoundError naming the checkpoint, or (damage in tensor data) succeeds."""
    _latent_run(tmp_path / "ckpt", 9)
    good = sc.latest(tmp_path / "ckpt")
    cases = []
    for name, mutate in _manifest_mutations():
        path = tmp_path / name / good.name
        shutil.copytree(good, path)
        meta = json.loads((path / ckpt.META_FILE).read_text())
        mutate(meta)
        (path / ckpt.META_FILE).write_text(json.dumps(meta))
        cases.append((name, path, True))
    rng = random.Random(13)
    for trial in range(30):
        path = tmp_path / f"t{trial}" / good.name
        shutil.copytree(good, path)
        file = path / rng.choice([ckpt.META_FILE, sc.shard_name(0, 1)])
        data = bytearray(file.read_bytes())
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(min(len(data), 400))] = rng.randrange(256)
        file.write_bytes(bytes(data[: rng.choice([len(data), rng.randrange(len(data))])]))
        cases.append((f"bytes {trial} {file.name}", path, False))
    for name, path, must_fail in cases:
        try:
            sc.load_saes(path)
        except (ValueError, FileNotFoundError) as exc:
            assert str(path) in str(exc), (name, str(exc))
        except BaseException as exc:  # noqa: BLE001
            raise AssertionError(f"{name}: {exc!r}") from exc
        else:
            assert not must_fail, name


# ---- 21.1: a sharded export writes every target or none ------------------------------------------------------


def test_21_1_export_refuses_before_writing_if_any_target_holds_foreign_files(tmp_path):
    _latent_run(tmp_path / "ckpt")
    out = tmp_path / "out"
    (out / "sae_2").mkdir(parents=True)
    (out / "sae_2" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=rf"(?s){out / 'sae_2'}.*notes\.txt"):
        sc.export(sc.latest(tmp_path / "ckpt"), out)
    assert sorted(p.name for p in out.iterdir()) == ["sae_2"]           # sae_0, sae_1 not written
    assert (out / "sae_2" / "notes.txt").read_text() == "mine"
    written = sc.export(sc.latest(tmp_path / "ckpt"), tmp_path / "fresh")
    assert [p.name for p in written] == ["sae_0", "sae_1", "sae_2"]
