"""Calibration methods: a registry of ``@dataclass`` configs keyed by name (torchao-style).

The contract and the registry are in :mod:`.base`; each built-in method is a module of its own, registered
when this package is imported.
"""

from . import attribution, quantile, rsparse, scap, sparsing_law, teal, wina  # noqa: F401  (registers the built-in methods)
from .base import (
    ALIASES,
    Collector,
    MethodConfig,
    get_method,
    method_from_spec,
    method_to_dict,
    parse_method_spec,
    parse_option,
    register_method,
    registered_methods,
)

__all__ = [
    "MethodConfig",
    "Collector",
    "register_method",
    "get_method",
    "registered_methods",
    "method_from_spec",
    "method_to_dict",
    "parse_option",
    "parse_method_spec",
    "ALIASES",
]
