"""The method contract and the registry of method configs (frozen ``@dataclass``es keyed by name, torchao-style).

A method is one of two kinds, declared by :meth:`MethodConfig.searches`:

* **per-layer** (the default): :meth:`~MethodConfig.make_collector` turns one layer's target sparsity into a
  :class:`~actsparse.stats.Collector`, which the calibration engine (``actsparse.calibrate``) feeds that
  layer's inputs, sequentially (later layers see earlier ones sparsified). Two optional hooks adjust the
  targets: :meth:`~MethodConfig.plan` before calibration (across blocks) and :meth:`~MethodConfig.allocate`
  per stage (within a block, e.g. TEAL's greedy allocation, through a :class:`StageView`).
* **whole-model search**: :meth:`~MethodConfig.calibrate_model` returns every target's parameters itself
  (it runs the model as it needs: PPL-p%, attribution masks).

The engine owns the data flow and calls these hooks directly; a method owns only its statistics.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, TypeVar

import torch
import torch.nn as nn

from ..data import Batch
from ..errors import InvalidTypeError, UsageError
from ..rule import SparsityParams
from ..stats import Collector

__all__ = [
    "MethodConfig",
    "Collector",
    "StageView",
    "register_method",
    "get_method",
    "registered_methods",
    "method_from_spec",
    "method_to_dict",
    "parse_option",
    "parse_method_spec",
]


class StageView(Protocol):
    """What :meth:`MethodConfig.allocate` may do with one stage of the engine (a block, or the whole model):
    its target layers (execution order), their requested sparsities and modules; ``collect`` feeds collectors
    the layers' inputs (``params`` applied to this stage's layers), ``outputs`` runs the stage with
    ``params`` and returns its outputs per batch; ``batches_for(tokens)`` counts leading batches."""

    names: list[str]
    targets: dict[str, float]
    modules: dict[str, nn.Module]

    def batches_for(self, tokens: int | None) -> int: ...

    def collect(
        self,
        collectors: dict[str, Collector],
        params: dict[str, SparsityParams] | None = None,
        batches: int | None = None,
    ) -> None: ...

    def outputs(self, params: dict[str, SparsityParams], batches: int | None = None) -> list[torch.Tensor]: ...


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base class of method configs (subclasses are frozen dataclasses registered with a name).

    ``topk=True`` (any method): at inference every token keeps exactly ``round((1 - s) · in_features)``
    entries (the highest-scoring ones under the method's score, shift and scale) instead of thresholding.
    """

    name: ClassVar[str]
    topk: bool = dataclasses.field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        """Every option has the type its annotation says (subclasses call this first, then check ranges)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, want = getattr(self, f.name), hints.get(f.name)
            if want is not None and not _is_instance(value, want):
                raise InvalidTypeError(
                    f"{type(self).__name__}: option {f.name} must be {_type_name(want)}, got {value!r}"
                )
        bpo = getattr(self, "bins_per_octave", None)  # the histogram resolution several methods share
        if bpo is not None and bpo < 16:
            raise UsageError(f"{type(self).__name__}: bins_per_octave must be >= 16, got {bpo}")

    def searches(self) -> bool:
        """True: a whole-model search (:meth:`calibrate_model`); False (default): per-layer collectors."""
        return False

    # ------------------------------------------------------------------------------------ per-layer
    def make_collector(self, layer_name: str, module: nn.Module, target_sparsity: float) -> Collector:
        """The collector that calibrates ``layer_name`` at ``target_sparsity`` (per-layer methods)."""
        raise NotImplementedError(f"method {self.name!r} defines no per-layer collector")

    def plan(
        self,
        model: nn.Module,
        batches: list[Batch],
        targets: dict[str, float],
        device: torch.device,
        *,
        progress: bool = True,
    ) -> dict[str, float]:
        """Per-layer targets before calibration starts (default: the requested ones)."""
        return dict(targets)

    def allocate(self, stage: StageView) -> dict[str, float]:
        """Targets of one stage's layers, just before they are calibrated (default: the stage's targets)."""
        return dict(stage.targets)

    # ------------------------------------------------------------------------------------ search
    def calibrate_model(
        self,
        model: nn.Module,
        batches: list[Batch],
        targets: dict[str, float],
        device: torch.device,
        *,
        progress: bool = True,
    ) -> dict[str, SparsityParams]:
        """Every target's parameters (whole-model searches, where :meth:`searches` is True)."""
        raise NotImplementedError(f"method {self.name!r} is not a whole-model search")


def _is_instance(value: Any, tp: Any) -> bool:
    """``isinstance`` against an annotation: unions, Optional, Literal, generics (their container type), and the
    numeric tower as a user means it (an int is a float, a bool is neither)."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin is not None:
        return isinstance(value, origin)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    base = origin or tp
    names = {
        type(None): "None",
        float: "a number",
        int: "an integer",
        str: "a string",
        bool: "true or false",
        dict: "a dict",
        list: "a list",
        tuple: "a list",
    }
    return names.get(base, getattr(base, "__name__", str(tp)))


_REGISTRY: dict[str, type[MethodConfig]] = {}


M = TypeVar("M", bound="MethodConfig")


def register_method(name: str) -> Callable[[type[M]], type[M]]:
    def deco(cls: type[M]) -> type[M]:
        if name in _REGISTRY:
            raise UsageError(f"calibration method {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


# names that preset options of a registered method (CLI/sweep shorthands)
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "teal-greedy": ("teal", {"allocation": "greedy"}),
    "teal-uniform": ("teal", {"allocation": "uniform"}),
    "teal-greedy-sens": ("teal", {"allocation": "greedy", "block_budget": "sensitivity"}),
    "teal-uniform-sens": ("teal", {"allocation": "uniform", "block_budget": "sensitivity"}),
    "teal-greedy-search": ("teal", {"allocation": "greedy", "block_budget": "search"}),
    "teal-uniform-search": ("teal", {"allocation": "uniform", "block_budget": "search"}),
    "scap-median": ("scap", {"mode": "median"}),
    "scap-kde": ("scap", {"mode": "kde"}),
    "topk": ("sparsing-law", {"metric": "topk"}),
    "fat": ("sparsing-law", {"metric": "fat"}),
    "pplp": ("sparsing-law", {"metric": "pplp"}),
}


def registered_methods(aliases: bool = False) -> list[str]:
    """Registered method names (with ``aliases=True``, also the shorthands such as ``teal-greedy``)."""
    return sorted(_REGISTRY) + (sorted(a for a, (base, _) in ALIASES.items() if base in _REGISTRY) if aliases else [])


def get_method(name: str) -> type[MethodConfig]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UsageError(
            f"unknown calibration method {name!r}; registered methods: "
            f"{', '.join(registered_methods(aliases=True))} (add '+topk' for top-k)"
        ) from None


def method_from_spec(spec: MethodConfig | str, **options: Any) -> MethodConfig:
    """A config instance from an instance (returned as is) or a registered name plus options."""
    if isinstance(spec, MethodConfig):
        if options:
            raise UsageError("pass options either in the method config or as keywords, not both")
        return spec
    if not isinstance(spec, str):
        raise InvalidTypeError(f"method must be a registered name or a MethodConfig, got {type(spec).__name__}")
    given = options
    spec, plus, suffix = spec.partition("+")
    if plus:  # "wina+topk": any method with top-k at inference
        if suffix != "topk":
            raise UsageError(f"unknown method suffix '+{suffix}'; the only one is '+topk'")
        options = {**options, "topk": True}
    if spec in ALIASES and ALIASES[spec][0] in _REGISTRY:
        base, preset = ALIASES[spec]
        options = {**preset, **options}
        spec = base
    cls = get_method(spec)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise UsageError(f"method {spec!r} has no option(s) {unknown}; its options: {sorted(fields)}")
    try:
        return cls(**options)
    except (TypeError, AttributeError) as e:  # a value of the wrong type, e.g. step="abc"
        raise UsageError(
            f"method {spec!r}: bad option value in {given} ({e}); values are JSON (0.1, null, true) "
            "or bare strings (mode=kde)"
        ) from None


_PYTHON_LITERALS = {"None": None, "True": True, "False": False}


def parse_option(text: str) -> tuple[str, Any]:
    """``"KEY=VALUE"`` → ``(key, value)``: the value read as JSON (``0.1``, ``null``, ``true``), Python's
    ``None``/``True``/``False``, else kept as a bare string (``mode=kde``). Shared by ``--option`` and sweep specs."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError(f"expected KEY=VALUE, e.g. step=0.1, got {text!r}")
    if value in _PYTHON_LITERALS:
        return key, _PYTHON_LITERALS[value]
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def parse_method_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"NAME[:KEY=VALUE[:KEY=VALUE...]]"`` → ``(NAME, {KEY: value})``, values as :func:`parse_option`
    reads them (so a value holds no ``:``). The options are not checked here: see :func:`method_from_spec`."""
    name, *parts = [p.strip() for p in spec.split(":")]
    options: dict[str, Any] = {}
    for part in parts:
        key, value = parse_option(part)
        if key in options:
            raise UsageError(f"option {key!r} is given twice")
        options[key] = value
    return name, options


def method_to_dict(method: MethodConfig) -> dict[str, Any]:
    return {"name": method.name, **dataclasses.asdict(method)}
