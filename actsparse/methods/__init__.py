"""Calibration methods: a registry of ``@dataclass`` configs keyed by name (torchao-style).

A method config turns one layer's target sparsity into a *collector*: an object with
``update(x)`` (called with that layer's input activations, ``[n_tokens, in_features]``, padding
removed) and ``result() -> float`` (the threshold τ). The calibration engine
(``actsparse.calibrate``) owns the data flow; a method only owns its statistics.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Protocol

import torch

__all__ = ["MethodConfig", "Collector", "register_method", "get_method", "registered_methods",
           "method_from_spec", "method_to_dict"]


class Collector(Protocol):
    def update(self, x: torch.Tensor) -> None: ...

    def result(self) -> float: ...


class MethodConfig:
    """Base class of method configs (subclasses are dataclasses registered with a name)."""

    name: ClassVar[str]

    def make_collector(self, layer_name: str, module: torch.nn.Module, target_sparsity: float) -> Collector:
        raise NotImplementedError


_REGISTRY: dict[str, type[MethodConfig]] = {}


def register_method(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"calibration method {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def registered_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> type[MethodConfig]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown calibration method {name!r}; registered methods: "
                         f"{', '.join(registered_methods())}") from None


def method_from_spec(spec: "MethodConfig | str", **options: Any) -> MethodConfig:
    """A config instance from an instance (returned as is) or a registered name plus options."""
    if isinstance(spec, MethodConfig):
        if options:
            raise ValueError("pass options either in the method config or as keywords, not both")
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"method must be a registered name or a MethodConfig, got {type(spec).__name__}")
    cls = get_method(spec)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"method {spec!r} has no option(s) {unknown}; its options: {sorted(fields)}")
    return cls(**options)


def method_to_dict(method: MethodConfig) -> dict[str, Any]:
    return {"name": method.name, **dataclasses.asdict(method)}


from . import quantile  # noqa: E402,F401  (registers the built-in methods)
