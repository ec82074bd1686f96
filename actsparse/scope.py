"""Target and ignored scopes, resolved to the names of ``nn.Linear`` modules.

The rules follow NNCF's ``sparsify_activations``:

* a target sparsity outside [0, 1] is a ``ValueError``;
* a scope entry that matches nothing is an error that lists close module names;
* a Linear matched by two target scopes is an error;
* the ignored scope wins over target scopes;
* if nothing is left to sparsify, that is an error.

Patterns are Python regular expressions matched with ``re.match`` (anchored at the start of the
name, as NNCF does) against the names of ``model.named_modules()``, e.g.
``model.layers.3.mlp.up_proj``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch.nn as nn

from .errors import ScopeError

__all__ = ["TargetScope", "IgnoredScope", "resolve_targets", "name_templates", "check_sparsity"]


def _as_str_tuple(value, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Iterable):
        raise ScopeError(f"{what} must be a string or a list of strings, got {type(value).__name__}: {value!r}")
    out = tuple(value)
    for v in out:
        if not isinstance(v, str):
            raise ScopeError(f"{what} must be strings, got {type(v).__name__}: {v!r}")
    return out


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ScopeError(
            f"invalid regular expression {pattern!r}: {e}. Patterns are Python regexes, e.g. '.*up_proj.*'."
        ) from None


@dataclass(frozen=True)
class TargetScope:
    """Layers to sparsify, by exact module name and/or regex pattern (NNCF-compatible).

    Lists are accepted and stored as tuples, so a scope can be a dict key.
    """

    names: tuple[str, ...] = field(default_factory=tuple)
    patterns: tuple[str, ...] = field(default_factory=tuple)

    if TYPE_CHECKING:  # the dataclass __init__ also takes lists or one string; __post_init__ stores tuples

        def __init__(self, names: Iterable[str] | None = ..., patterns: Iterable[str] | None = ...) -> None: ...

    def __post_init__(self):
        object.__setattr__(self, "names", _as_str_tuple(self.names, "TargetScope names"))
        object.__setattr__(self, "patterns", _as_str_tuple(self.patterns, "TargetScope patterns"))
        if not self.names and not self.patterns:
            raise ScopeError(
                "TargetScope needs at least one name or pattern, e.g. TargetScope(patterns=['.*up_proj.*'])"
            )
        for p in self.patterns:
            _compile(p)

    def __str__(self) -> str:
        parts = [f"names={list(self.names)}"] if self.names else []
        parts += [f"patterns={list(self.patterns)}"] if self.patterns else []
        return f"TargetScope({', '.join(parts)})"


@dataclass(frozen=True)
class IgnoredScope:
    """Layers never to sparsify: exact names, regex patterns, or module class names (``types``).

    With ``validate=True`` (the default, as in NNCF) an entry that matches nothing is an error.
    """

    names: tuple[str, ...] = field(default_factory=tuple)
    patterns: tuple[str, ...] = field(default_factory=tuple)
    types: tuple[str, ...] = field(default_factory=tuple)
    validate: bool = True

    if TYPE_CHECKING:  # the dataclass __init__ also takes lists or one string; __post_init__ stores tuples

        def __init__(
            self,
            names: Iterable[str] | None = ...,
            patterns: Iterable[str] | None = ...,
            types: Iterable[str] | None = ...,
            validate: bool = ...,
        ) -> None: ...

    def __post_init__(self):
        object.__setattr__(self, "names", _as_str_tuple(self.names, "IgnoredScope names"))
        object.__setattr__(self, "patterns", _as_str_tuple(self.patterns, "IgnoredScope patterns"))
        object.__setattr__(self, "types", _as_str_tuple(self.types, "IgnoredScope types"))
        for p in self.patterns:
            _compile(p)


def name_templates(names: Iterable[str], limit: int = 12) -> list[str]:
    """Distinct module names with layer indices replaced by ``N`` (a readable summary)."""
    seen: dict[str, None] = {}
    for n in names:
        seen.setdefault(re.sub(r"\.\d+(?=\.|$)", ".N", n), None)
    out = list(seen)
    return out[:limit] + ([f"... ({len(out) - limit} more)"] if len(out) > limit else [])


def _close(query: str, names: list[str]) -> str:
    key = re.sub(r"[\\^$.*+?()\[\]{}|]+", ".", query).strip(".")
    close = difflib.get_close_matches(query, names, n=5, cutoff=0.5)
    if key:
        close += [n for n in names if key in n and n not in close][: 5 - len(close)]
    shown = close or name_templates(names)
    return "; close names: " + ", ".join(shown)


def check_sparsity(scope: object, sparsity: object) -> float:
    """``sparsity`` as a float in [0, 1], else a ``ScopeError`` naming ``scope`` (a percentage suggests the fraction)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ScopeError(f"target sparsity for {scope} must be a number in [0, 1], got {sparsity!r}")
    value = float(sparsity)
    if not 0.0 <= value <= 1.0:
        hint = f" (a fraction: did you mean {value / 100:g}?)" if 1.0 < value <= 100.0 else ""
        raise ScopeError(f"target sparsity for {scope} must be in [0, 1], got {value:g}{hint}")
    return value


def _anchor_hint(raw: str, names: list[str], is_pattern: bool) -> str:
    """A pattern that occurs inside names but matches none from their start: say that patterns are anchored."""
    if not is_pattern:
        return ""
    try:
        inside = [n for n in names if re.search(raw, n)]
    except re.error:
        return ""
    if not inside:
        return ""
    return (
        f" (patterns are anchored at the start of the name, re.match; {raw!r} occurs inside e.g. "
        f"{inside[0]!r}: did you mean '.*{raw}.*'?)"
    )


def _match_entry(names: list[str], patterns: tuple[str, ...], exact: tuple[str, ...]):
    """Yield (entry description, the raw entry, matched names) for each name and pattern."""
    all_names = set(names)
    for n in exact:
        yield f"name {n!r}", n, [n] if n in all_names else []
    for p in patterns:
        rx = _compile(p)
        yield f"pattern {p!r}", p, [n for n in names if rx.match(n)]


def resolve_targets(
    model: nn.Module,
    target_sparsity_by_scope: Mapping[TargetScope, float],
    ignored_scope: IgnoredScope | None = None,
    *,
    hint: str = "",
) -> dict[str, float]:
    """Map each target ``nn.Linear`` name to its target sparsity, in module order.

    Raises ``ScopeError`` (a ``ValueError``) for every rule listed in the module docstring. ``hint`` is
    appended to the errors about entries that match nothing usable (e.g. how to name MoE expert layers).
    """
    if not isinstance(target_sparsity_by_scope, Mapping) or not target_sparsity_by_scope:
        raise ScopeError(
            "target_sparsity_by_scope must be a non-empty dict "
            "{TargetScope(...): sparsity}, e.g. {TargetScope(patterns=['.*up_proj.*']): 0.3}"
        )
    modules = dict(model.named_modules())
    all_names = [n for n in modules if n]
    linear_names = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if not linear_names:
        raise ScopeError(f"{type(model).__name__} has no nn.Linear modules to sparsify{hint}")

    order = {n: i for i, n in enumerate(all_names)}
    result: dict[str, float] = {}
    owner: dict[str, TargetScope] = {}
    for scope, sparsity in target_sparsity_by_scope.items():
        if not isinstance(scope, TargetScope):
            raise ScopeError(
                f"keys of target_sparsity_by_scope must be TargetScope, got "
                f"{type(scope).__name__} {scope!r}; wrap it: TargetScope(patterns=[...])"
            )
        sparsity = check_sparsity(scope, sparsity)
        for entry, raw, matched in _match_entry(all_names, scope.patterns, scope.names):
            if not matched:
                raise ScopeError(
                    f"{scope}: {entry} matches no module of {type(model).__name__}"
                    + _anchor_hint(raw, linear_names, raw in scope.patterns)
                    + _close(raw, linear_names)
                    + hint
                )
            linears = [n for n in matched if isinstance(modules[n], nn.Linear)]
            if not linears:
                kinds = sorted({type(modules[n]).__name__ for n in matched})
                raise ScopeError(
                    f"{scope}: {entry} matches only non-Linear modules ({', '.join(kinds)}); "
                    f"activation sparsity applies to nn.Linear inputs. Target the Linear "
                    f"layers instead" + _close(raw, linear_names) + hint
                )
            for n in linears:
                if n in owner and owner[n] != scope:
                    raise ScopeError(
                        f"module {n!r} is matched by two target scopes: {owner[n]} and {scope}; "
                        f"make the scopes disjoint"
                    )
                owner[n] = scope
                result[n] = sparsity

    if ignored_scope is not None:
        if not isinstance(ignored_scope, IgnoredScope):
            raise ScopeError(f"ignored_scope must be an IgnoredScope, got {type(ignored_scope).__name__}")
        ignored: set[str] = set()
        for entry, raw, matched in _match_entry(all_names, ignored_scope.patterns, ignored_scope.names):
            if not matched and ignored_scope.validate:
                raise ScopeError(
                    f"IgnoredScope {entry} matches no module"
                    + _close(raw, linear_names)
                    + " (or pass IgnoredScope(..., validate=False))"
                    + hint
                )
            ignored.update(matched)
        for t in ignored_scope.types:
            matched = [n for n in all_names if type(modules[n]).__name__ == t]
            if not matched and ignored_scope.validate:
                kinds = sorted({type(m).__name__ for m in modules.values()})
                raise ScopeError(f"IgnoredScope type {t!r} matches no module; types in the model: {', '.join(kinds)}")
            ignored.update(matched)
        result = {n: s for n, s in result.items() if n not in ignored}

    if not result:
        raise ScopeError(
            "nothing left to sparsify: every targeted Linear is in the ignored scope; "
            "narrow the IgnoredScope or widen the TargetScopes"
        )
    return dict(sorted(result.items(), key=lambda kv: order[kv[0]]))
