"""``SparsifyConfig`` (what to sparsify and how to calibrate) and its versioned JSON files.

A config file is plain JSON, so a recipe can be reviewed, diffed and shared without pickles::

    {"format": "actsparse.sparsify_config", "version": 1, "actsparse_version": "0.1.0",
     "targets": [{"patterns": [".*up_proj.*"], "sparsity": 0.3}, ...],
     "ignored_scope": {"names": [], "patterns": [".*lm_head.*"], "types": [], "validate": true},
     "method": {"name": "teal", "step": 0.05, ...}}

``version`` is bumped whenever the meaning of a field changes; this release reads versions up to
:data:`CONFIG_VERSION` and refuses newer files (upgrade actsparse) rather than guessing. Unknown keys
are errors too: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from ._version import __version__
from .errors import ConfigFileError, InvalidTypeError
from .fileio import atomic_write
from .methods import MethodConfig, method_from_spec, method_to_dict
from .schema import read_json_file
from .scope import IgnoredScope, TargetScope, check_sparsity

__all__ = [
    "SparsifyConfig",
    "CONFIG_FORMAT",
    "CONFIG_VERSION",
    "config_to_dict",
    "config_from_dict",
    "save_config",
    "load_config",
]

CONFIG_FORMAT = "actsparse.sparsify_config"
CONFIG_VERSION = 1
_TOP_KEYS = {"format", "version", "actsparse_version", "targets", "ignored_scope", "method"}
_TARGET_KEYS = {"names", "patterns", "sparsity"}
_IGNORED_KEYS = {"names", "patterns", "types", "validate"}


@dataclass
class SparsifyConfig:
    """What to sparsify and how to calibrate it.

    ``target_sparsity_by_scope`` maps ``TargetScope`` (or a bare regex string, shorthand for
    ``TargetScope(patterns=[s])``) to a sparsity in [0, 1]. ``method`` is a registered method name
    (``"quantile"``) or a method config such as ``QuantileMethod(statistic="ema")``.
    """

    target_sparsity_by_scope: Mapping[TargetScope, float] | Mapping[str, float] | Mapping[TargetScope | str, float]
    ignored_scope: IgnoredScope | None = None
    method: MethodConfig | str = "quantile"
    method_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.target_sparsity_by_scope, Mapping):
            raise InvalidTypeError("target_sparsity_by_scope must be a dict {TargetScope(...): sparsity}")
        self.target_sparsity_by_scope = {
            TargetScope(patterns=[k]) if isinstance(k, str) else k: v for k, v in self.target_sparsity_by_scope.items()
        }
        for scope in self.target_sparsity_by_scope:
            if not isinstance(scope, TargetScope):
                raise InvalidTypeError(
                    f"target_sparsity_by_scope keys must be TargetScope(...) or a regex string, got {scope!r}"
                )
        if self.ignored_scope is not None and not isinstance(self.ignored_scope, IgnoredScope):
            raise InvalidTypeError(
                f"ignored_scope must be an IgnoredScope(names=..., patterns=..., types=...) or None, got "
                f"{self.ignored_scope!r}"
            )
        for scope, sparsity in self.target_sparsity_by_scope.items():  # before any model work
            check_sparsity(scope, sparsity)
        self.method = method_from_spec(self.method, **self.method_options)
        self.method_options = {}

    def to_dict(self) -> dict[str, Any]:
        """This config as versioned, JSON-ready data (``actsparse.config``)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SparsifyConfig:
        """Rebuild a config from :meth:`to_dict` data; every field is checked."""
        return config_from_dict(data)

    def save(self, path: str) -> str:
        """Write this config as versioned JSON (atomically)."""
        return save_config(self, path)

    @classmethod
    def load(cls, path: str) -> SparsifyConfig:
        """Read a JSON config written by :meth:`save` (or by hand)."""
        return load_config(path)


def config_to_dict(config: SparsifyConfig) -> dict[str, Any]:
    """The JSON-ready dict of ``config`` (see the module docstring)."""
    if not isinstance(config, SparsifyConfig):
        raise InvalidTypeError(f"expected a SparsifyConfig, got {type(config).__name__}")
    ig = config.ignored_scope
    # __post_init__ made every key a TargetScope and the method a MethodConfig
    scopes = cast("Mapping[TargetScope, float]", config.target_sparsity_by_scope)
    method = cast(MethodConfig, config.method)
    out = {
        "format": CONFIG_FORMAT,
        "version": CONFIG_VERSION,
        "actsparse_version": __version__,
        "targets": [
            {"names": list(s.names), "patterns": list(s.patterns), "sparsity": float(v)} for s, v in scopes.items()
        ],
        "ignored_scope": None
        if ig is None
        else {
            "names": list(ig.names),
            "patterns": list(ig.patterns),
            "types": list(ig.types),
            "validate": bool(ig.validate),
        },
        "method": method_to_dict(method),
    }
    try:
        json.dumps(out, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigFileError(
            f"method {method.name!r} has options that JSON cannot hold ({e}); "
            f"give it plain numbers, strings, lists and dicts"
        ) from None
    return out


def _fail(where: str, problem: str) -> ConfigFileError:
    return ConfigFileError(f"{where}: {problem}")


def _check_keys(where: str, d: Any, allowed: set[str], required: set[str] | frozenset[str] = frozenset()) -> None:
    if not isinstance(d, Mapping):
        raise _fail(where, f"expected a JSON object, got {type(d).__name__}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise _fail(where, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(required - set(d))
    if missing:
        raise _fail(where, f"missing key(s) {missing}")


def _str_list(where: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(where, f"expected a list of strings, got {value!r}")
    return value


def config_from_dict(d: Mapping[str, Any], *, source: str = "config") -> SparsifyConfig:
    """Rebuild a :class:`SparsifyConfig` from :func:`config_to_dict` output, checking every field."""
    _check_keys(source, d, _TOP_KEYS, {"format", "version", "targets", "method"})
    if d["format"] != CONFIG_FORMAT:
        raise _fail(source, f"format is {d['format']!r}, not {CONFIG_FORMAT!r}: not an actsparse sparsify config")
    version = d["version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _fail(source, f"version must be a positive integer, got {version!r}")
    if version > CONFIG_VERSION:
        raise _fail(
            source,
            f"config version {version} was written by a newer actsparse "
            f"({d.get('actsparse_version', '?')}); this one ({__version__}) reads up to version "
            f"{CONFIG_VERSION}: upgrade actsparse",
        )
    targets = d["targets"]
    if not isinstance(targets, list) or not targets:
        raise _fail(f"{source}: targets", 'expected a non-empty list of {"patterns": [...], "sparsity": s}')
    scopes: dict[TargetScope, float] = {}
    for i, t in enumerate(targets):
        where = f"{source}: targets[{i}]"
        _check_keys(where, t, _TARGET_KEYS, {"sparsity"})
        s = t["sparsity"]
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0 <= s <= 1:
            raise _fail(where, f"sparsity must be a number in [0, 1], got {s!r}")
        try:
            scope = TargetScope(
                names=_str_list(f"{where}.names", t.get("names", [])),
                patterns=_str_list(f"{where}.patterns", t.get("patterns", [])),
            )
        except ValueError as e:
            raise _fail(where, str(e)) from None
        if scope in scopes:
            raise _fail(where, f"{scope} is listed twice")
        scopes[scope] = float(s)
    ignored = None
    if d.get("ignored_scope") is not None:
        where = f"{source}: ignored_scope"
        ig = d["ignored_scope"]
        _check_keys(where, ig, _IGNORED_KEYS)
        if not isinstance(ig.get("validate", True), bool):
            raise _fail(where, f"validate must be true or false, got {ig['validate']!r}")
        try:
            ignored = IgnoredScope(
                names=_str_list(f"{where}.names", ig.get("names", [])),
                patterns=_str_list(f"{where}.patterns", ig.get("patterns", [])),
                types=_str_list(f"{where}.types", ig.get("types", [])),
                validate=ig.get("validate", True),
            )
        except ValueError as e:
            raise _fail(where, str(e)) from None
    method = d["method"]
    if not isinstance(method, Mapping) or not isinstance(method.get("name"), str):
        raise _fail(f"{source}: method", f'expected {{"name": "quantile", ...options}}, got {method!r}')
    options = {k: v for k, v in method.items() if k != "name"}
    try:
        method = method_from_spec(method["name"], **options)
    except (ValueError, TypeError) as e:
        raise _fail(f"{source}: method", str(e)) from None
    return SparsifyConfig(scopes, ignored, method)


def save_config(config: SparsifyConfig, path: str | os.PathLike) -> str:
    """Write ``config`` as versioned JSON to ``path`` (atomically); returns the path."""

    text = json.dumps(config_to_dict(config), indent=2, allow_nan=False) + "\n"

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(os.fspath(path), write)
    return os.fspath(path)


def load_config(path: str | os.PathLike) -> SparsifyConfig:
    """Read a config written by :func:`save_config` (or by hand), with a clear error for any bad field."""
    d = read_json_file(path, "sparsify config", ConfigFileError)
    return config_from_dict(d, source=os.fspath(path))
