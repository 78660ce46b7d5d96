"""Crash safety of durable writes: a child process overwriting a checkpoint is SIGKILLed at every named point of the
write (:data:`dlmscope.util.atomic.POINTS`, reported through :data:`dlmscope.util.atomic.hook`), on the renameat2 path and on
the rename-aside fallback (``atomic._exchange = None``). After each kill the parent finds a complete checkpoint
that is exactly the old one (killed before the new one is put in place) or exactly the new one (killed after).

The children are forked (``os.fork``: a real process, a real SIGKILL, no interpreter start-up per kill); one case
also runs in a freshly started interpreter. The renameat2 cases run only where an exchange works on the file system
of ``tmp_path`` (probed there), and are skipped otherwise.

Also here: which renameat2 failures fall back to the rename-aside path (unsupported) and which are raised.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable

import pytest
import torch

from dlmscope.util import atomic

from dlmscope.sae import formats
from dlmscope.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

PATHS = ["renameat2", "rename-aside"]

OLD = ({"w": torch.arange(6.0).reshape(2, 3), "i": torch.tensor([1, 2, 3])}, {"tag": "old"})
NEW = ({"w": -torch.arange(8.0).reshape(2, 4), "i": torch.tensor([7, 8])}, {"tag": "new"})

# the points an overwrite passes, in order, and the first one at which the new checkpoint is in place
SAME_STEP = {
    "renameat2": (["tmp-created", "checkpoint:state-written", "written", "synced", "exchanged", "old-removed"],
                  "exchanged"),
    "rename-aside": (["tmp-created", "checkpoint:state-written", "written", "synced", "old-aside", "renamed-in",
                      "old-removed"], "renamed-in"),
}
NEW_STEP = (["tmp-created", "checkpoint:state-written", "written", "synced", "renamed-in", "trashed",
             "checkpoint:pruned"], "renamed-in")


def exchange_unsupported(where: Path) -> str | None:
    """Why ``renameat2(RENAME_EXCHANGE)`` cannot be used on the file system of ``where``, or None where it works
    (probed: two fresh directories there are exchanged, and checked, then removed)."""
    if atomic._exchange is None:
        return "libc has no renameat2 (or this is not Linux)"
    a, b = where / "exchange-probe-a", where / "exchange-probe-b"
    a.mkdir()
    b.mkdir()
    try:
        (a / "a").touch()
        (b / "b").touch()
        if not atomic._exchange(a, b):
            return f"the file system of {where} does not support renameat2(RENAME_EXCHANGE)"
        assert (a / "b").exists() and (b / "a").exists(), "renameat2 reported success but swapped nothing"
        return None
    finally:
        shutil.rmtree(a)
        shutil.rmtree(b)


@pytest.fixture
def path_kind(request, monkeypatch, tmp_path):
    if request.param == "rename-aside":
        monkeypatch.setattr(atomic, "_exchange", None)  # inherited by the forked children
    elif (reason := exchange_unsupported(tmp_path)) is not None:
        pytest.skip(reason)
    return request.param


def record_points(fn: Callable[[], object]) -> list[str]:
    """The points ``fn`` passes, in order (run in this process)."""
    seen: list[str] = []
    atomic.hook = seen.append
    try:
        fn()
    finally:
        atomic.hook = None
    return seen


def kill_child_at(point: str, fn: Callable[[], object]) -> None:
    """Run ``fn`` in a forked child that SIGKILLs itself on reaching ``point``; assert that it died so."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            def hook(name: str) -> None:
                if name == point:
                    os.kill(os.getpid(), signal.SIGKILL)

            atomic.hook = hook
            fn()
        except BaseException:
            traceback.print_exc()
            os._exit(4)
        os._exit(3)  # finished without reaching the point
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (point, status)


def assert_checkpoint(directory: Path, expected: tuple[dict, dict], step: int) -> None:
    latest = ckpt.latest_checkpoint(directory)
    assert latest is not None, sorted(p.name for p in directory.iterdir())
    assert latest.name == ckpt.checkpoint_name(step)
    tensors, meta = ckpt.load_checkpoint(latest)
    want_tensors, want_meta = expected
    assert meta == {**want_meta, "step": step}
    assert sorted(tensors) == sorted(want_tensors)
    for name, t in want_tensors.items():
        assert tensors[name].dtype == t.dtype and torch.equal(tensors[name], t), name


def assert_clean_after_next_save(directory: Path) -> None:
    """The next checkpoint (what a resumed run writes) sweeps every leftover of the killed write."""
    ckpt.save_checkpoint(directory, 99, *NEW, keep=1)
    assert [p.name for p in directory.iterdir()] == [ckpt.checkpoint_name(99)]


def _kill_everywhere(tmp_path: Path, old_step: int, new_step: int, points: list[str], commit: str,
                     check_target: bool) -> None:
    rehearsal = tmp_path / "rehearsal"
    ckpt.save_checkpoint(rehearsal, old_step, *OLD)
    assert record_points(lambda: ckpt.save_checkpoint(rehearsal, new_step, *NEW, keep=1)) == points
    for i, point in enumerate(points):
        directory = tmp_path / point
        ckpt.save_checkpoint(directory, old_step, *OLD)
        kill_child_at(point, lambda: ckpt.save_checkpoint(directory, new_step, *NEW, keep=1))
        if check_target:  # before any reader looks: the target names a checkpoint at this instant
            assert (directory / ckpt.checkpoint_name(new_step) / ckpt.META_FILE).is_file(), point
        committed = i >= points.index(commit)
        assert_checkpoint(directory, NEW if committed else OLD, new_step if committed else old_step)
        assert_clean_after_next_save(directory)


@pytest.mark.parametrize("path_kind", PATHS, indirect=True)
def test_killed_rewrite_of_the_same_step_leaves_the_old_or_the_new_checkpoint(tmp_path, path_kind):
    points, commit = SAME_STEP[path_kind]
    # renameat2: the step's directory is a complete checkpoint at every instant, with no reader's help
    _kill_everywhere(tmp_path, 5, 5, points, commit, check_target=path_kind == "renameat2")


@pytest.mark.parametrize("path_kind", PATHS, indirect=True)
def test_killed_write_of_a_new_step_with_keep_1_leaves_the_old_or_the_new_checkpoint(tmp_path, path_kind):
    points, commit = NEW_STEP
    _kill_everywhere(tmp_path, 5, 6, points, commit, check_target=False)


def test_fallback_rewrite_killed_between_its_renames_is_rolled_back(tmp_path, monkeypatch):
    """What the rename-aside path leaves at its one gap, and how a reader repairs it."""
    monkeypatch.setattr(atomic, "_exchange", None)
    ckpt.save_checkpoint(tmp_path, 5, *OLD)
    kill_child_at("old-aside", lambda: ckpt.save_checkpoint(tmp_path, 5, *NEW, keep=1))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert ckpt.checkpoint_name(5) not in names and f".{ckpt.checkpoint_name(5)}{atomic.OLD_MARKER}" in names
    assert ckpt.list_checkpoints(tmp_path) == [tmp_path / ckpt.checkpoint_name(5)]  # restored, hidden ones ignored
    assert_checkpoint(tmp_path, OLD, 5)


_CHILD = """
import os, signal, sys
import torch
from dlmscope.util import atomic
from dlmscope.train import checkpoint as ckpt
directory, point, fallback = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if fallback:
    atomic._exchange = None
atomic.hook = lambda name: os.kill(os.getpid(), signal.SIGKILL) if name == point else None
ckpt.save_checkpoint(directory, 5, {"w": -torch.arange(8.0).reshape(2, 4), "i": torch.tensor([7, 8])},
                     {"tag": "new"}, keep=1)
"""


def test_kill_in_a_fresh_interpreter(tmp_path):
    """The fork-free version of the fallback's gap: a new interpreter killed between the two renames."""
    ckpt.save_checkpoint(tmp_path, 5, *OLD)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), "old-aside", "1"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert_checkpoint(tmp_path, OLD, 5)


# ---- SAE checkpoints (dlmscope.sae.formats) go through the same atomic_directory --------------------------------------


def _sae_state(seed: int):
    g = torch.Generator().manual_seed(seed)
    d, n = 4, 8
    return formats.SAEConfig(d=d, n=n, k=2, meta={"seed": seed}), {
        "W_enc": torch.randn(n, d, generator=g), "b_enc": torch.randn(n, generator=g),
        "W_dec": torch.randn(n, d, generator=g), "b_dec": torch.randn(d, generator=g)}


@pytest.mark.parametrize("path_kind", PATHS, indirect=True)
def test_killed_sae_overwrite_loads_the_old_or_the_new(tmp_path, path_kind):
    old, new = _sae_state(1), _sae_state(2)
    rehearsal = formats.save(*old, tmp_path / "rehearsal")
    points = record_points(lambda: formats.save(*new, rehearsal))
    commit = "exchanged" if path_kind == "renameat2" else "renamed-in"
    assert points == [p for p in SAME_STEP[path_kind][0] if not p.startswith("checkpoint:")]
    for i, point in enumerate(points):
        target = formats.save(*old, tmp_path / point / "sae")
        kill_child_at(point, lambda: formats.save(*new, target))
        cfg, tensors = formats.load(target)
        want_cfg, want = new if i >= points.index(commit) else old
        assert cfg == want_cfg and all(torch.equal(tensors[k], want[k]) for k in formats.PARAMS), point
        assert json.loads((target / "cfg.json").read_text())["meta"] == want_cfg.meta
        formats.save(*new, target)  # the next save sweeps what the killed one left beside the target
        assert [p.name for p in target.parent.iterdir()] == ["sae"], point


def test_hook_is_unset_by_default():
    assert atomic.hook is None


# ---- renameat2 failures: unsupported -> the rename-aside path; anything else is raised ------------------------------


def fake_renameat2(err: int):
    """A stand-in for the C function: fails with ``err`` (through ctypes' errno), or succeeds when ``err`` is 0."""
    def renameat2(*args) -> int:
        if err == 0:
            return 0
        ctypes.set_errno(err)
        return -1
    return renameat2


@pytest.mark.parametrize("err", [errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP])
def test_exchange_reports_unsupported_as_false(tmp_path, err):
    assert atomic._exchange_with(fake_renameat2(err))(tmp_path / "a", tmp_path / "b") is False


def test_exchange_reports_success_as_true(tmp_path):
    assert atomic._exchange_with(fake_renameat2(0))(tmp_path / "a", tmp_path / "b") is True


@pytest.mark.parametrize("err, exc", [(errno.EACCES, PermissionError), (errno.ENOENT, FileNotFoundError),
                                      (errno.EBUSY, OSError), (errno.EXDEV, OSError)])
def test_exchange_raises_real_errors(tmp_path, err, exc):
    with pytest.raises(exc) as info:
        atomic._exchange_with(fake_renameat2(err))(tmp_path / "a", tmp_path / "b")
    assert info.value.errno == err and info.value.strerror == os.strerror(err)
    assert info.value.filename == str(tmp_path / "a") and info.value.filename2 == str(tmp_path / "b")


def test_exchange_of_a_missing_path_raises_file_not_found(tmp_path):
    if (reason := exchange_unsupported(tmp_path)) is not None:
        pytest.skip(reason)
    present = tmp_path / "present"
    present.mkdir()
    with pytest.raises(FileNotFoundError):
        atomic._exchange(tmp_path / "missing", present)
    assert present.is_dir() and not (tmp_path / "missing").exists()  # no fallback rename happened


def test_a_real_exchange_error_fails_the_write_and_keeps_the_old_directory(tmp_path, monkeypatch):
    old = _sae_state(1)
    target = formats.save(*old, tmp_path / "sae")
    monkeypatch.setattr(atomic, "_exchange", atomic._exchange_with(fake_renameat2(errno.EBUSY)))
    with pytest.raises(OSError) as info:
        formats.save(*_sae_state(2), target)
    assert info.value.errno == errno.EBUSY
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]  # no .old, the temp directory removed
    cfg, tensors = formats.load(target)
    assert cfg == old[0] and all(torch.equal(tensors[k], old[1][k]) for k in formats.PARAMS)


def test_an_unsupported_exchange_falls_back_to_rename_aside(tmp_path, monkeypatch):
    target = formats.save(*_sae_state(1), tmp_path / "sae")
    monkeypatch.setattr(atomic, "_exchange", atomic._exchange_with(fake_renameat2(errno.EINVAL)))
    new = _sae_state(2)
    points = record_points(lambda: formats.save(*new, target))
    assert points == [p for p in SAME_STEP["rename-aside"][0] if not p.startswith("checkpoint:")]
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]
    cfg, tensors = formats.load(target)
    assert cfg == new[0] and all(torch.equal(tensors[k], new[1][k]) for k in formats.PARAMS)
