"""Int8 weight-only compression before activation sparsity (seed 000's "int8 + sparse" row).

``compress_weights(model, mode="int8_asym")`` stores every target ``nn.Linear`` weight as int8 with one
scale (and, asymmetric, one zero point) per output channel: ``W ≈ (q - z) · s``, half the bytes of bf16.
It uses **torchao** (``IntxWeightOnlyConfig``, per-axis granularity): the layer stays a plain
``nn.Linear`` whose weight is a tensor subclass, so ``SparseLinear`` wraps it, calibration hooks see its
inputs, thresholds save and load by name, and ``F.linear`` dispatches to torchao. (optimum-quanto was the
other candidate; it swaps layers for its own ``QLinear`` class and offers only symmetric int8.)

Order: compress first, then calibrate thresholds on the compressed model (NNCF's
``compress_weights`` → ``sparsify_activations``). The rounding is torchao's: asymmetric maps each row's
[min(w, 0), max(w, 0)] onto [-128, 127]; symmetric uses ``max|w| / 127.5`` and zero point 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
import torch.nn as nn

from .errors import MissingDependencyError, UsageError
from .moe import fused_experts
from .quiet import quiet_torchao
from .scope import IgnoredScope, TargetScope, resolve_targets
from .sparse_linear import sparse_layers
from .weights import dense_weight, int8_codes

__all__ = ["WEIGHT_MODES", "compress_weights", "int8_codes", "int8_layers", "dense_weight", "TORCHAO_INSTALL"]

WEIGHT_MODES = ("int8_asym", "int8_sym")
TORCHAO_INSTALL = "pip install 'actsparse[int8]'  (torchao)"


def int8_layers(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` layers whose weight is int8 (compressed by :func:`compress_weights`)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and int8_codes(m.weight) is not None]


def _torchao():
    try:
        with quiet_torchao():
            from torchao.quantization import IntxWeightOnlyConfig, quantize_
            from torchao.quantization.granularity import PerAxis
            from torchao.quantization.quant_primitives import MappingType
    except ImportError:
        raise MissingDependencyError(f"int8 weight compression needs torchao: {TORCHAO_INSTALL}") from None
    return IntxWeightOnlyConfig, quantize_, PerAxis, MappingType


def _output_head(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def compress_weights(
    model: nn.Module,
    mode: str = "int8_asym",
    *,
    patterns: Iterable[str] | None = None,
    ignored_scope: IgnoredScope | None = None,
    include_output_head: bool = False,
) -> list[str]:
    """Int8 weight-only compression of ``model``'s Linear layers, in place; returns the compressed names.

    ``mode``: ``"int8_asym"`` (per-channel scale + zero point, NNCF's default) or ``"int8_sym"``.
    ``patterns``: regexes (``re.match`` on module names) of the layers to compress (default: every
    ``nn.Linear`` but the output head, which is usually tied to the input embeddings;
    ``include_output_head=True`` compresses it too). Compress *before* sparsifying. Everything is checked
    before the first weight changes: on error the model is unmodified.
    """
    if mode not in WEIGHT_MODES:
        raise UsageError(f"unknown weight mode {mode!r}; choose one of {', '.join(WEIGHT_MODES)}")
    if sparse_layers(model):
        raise UsageError(
            "compress the weights before sparsifying: calibrate thresholds on the compressed model "
            "(call actsparse.remove_sparsity(model) first, compress, then sparsify again)"
        )
    modules = dict(model.named_modules())
    if patterns is None:
        head = None if include_output_head else _output_head(model)
        linears = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n != head]
        if not linears:
            raise UsageError(f"{type(model).__name__} has no nn.Linear layer to compress")
        scope = TargetScope(names=linears)
    else:
        scope = TargetScope(patterns=list(patterns))
    names = list(resolve_targets(model, {scope: 0.0}, ignored_scope))
    bad = [n for n in names if type(modules[n]) is not nn.Linear]
    if bad:
        raise UsageError(
            f"int8 weight compression supports plain torch.nn.Linear layers only; {bad[0]!r} is a "
            f"{type(modules[bad[0]]).__name__} ({len(bad)} such); leave it out with ignored_scope"
        )
    done = [n for n in names if int8_codes(modules[n].weight) is not None]
    if done:
        raise UsageError(
            f"{done[0]!r} (and {len(done) - 1} more) already hold int8 weights; load the model again "
            f"to compress it another way"
        )
    for n in names:
        w = modules[n].weight
        if not w.is_floating_point() or w.device.type == "meta":
            raise UsageError(
                f"cannot compress {n!r}: its weight is {w.dtype} on {w.device} (need a float weight "
                f"with data; load the model fully before compressing)"
            )
    fused = list(fused_experts(model))
    if fused:
        warnings.warn(
            f"fused MoE expert weights of {len(fused)} module(s) (e.g. {fused[0]}) stay in full precision: "
            f"int8 compression applies to nn.Linear layers, and fused experts hold 3D weights",
            stacklevel=2,
        )
    config_cls, quantize_, per_axis, mapping = _torchao()
    config = config_cls(
        weight_dtype=torch.int8,
        granularity=per_axis(0),
        mapping_type=mapping.ASYMMETRIC if mode == "int8_asym" else mapping.SYMMETRIC,
    )
    chosen = set(names)
    with torch.no_grad(), quiet_torchao():
        quantize_(model, config, filter_fn=lambda m, fqn: fqn in chosen)
    return names
