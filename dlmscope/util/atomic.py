"""Durable writes: after a crash (exception, SIGKILL, power loss) a target is either complete or unchanged.

Single files (:func:`write_text`, :func:`write_bytes`, :func:`write_json`, :func:`save_safetensors`): the bytes go
to a hidden temp file beside the target with a name of its own (``.<name>.tmp-XXXX``, created exclusively: two
writers of one target never share a temp file), are fsynced, the temp file is renamed over the target, and the
folder is fsynced (the rename itself is durable).

Every file written here gets the mode a plain ``open()`` would give a new file, ``0o666`` less the umask (writers
such as safetensors' ``save_file`` create a private ``0o600`` file of their own). A target that is a symbolic link
is written through: the file or directory the link points at is replaced and the link is kept.

JSON (:func:`write_json`) never holds a bare ``NaN`` / ``Infinity``, which is not JSON: non-finite floats are
written as ``null`` (:func:`nan_to_null`), or refused with ``allow_nan=False``.

Directories (:func:`atomic_directory`): the caller writes every file into a fresh hidden sibling
``.<name>.tmp-XXXX``; on a clean exit the tree is fsynced and put at the target. An existing target is replaced as
a whole:

- with ``renameat2(RENAME_EXCHANGE)`` (Linux, where the file system supports it) the two directories swap names in
  one step, so the target path names a complete directory, the old or the new, at every instant;
- elsewhere (``_exchange is None``, or the kernel / file system answers that it cannot exchange: EINVAL, ENOSYS,
  EOPNOTSUPP; any other error is raised) the old directory is renamed to ``.<name>.old``, the new one renamed in,
  and the old one deleted. Between those two renames the target is missing; :func:`restore_directory` (which the
  readers :func:`dlmscope.train.checkpoint.list_checkpoints` and :func:`dlmscope.sae.formats.load` call, and every
  new write calls first) renames ``.<name>.old`` back. There is at most one ``.<name>.old``: a stale one is deleted
  before a new one is made, and it is only ever deleted while the target exists. (A reader that restores while another
  process is between those two renames would undo that write: one writer, and no reads during its writes.)

Files written inside the temp directory are written plainly (``write_json(..., durable=False)``, a plain
safetensors / torch save): the tree is fsynced as a whole before it is put in place. The writers
(:func:`dlmscope.train.checkpoint.save_checkpoint`, :func:`dlmscope.sae.formats.save`) end a successful write with
:func:`sweep_leftovers`, which deletes the hidden siblings that crashed writes of their targets left behind.

The steps of a replacement are named points (:data:`POINTS`); :data:`hook`, when set, is called at each one (crash
tests kill the process there).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import math
import os
import re
import shutil
import stat
import sys
import uuid
from pathlib import Path
from typing import Callable, Iterator

from safetensors.torch import save_file
from torch import Tensor

__all__ = ["write_text", "write_bytes", "write_json", "read_json", "nan_to_null", "save_safetensors", "file_mode",
           "resolve_link",
           "atomic_directory", "restore_directory", "remove_directory", "is_leftover", "leftover_target",
           "sweep_leftovers", "TMP_MARKER", "OLD_MARKER", "POINTS", "crash_point"]

#: Infixes of the hidden siblings of a directory target: ``.<name>.tmp-XXXX`` (being written, or an old directory
#: being deleted after an exchange) and ``.<name>.old`` (an old directory renamed aside).
TMP_MARKER = ".tmp-"
OLD_MARKER = ".old"
_TOKEN_LEN = 12  # hex digits of the random part of a temp name
#: ``.<name>.tmp-<hex>`` or ``.<name>.old``; group 1 is the target's name
_LEFTOVER = re.compile(rf"^\.(.+)(?:{re.escape(TMP_MARKER)}[0-9a-f]{{{_TOKEN_LEN}}}|{re.escape(OLD_MARKER)})$")

#: The points of :func:`atomic_directory` (in order) and :func:`remove_directory`; each is reached right after the
#: step it names.
POINTS = (
    "tmp-created",   # the empty temp directory exists
    "written",       # the caller's files are in it (not yet fsynced)
    "synced",        # files and directory fsynced
    "exchanged",     # renameat2 path: temp and target swapped; the temp name now holds the old directory
    "old-aside",     # fallback path: the old target renamed to .<name>.old; the target is missing
    "renamed-in",    # the new directory is at the target (fallback path, or no previous target)
    "old-removed",   # the old directory is deleted
    "trashed",       # remove_directory: the directory renamed to a hidden temp name, not yet deleted
)

#: Called with each point's name as it is reached, or None. Crash tests set it; unset, a point costs one comparison.
hook: Callable[[str], None] | None = None


def crash_point(name: str) -> None:
    """Report reaching the named step of a durable write to :data:`hook` (no-op when unset)."""
    if hook is not None:
        hook(name)


# ---- single files -------------------------------------------------------------------------------------------


def _umask() -> int:
    """The process umask (read from /proc where it can be, so that it is never changed, even for an instant)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The permission bits a plain ``open()`` gives a new file: ``0o666`` less the umask."""
    return 0o666 & ~_umask()


def resolve_link(path: str | os.PathLike) -> Path:
    """``path`` with symbolic links resolved (the file or directory a link points at, which is what is written;
    a dangling link resolves to where it points)."""
    path = Path(path)
    return Path(os.path.realpath(path)) if os.path.islink(path) else path


@contextlib.contextmanager
def _replacing(path: str | os.PathLike) -> Iterator[str]:
    """Yield a fresh temp path beside ``path`` (its link target when ``path`` is a symlink); on a clean exit the
    file written there is given :func:`file_mode`, fsynced and renamed over ``path``, and the folder fsynced.
    Otherwise it is removed and ``path`` is untouched."""
    target = resolve_link(path)
    tmp = _tmp_path(target)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # claims the name; the mode is set below
    try:
        yield os.fspath(tmp)
        os.chmod(tmp, file_mode())
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_path(target.parent, directory=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with _replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with _replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def nan_to_null(obj):
    """A copy of the JSON data ``obj`` with every non-finite float (NaN, ±Inf) replaced by None (tuples become
    lists, as JSON writes them); anything else is returned as it is."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: nan_to_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_null(v) for v in obj]
    return obj


def read_json(path: str | os.PathLike, what: str = "invalid JSON", *, error: type[ValueError] = ValueError,
              parse_constant=None):
    """The JSON value in the file ``path``; ``error`` (a ValueError) ``"{path}: {what} (why)"`` for bad UTF-8 or
    JSON or nesting too deep to parse (``parse_constant`` as for :func:`json.load`). FileNotFoundError passes."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, parse_constant=parse_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise error(f"{os.fspath(path)}: {what} ({type(e).__name__}: {str(e)[:200]})") from None


def write_json(path: str | os.PathLike, obj, *, sort_keys: bool = True, allow_nan: bool = True,
               durable: bool = True) -> None:
    """Write ``obj`` as 2-space indented JSON plus a newline to ``path``, atomically (see :func:`write_text`).

    ``sort_keys=False`` keeps the dict order (peer checkpoint configs). Non-finite floats (NaN, ±Inf), which are
    not JSON, are written as ``null`` (:func:`nan_to_null`); ``allow_nan=False`` refuses them instead. Data that is
    not plain JSON (or non-finite with ``allow_nan=False``) raises ``TypeError`` naming the file before anything
    is written. ``durable=False`` writes the file plainly (no temp file, no fsync): for files inside
    :func:`atomic_directory`, whose tree is fsynced as a whole before it is put in place. Both ways write the same
    bytes.
    """
    try:
        text = json.dumps(nan_to_null(obj) if allow_nan else obj, indent=2, sort_keys=sort_keys,
                          allow_nan=False) + "\n"
    except (TypeError, ValueError, RecursionError) as e:
        raise TypeError(f"cannot write {os.path.basename(os.fspath(path))}: the data is not plain JSON: {e}") from e
    if durable:
        write_text(path, text)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def save_safetensors(path: str | os.PathLike, tensors: dict[str, Tensor],
                     metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to the safetensors file ``path`` atomically."""
    with _replacing(path) as tmp:
        save_file(tensors, tmp, metadata=metadata or {"format": "pt"})


# ---- directories --------------------------------------------------------------------------------------------

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
    """fsync every file and folder under ``root``; each regular file first gets :func:`file_mode` (execute bits
    kept, less the umask), whatever mode its writer created it with."""
    mask = _umask()
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            file = Path(dirpath) / name
            with contextlib.suppress(OSError):
                st = os.lstat(file)
                if stat.S_ISREG(st.st_mode):
                    os.chmod(file, (0o666 | (st.st_mode & 0o111)) & ~mask)
            _fsync_path(file, directory=False)
        _fsync_path(Path(dirpath), directory=True)


#: errno values of renameat2(RENAME_EXCHANGE) that mean "this kernel / file system cannot exchange" (the caller
#: then takes the rename-aside path); any other failure is a real error and raised.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)})


def _exchange_with(renameat2: Callable[..., int]) -> Callable[[Path, Path], bool]:
    """The exchange function over the C function ``renameat2`` (errno read through ctypes)."""

    def exchange(a: Path, b: Path) -> bool:
        """Swap the paths ``a`` and ``b`` in one step: True on success, False where the kernel or the file system
        does not support it; any other failure raises ``OSError`` (e.g. ``FileNotFoundError`` for a missing path)."""
        if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return True
        err = ctypes.get_errno()
        if err in _UNSUPPORTED:
            return False
        raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))

    return exchange


def _renameat2_exchange():
    """A callable swapping two paths atomically (see :func:`_exchange_with`), or None where libc lacks renameat2."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return _exchange_with(fn)


#: Swaps two directories atomically, or None (then replacements take the rename-aside path).
_exchange = _renameat2_exchange()


def _old_path(target: Path) -> Path:
    return target.parent / f".{target.name}{OLD_MARKER}"


def _tmp_path(target: Path) -> Path:
    return target.parent / f".{target.name}{TMP_MARKER}{uuid.uuid4().hex[:_TOKEN_LEN]}"


def leftover_target(path: str | os.PathLike) -> str | None:
    """The name of the target whose hidden sibling ``path`` is (``.<name>.tmp-XXXX`` or ``.<name>.old``, as this
    module names them), or None when ``path`` is no such sibling. Judged by the name alone."""
    m = _LEFTOVER.match(os.path.basename(os.fspath(path)))
    return m.group(1) if m else None


def is_leftover(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a hidden sibling this module creates (a temp or an old directory), by its name."""
    return leftover_target(path) is not None


def sweep_leftovers(parent: str | os.PathLike, owns: Callable[[str], bool]) -> list[Path]:
    """Delete the hidden siblings (:func:`is_leftover`) in ``parent`` whose target name satisfies ``owns``; returns
    the paths deleted. Called at the end of a successful write, when no other write of those targets runs (one
    writer). A ``.<name>.old`` is only deleted while ``<name>`` exists: without it, it is what
    :func:`restore_directory` puts back."""
    parent = Path(parent)
    swept = []
    for p in sorted(parent.iterdir()):
        name = leftover_target(p)
        if name is None or not owns(name):
            continue
        if p.name.endswith(OLD_MARKER) and not os.path.lexists(parent / name):
            continue
        shutil.rmtree(p, ignore_errors=True)
        swept.append(p)
    return swept


def restore_directory(target: str | os.PathLike) -> bool:
    """Finish an interrupted rename-aside replacement: if ``target`` is missing and ``.<name>.old`` exists, rename
    it back (it is the complete previous directory). True if it restored something. Safe to race with itself."""
    target = Path(target)
    old = _old_path(target)
    if os.path.lexists(target) or not os.path.isdir(old):
        return False
    try:
        os.rename(old, target)
    except OSError:
        if os.path.lexists(target):  # another process restored it first
            return False
        raise
    _fsync_path(target.parent, directory=True)
    return True


def remove_directory(path: str | os.PathLike) -> None:
    """Delete the directory ``path`` so that it vanishes at once: renamed to a hidden temp name, then deleted (a
    crash mid-delete leaves a hidden leftover, never a half-deleted ``path``)."""
    path = Path(path)
    trash = _tmp_path(path)
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return
    _fsync_path(path.parent, directory=True)
    crash_point("trashed")
    shutil.rmtree(trash, ignore_errors=True)


def _replace_directory(new: Path, target: Path) -> None:
    """Put directory ``new`` at ``target``; an existing ``target`` directory is replaced and deleted."""
    parent = target.parent
    if not os.path.lexists(target):
        try:
            os.rename(new, target)
        except OSError:
            if not os.path.lexists(target):
                raise
            # someone created target meanwhile: fall through to the replace path
        else:
            _fsync_path(parent, directory=True)
            crash_point("renamed-in")
            return
    if _exchange is not None and _exchange(new, target):
        _fsync_path(parent, directory=True)
        crash_point("exchanged")
        shutil.rmtree(new, ignore_errors=True)  # `new` now names the old directory
        crash_point("old-removed")
        return
    old = _old_path(target)
    if os.path.lexists(old):  # stale (the target exists): removed so that at most one .old ever exists
        shutil.rmtree(old)
    os.rename(target, old)
    _fsync_path(parent, directory=True)
    crash_point("old-aside")
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    _fsync_path(parent, directory=True)
    crash_point("renamed-in")
    shutil.rmtree(old, ignore_errors=True)
    crash_point("old-removed")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Context manager: write a directory's files into the yielded temp dir; it becomes ``target`` on a clean exit.

    ``target`` may exist (a directory: it is replaced as a whole); its parent directories are created. A ``target``
    that is a symbolic link is written through: the directory it points at is replaced and the link kept. If the
    body raises, the temp directory is removed and ``target`` is untouched.
    """
    target = resolve_link(target)
    restore_directory(target)  # a crashed earlier replacement is rolled back before this one starts
    if os.path.lexists(target) and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; refusing to replace it with a checkpoint")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir (not tempfile.mkdtemp, whose 0700 mode would stick to the result) so the umask applies
    tmp = _tmp_path(target)
    os.mkdir(tmp, 0o777)
    try:
        crash_point("tmp-created")
        yield tmp
        crash_point("written")
        _fsync_tree(tmp)
        crash_point("synced")
        _replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
