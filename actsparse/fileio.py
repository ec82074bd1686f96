"""Atomic file writes: a temp file beside the target, then one rename (a reader sees the old file or the new one)."""

from __future__ import annotations

import os
import tempfile

__all__ = ["atomic_write"]


def atomic_write(path: str, write, *, suffix: str = ".safetensors") -> None:
    """Call ``write(tmp)`` on a temp file beside ``path``, then rename it over ``path`` (all or nothing)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
