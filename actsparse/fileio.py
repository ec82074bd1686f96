"""Atomic file writes: a temp file beside the target, then one rename (a reader sees the old file or the new one).

* The temp file is ``.<name>.actsparse-<pid>-<random>.tmp`` in the target's folder; one left behind by a
  killed save (its process gone) is removed by the next save of the same name.
* A file that is replaced keeps its permission bits; a new file gets the usual ``0o666 & ~umask``.
* A symlink is written through: its target file is replaced, the link stays.
* :func:`check_output_path` says, before any work, whether a path can be written (for the CLI's ``--out``).
"""

from __future__ import annotations

import glob
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .errors import UsageError

__all__ = ["atomic_write", "check_output_path", "keep_file_modes"]

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


def _remove_stale(folder: str, name: str) -> None:
    for tmp in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.actsparse-*.tmp")):
        m = _STALE.search(tmp)
        if m is not None and not _pid_alive(int(m.group(1))):
            try:
                os.remove(tmp)
            except OSError:
                pass


@contextmanager
def keep_file_modes(folder: str) -> Iterator[None]:
    """Files another library writes in ``folder`` inside this block keep the permission bits they had (new ones
    get ``0o666 & ~umask``), whatever mode that library creates them with."""

    def modes() -> dict[str, tuple[int, int]]:
        if not os.path.isdir(folder):
            return {}
        out = {}
        for entry in os.scandir(folder):
            if entry.is_file(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
                out[entry.path] = (stat.S_IMODE(st.st_mode), st.st_mtime_ns)
        return out

    before = modes()
    yield
    default = _umask_mode()
    for p, (mode, mtime) in modes().items():
        old = before.get(p)
        if old is None and mode != default:
            os.chmod(p, default)
        elif old is not None and mtime != old[1] and mode != old[0]:
            os.chmod(p, old[0])


def check_output_path(path: Any, what: str = "output file", *, folder: bool = False) -> str:
    """``path`` as a string, if a file (``folder=True``: a folder) can be written there; else a ``UsageError``
    naming the problem: not a path, a folder where a file goes (or the reverse), a parent that is a file, or no
    permission to create it."""
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise UsageError(f"{what}: expected a path, got {path!r}")
    p = os.path.abspath(os.fspath(path))
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
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.actsparse-{os.getpid()}-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
