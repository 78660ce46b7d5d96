"""Atomic directory writes for checkpoints.

:func:`atomic_directory` yields a fresh temporary directory next to the target (same filesystem, so the final
step is a rename). The caller writes every file into it; on a clean exit the files and the directory are
fsynced and the directory is renamed into place. If anything raises, the temporary directory is removed and the
target is untouched. A hard crash (power loss, SIGKILL) can at worst leave a ``.<name>.tmp-*`` directory beside
the target, never a half-written target.

Overwriting an existing checkpoint swaps the two directories with ``renameat2(RENAME_EXCHANGE)`` where the
kernel and libc offer it (Linux): the target path always names a complete checkpoint, the old or the new.
Elsewhere the old directory is renamed aside, the new one renamed in (the old one is put back if that fails),
and only then is the old one deleted; the window in which the path is missing is two renames long.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_directory", "TMP_MARKER", "OLD_MARKER"]

#: Infixes of the sibling directories this module creates (``.<name>.tmp-XXXX``, ``.<name>.old-XXXX``).
TMP_MARKER = ".tmp-"
OLD_MARKER = ".old-"

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _fsync_path(path: Path, *, directory: bool) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. directories cannot be opened on Windows; durability is best effort there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name, directory=False)
        _fsync_path(Path(dirpath), directory=True)


def _renameat2_exchange():
    """A callable swapping two paths atomically, or None where renameat2 is unavailable."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def exchange(a: Path, b: Path) -> bool:
        if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return True
        return False  # EINVAL / ENOSYS (filesystem or kernel without support): caller falls back

    return exchange


_exchange = _renameat2_exchange()


def _replace_directory(new: Path, target: Path) -> None:
    """Put directory ``new`` at ``target``; an existing ``target`` directory is replaced and deleted."""
    parent = target.parent
    if not os.path.lexists(target):
        try:
            os.rename(new, target)
            _fsync_path(parent, directory=True)
            return
        except OSError:
            if not os.path.lexists(target):
                raise
            # someone created target meanwhile: fall through to the replace path
    if _exchange is not None and _exchange(new, target):
        # `new` now names the old checkpoint
        _fsync_path(parent, directory=True)
        shutil.rmtree(new, ignore_errors=True)
        return
    old = parent / f".{target.name}{OLD_MARKER}{uuid.uuid4().hex[:12]}"
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    _fsync_path(parent, directory=True)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Context manager: write a directory's files into the yielded temp dir; it becomes ``target`` on exit.

    ``target`` may exist (a directory: it is replaced as a whole); its parent directories are created.
    """
    target = Path(target)
    if os.path.lexists(target) and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; refusing to replace it with a checkpoint")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir (not tempfile.mkdtemp, whose 0700 mode would stick to the checkpoint) so the umask applies
    tmp = parent / f".{target.name}{TMP_MARKER}{uuid.uuid4().hex[:12]}"
    os.mkdir(tmp, 0o777)
    try:
        yield tmp
        _fsync_tree(tmp)
        _replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
