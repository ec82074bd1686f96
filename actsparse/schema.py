"""Reading files a user hands us, strictly: bounded JSON readers and field-by-field checks.

Every file format we read (thresholds headers, sparsify configs, SCAP JSON) goes through these, so that any
bad input is one library error naming the file, the field and what was expected, before anything is used:

* :func:`check_input_file`: the path is a regular file (not missing, a folder, a FIFO that would block, a
  device, or a symlink loop), not larger than a cap;
* :func:`parse_json`: JSON text with a nesting-depth cap (no ``RecursionError``) and numbers of sane length;
* :class:`Fields`: typed accessors (``obj``, ``integer``, ``number``, ``string``, ...) that raise the format's
  error class with ``"<file>: <field>: <problem>"``.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from collections.abc import Collection, Mapping
from typing import Any, NoReturn

from .errors import ActSparseError

__all__ = [
    "check_input_file",
    "parse_json",
    "read_json_file",
    "json_safe",
    "Fields",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
]

MAX_JSON_BYTES = 64 * 1024 * 1024  # far above any real config or SCAP file
MAX_JSON_DEPTH = 64  # our formats nest 4 levels deep at most


def check_input_file(path: Any, what: str, error: type[ActSparseError], *, max_bytes: int | None = None) -> str:
    """``path`` as a string, when it names a regular file we can read; else one ``error`` saying what it is."""
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise error(f"{what}: expected a file path, got {type(path).__name__} {path!r}")
    p = os.fspath(path)
    if not p:
        raise error(f"{what}: the path is empty")
    try:
        st = os.stat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise error(f"{what} {p!r} is a symlink loop (a link that points back to itself)") from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise error(f"{what} {p!r} does not exist") from None
        raise error(f"{what} {p!r} cannot be read: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {p!r} is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a device or socket"
        raise error(f"{what} {p!r} is {kind}, not a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise error(f"{what} {p!r} is {st.st_size} bytes, more than the {max_bytes} this format can be")
    if not os.access(p, os.R_OK):
        raise error(f"{what} {p!r} is not readable (permissions)")
    return p


def _depth(text: str) -> int:
    """The deepest bracket nesting of JSON ``text`` (strings skipped), without parsing it."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _number(text: str) -> float:
    if len(text.lstrip("-")) > 400:
        raise ValueError(f"a number of {len(text)} characters")
    return float(text)


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > 400:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float as ``None`` (``null``): ``json.dump`` would write ``NaN`` and
    ``Infinity``, which are no JSON (strict readers, ``jq``, JavaScript refuse them)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def parse_json(text: str, where: str, error: type[ActSparseError], *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads(text)`` with a nesting cap and bounded numbers; any problem is one ``error``."""
    if _depth(text) > max_depth:
        raise error(f"{where}: JSON nested deeper than {max_depth} levels; this is not a file we wrote")
    try:
        return json.loads(text, parse_int=_integer, parse_float=_number)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except ValueError as e:  # our number guards
        raise error(f"{where}: JSON holds {e}; numbers in this format are short") from None


def read_json_file(path: Any, what: str, error: type[ActSparseError], *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The parsed JSON of the file at ``path`` (checked by :func:`check_input_file` and :func:`parse_json`)."""
    p = check_input_file(path, what, error, max_bytes=max_bytes)
    try:
        with open(p, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise error(f"{what} {p!r} is not UTF-8 text (a binary file?)") from None
    except OSError as e:
        raise error(f"{what} {p!r} cannot be read: {e.strerror}") from None
    return parse_json(text, f"{what} {p!r}", error)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Fields:
    """Typed field checks for one parsed document; a failure raises ``error("<where>: <field>: <problem>")``."""

    def __init__(self, where: str, error: type[ActSparseError]):
        self.where, self.error = where, error

    def fail(self, field: str, problem: str) -> NoReturn:
        raise self.error(f"{self.where}: {field}: {problem}")

    def obj(
        self,
        value: Any,
        field: str,
        *,
        allowed: Collection[str] | None = None,
        required: Collection[str] = (),
        non_empty: bool = False,
    ) -> dict[str, Any]:
        """A JSON object with only ``allowed`` keys (None: any), every ``required`` one."""
        if not isinstance(value, Mapping):
            self.fail(field, f"expected a JSON object, got {type(value).__name__} {_show(value)}")
        if non_empty and not value:
            self.fail(field, "is empty")
        if allowed is not None:
            unknown = sorted(str(k) for k in value if k not in allowed)
            if unknown:
                self.fail(field, f"unknown key(s) {', '.join(unknown)}; the keys are {', '.join(sorted(allowed))}")
        missing = [k for k in required if k not in value]
        if missing:
            self.fail(field, f"missing key(s) {', '.join(missing)}")
        return dict(value)

    def integer(self, value: Any, field: str, *, lo: int | None = None, hi: int | None = None) -> int:
        """A JSON integer (not a bool, not a float: ``2.9`` is not read as ``2``) in ``[lo, hi]``."""
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(field, f"expected an integer, got {type(value).__name__} {_show(value)}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            self.fail(
                field, f"{value} is outside [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            )
        return int(value)

    def number(
        self,
        value: Any,
        field: str,
        *,
        lo: float | None = None,
        hi: float | None = None,
        finite: bool = True,
        none: bool = False,
    ) -> float | None:
        """A JSON number (not a bool or a string such as ``"0.5"``), finite unless ``finite=False``, in [lo, hi];
        ``None`` allowed where ``none``."""
        if value is None and none:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            expected = "a number or null" if none else "a number"
            self.fail(field, f"expected {expected}, got {type(value).__name__} {_show(value)}")
        v = float(value)
        if math.isnan(v) or (finite and math.isinf(v)):
            self.fail(field, f"expected a finite number, got {v}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            self.fail(
                field,
                f"{v:g} is outside [{lo:g}, {hi:g}]" if lo is not None and hi is not None else f"{v:g} is out of range",
            )
        return v

    def string(
        self, value: Any, field: str, *, choices: Collection[str] | None = None, none: bool = False
    ) -> str | None:
        """A JSON string (one of ``choices`` if given); ``None`` allowed where ``none``."""
        if value is None and none:
            return None
        if not isinstance(value, str):
            self.fail(
                field, f"expected a string{' or null' if none else ''}, got {type(value).__name__} {_show(value)}"
            )
        if choices is not None and value not in choices:
            self.fail(field, f"{value!r} is not one of {', '.join(map(repr, choices))}")
        return value

    def boolean(self, value: Any, field: str) -> bool:
        if not isinstance(value, bool):
            self.fail(field, f"expected true or false, got {type(value).__name__} {_show(value)}")
        return value

    def str_list(self, value: Any, field: str) -> list[str]:
        """A JSON list of strings."""
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(field, f"expected a list of strings, got {_show(value)}")
        return list(value)
