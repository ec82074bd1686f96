"""Atomic file writes: a temp file beside the target, then one rename (a reader sees the old file or the new one).

* The temp file is ``.<name>.actsparse-<pid>-<random>.tmp`` in the target's folder (a long name shortened, with
  a hash); one left behind by a killed save (its process gone) is removed by the next save of the same name.
  It is synced to disk before the rename: after a crash the file is the old one or the whole new one.
* A file that is replaced keeps its permission bits; a new file gets the usual ``0o666 & ~umask``.
* A symlink is written through: its target file is replaced, the link stays.
* :func:`check_output_path` says, before any work, whether a path can be written (for the CLI's ``--out``).
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .errors import UsageError

__all__ = ["atomic_write", "check_output_path", "keep_file_modes", "names_folder", "written_last"]

_STALE = re.compile(r"\.actsparse-(\d+)-[^.]+\.tmp$")


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _stem(name: str) -> str:
    """``name`` as temp files beside it spell it: shortened (with a hash) where the temp name would pass the
    file system's 255-byte limit."""
    if len(name.encode()) <= 200:
        return name
    return name.encode()[:120].decode(errors="ignore") + "-" + hashlib.sha256(name.encode()).hexdigest()[:12]


def _fsync(path: str, *, folder: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if folder else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale(folder: str, name: str) -> None:
    for tmp in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(_stem(name))}.actsparse-*.tmp")):
        m = _STALE.search(tmp)
        if m is not None and not _pid_alive(int(m.group(1))):
            try:
                os.remove(tmp)
            except OSError:
                pass


def _entries(folder: str) -> dict[str, os.stat_result]:
    """``{name: its stat}`` of the entries of ``folder`` (links not followed); empty when it is no folder."""
    if not os.path.isdir(folder):
        return {}
    return {e.name: e.stat(follow_symlinks=False) for e in os.scandir(folder)}


@contextmanager
def keep_file_modes(folder: str) -> Iterator[None]:
    """Files another library writes in ``folder`` inside this block keep the permission bits they had (new ones
    get ``0o666 & ~umask``), whatever mode that library creates them with."""
    before = _entries(folder)
    try:
        yield
    finally:
        default = _umask_mode()
        for name, st in _entries(folder).items():
            if not stat.S_ISREG(st.st_mode):
                continue
            mode, old = stat.S_IMODE(st.st_mode), before.get(name)
            if old is not None and not stat.S_ISREG(old.st_mode):
                old = None  # (was no file: a new one)
            if old is None and mode != default:
                os.chmod(os.path.join(folder, name), default)
            elif old is not None and st.st_mtime_ns != old.st_mtime_ns and mode != stat.S_IMODE(old.st_mode):
                os.chmod(os.path.join(folder, name), stat.S_IMODE(old.st_mode))


def _written(folder: str, skip: tuple[str, ...]) -> dict[str, tuple[int, int, int]]:
    """What identifies each entry of ``folder`` as written (inode, size, mtime), but those named in ``skip``."""
    return {n: (st.st_ino, st.st_size, st.st_mtime_ns) for n, st in _entries(folder).items() if n not in skip}


@contextmanager
def written_last(path: str) -> Iterator[None]:
    """Around a save of several files into one folder whose last write is ``path`` (the file that makes the
    others usable: the thresholds beside a checkpoint's weights).

    The old file (a link's target: links are written through) is moved aside for the block, so that a save
    killed part way leaves no old ``path`` beside new files. If the block raises before anything else in the
    folder changed, it is put back (the folder is as it was); if it raises after, it is removed and the error
    says so. A file the block writes at ``path`` gets the old file's permission bits.
    """
    folder = os.path.dirname(os.path.abspath(path))
    real = os.path.realpath(path)
    home, name = os.path.split(real)
    stash_name = f".{_stem(name)}.actsparse-{os.getpid()}-old.tmp"  # a killed save's stash is stale to the next
    stash = os.path.join(home, stash_name)
    skip = (os.path.basename(os.path.abspath(path)), name, stash_name)
    before = _written(folder, skip)
    moved = os.path.isfile(real)
    mode = stat.S_IMODE(os.stat(real).st_mode) if moved else None
    if moved:
        os.replace(real, stash)
    try:
        yield
    except BaseException as e:
        if moved:
            if _written(folder, skip) == before and not os.path.lexists(real):
                os.replace(stash, real)
            else:
                os.remove(stash)
                if hasattr(e, "add_note"):  # Python >= 3.11
                    e.add_note(
                        f"the save failed after changing files in {folder!r}; its old {name} was removed so that "
                        "it cannot be loaded with them: save again"
                    )
        raise
    if moved:
        os.remove(stash)
        if mode is not None and os.path.isfile(real):
            os.chmod(real, mode)


def names_folder(path: Any) -> bool:
    """Whether ``path`` ends with a separator: it names a folder (existing or not), as ``out/``."""
    return isinstance(path, (str, os.PathLike)) and str(os.fspath(path)).endswith(("/", os.sep))


def check_output_path(path: Any, what: str = "output file", *, folder: bool = False) -> str:
    """``path`` as a string, if a file (``folder=True``: a folder) can be written there; else a ``UsageError``
    naming the problem: not a path, a folder where a file goes (or the reverse), a parent that is a file, or no
    permission to create it."""
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise UsageError(f"{what}: expected a path, got {path!r}")
    p = os.path.abspath(os.fspath(path))
    if not folder and names_folder(path):
        raise UsageError(f"{what} {os.fspath(path)!r} ends with a separator, so it names a folder; give a file name")
    if os.path.isdir(p) and not folder:
        raise UsageError(f"{what} {os.fspath(path)!r} is a folder; give a file name (e.g. {os.path.join(p, 'x')})")
    if os.path.lexists(p) and not os.path.isdir(p) and folder:
        raise UsageError(f"{what} {os.fspath(path)!r} is a file; give a folder")
    parent = os.path.dirname(p) if not folder or not os.path.isdir(p) else p
    while not os.path.lexists(parent):  # the nearest existing ancestor decides whether folders can be made
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"cannot write {what} {os.fspath(path)!r}: {parent!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {what} {os.fspath(path)!r}: no permission to write in {parent!r}")
    return os.fspath(path)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temp file beside ``path``, then rename it over ``path`` (all or nothing)."""
    check_output_path(path)
    target = os.path.realpath(path) if os.path.islink(path) else os.path.abspath(path)  # write through a link
    folder, name = os.path.split(target)
    os.makedirs(folder, exist_ok=True)
    _remove_stale(folder, name)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = _umask_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{_stem(name)}.actsparse-{os.getpid()}-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        _fsync(tmp)  # the data is on disk before the rename makes it the file (no empty file after a crash)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:
        _fsync(folder, folder=True)  # the rename itself (best effort: not every file system syncs folders)
    except OSError:
        pass
