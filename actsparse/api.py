"""Public entry points: NNCF-style ``sparsify_activations``, torchao-style ``sparsify_``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch.nn as nn

from .calibrate import calibrate_thresholds
from .config import SparsifyConfig
from .data import check_token_ids, prepare_batches
from .errors import InvalidTypeError, UsageError
from .methods import MethodConfig
from .moe import expert_scope_hint, fuse_experts, unfuses_experts
from .scope import IgnoredScope, TargetScope, check_sparsity, resolve_targets
from .sparse_linear import SparseLinear, SparsityParams, check_not_sparsified, sparse_layers

__all__ = [
    "SparsifyConfig",
    "sparsify_",
    "sparsify_activations",
    "remove_sparsity",
    "sparse_layers",
    "apply_thresholds",
]


def vocab_size(model: nn.Module) -> int | None:
    """The number of input embeddings (token ids must be below it), or None when the model has none."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    return int(emb.num_embeddings) if isinstance(emb, nn.Embedding) else None


@unfuses_experts
def apply_thresholds(
    model: nn.Module,
    thresholds: Mapping[str, float | SparsityParams],
    *,
    target_sparsity: Mapping[str, float | None] | None = None,
    method: str | None = None,
) -> nn.Module:
    """Swap each named ``nn.Linear`` for a ``SparseLinear`` (in place).

    ``thresholds`` maps layer names to a threshold τ or to full :class:`SparsityParams` (shift, scale, top-k).
    Fused MoE experts are split into per-expert Linears first (``actsparse.moe``), so names such as
    ``model.layers.0.mlp.experts.3.down_proj`` work on a freshly loaded model.
    """
    check_not_sparsified(model)
    if not isinstance(thresholds, Mapping):
        raise InvalidTypeError(f"thresholds must be a dict {{layer name: threshold}}, got {type(thresholds).__name__}")
    modules = dict(model.named_modules())
    params = {}
    for n, p in thresholds.items():
        if isinstance(p, SparsityParams):
            params[n] = p
        elif isinstance(p, (int, float)) and not isinstance(p, bool):
            params[n] = SparsityParams(float(p))
        else:
            raise InvalidTypeError(f"threshold for {n!r} must be a number or SparsityParams, got {p!r}")
    if target_sparsity is not None and not isinstance(target_sparsity, Mapping):
        raise InvalidTypeError(
            f"target_sparsity must be a dict {{layer name: fraction}} or None, got {type(target_sparsity).__name__}"
        )
    if method is not None and not isinstance(method, str):
        raise InvalidTypeError(f"method must be a method name (a string) or None, got {method!r}")
    targets: dict[str, float | None] = {}
    for name, p in params.items():  # validate everything before touching the model
        if type(modules.get(name)) is not nn.Linear:
            got = type(modules[name]).__name__ if name in modules else "no such module"
            raise UsageError(f"cannot sparsify {name!r}: expected a torch.nn.Linear, got {got}")
        p.validate(modules[name].in_features, name, modules[name].out_features)
        ts = None if target_sparsity is None else target_sparsity.get(name)
        targets[name] = None if ts is None else check_sparsity(f"layer {name!r}", ts)
    for name, p in params.items():
        model.set_submodule(
            name, SparseLinear.from_linear(modules[name], p, target_sparsity=targets[name], method=method)
        )
    return model


@unfuses_experts
def sparsify_(model: nn.Module, config: SparsifyConfig, dataset: Any = None, *, progress: bool = True) -> nn.Module:
    """Calibrate thresholds on ``dataset`` and sparsify ``model`` in place (torchao-style).

    Everything is validated and calibrated before the model changes: on any error the model is
    left as it was. Fused MoE experts are split into per-expert Linears for the duration (see
    ``actsparse.moe``); those left without a sparsified layer are fused back.
    """
    if not isinstance(config, SparsifyConfig):
        raise InvalidTypeError(f"config must be a SparsifyConfig, got {type(config).__name__}")
    check_not_sparsified(model)
    # SparsifyConfig.__post_init__ normalised both: TargetScope keys, a MethodConfig
    scopes = cast("Mapping[TargetScope, float]", config.target_sparsity_by_scope)
    method = cast(MethodConfig, config.method)
    targets = resolve_targets(model, scopes, config.ignored_scope, hint=expert_scope_hint(model))
    batches = prepare_batches(dataset)
    check_token_ids(batches, vocab_size(model))
    found = calibrate_thresholds(model, batches, targets, method, progress=progress)
    return apply_thresholds(model, found.params, target_sparsity=found.targets, method=method.name)


def sparsify_activations(
    model: nn.Module,
    dataset: Any,
    target_sparsity_by_scope: Mapping[TargetScope, float],
    ignored_scope: IgnoredScope | None = None,
    *,
    method: MethodConfig | str = "quantile",
    progress: bool = True,
) -> nn.Module:
    """NNCF-compatible entry point: calibrate per-layer thresholds and sparsify the model in place.

    ``dataset`` is an iterable of token-id tensors / dicts of model inputs, or an
    ``nncf.Dataset``-like object with ``get_inference_data()``. Returns the (same) model.
    Pass ``method=QuantileMethod(statistic="ema")`` to reproduce NNCF's own threshold rule.
    """
    config = SparsifyConfig(target_sparsity_by_scope, ignored_scope, method)
    return sparsify_(model, config, dataset, progress=progress)


def remove_sparsity(model: nn.Module) -> nn.Module:
    """Swap every ``SparseLinear`` back to a plain ``nn.Linear`` (same parameters), and put unfused MoE
    experts back into their original fused modules. In place."""
    for name, m in sparse_layers(model).items():
        model.set_submodule(name, m.to_linear())
    fuse_experts(model)
    return model
