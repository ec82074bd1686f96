"""Mixture-of-experts layers: per-expert ``nn.Linear`` views of fused expert weights.

Activation sparsity works on ``nn.Linear`` inputs. Older MoE code (and hand-written models) keep one
Linear per expert (``block_sparse_moe.experts.3.w1``): those are ordinary targets already, and each
expert's Linear only ever sees the tokens routed to it. transformers 5 stores the experts of Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, ... *fused*: one module ``mlp.experts`` with 3D Parameters
``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``, and no Linear to target.

:func:`unfuse_experts` swaps each such module for an :class:`UnfusedExperts` whose experts are plain
Linears named like the dense MLP (and like the Qwen-MoE checkpoints)::

    model.layers.0.mlp.experts.3.gate_proj   [I, H]   rows  :I of gate_up_proj[3]
    model.layers.0.mlp.experts.3.up_proj     [I, H]   rows I:  of gate_up_proj[3]
    model.layers.0.mlp.experts.3.down_proj   [H, I]   down_proj[3]

Their weights are *views* of the original 3D storage (no copy), and the forward is transformers'
eager expert loop calling those Linears, so ``SparseLinear`` wrapping, calibration hooks (which then
see exactly the tokens routed to each expert), ``SparsityMonitor`` and save/load work unchanged.
Gate and up get their own Linears (one input, two thresholds) so that dense-model recipes
(``.*gate_proj.*``, ``.*up_proj.*``, ``.*down_proj.*``) and Qwen-MoE/transformers-4 names apply as they are.
On CPU the outputs equal the fused eager loop bit for bit when the intermediate size is a multiple of
the vector width (16 fp32 lanes: Mixtral, Qwen-MoE, OLMoE, DeepSeek sizes; otherwise SiLU rounds the tail
elements of the separate gate output differently, by an ulp), and transformers' default ``grouped_mm``
experts to rounding (as the eager loop itself does).
``state_dict()`` keeps the original fused keys (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``),
so HF ``save_pretrained`` and plain transformers loading are unaffected, and ``load_state_dict`` accepts
them. ``model.to(device/dtype)`` converts the fused storage once and re-points the views.
:func:`fuse_experts` puts the original module (the same object, the same Parameters) back.

The public entry points do this on their own: ``sparsify_``/``sparsify_activations``, ``apply_thresholds``
and ``load_thresholds`` unfuse before resolving names, fuse back whatever ends up without a sparsified
layer (and everything, on error), and ``remove_sparsity`` fuses every expert module back.

Only the standard layout is split: transformers' ``@use_experts_implementation`` declares the experts
(``[gate; up]`` concatenated, no bias, not transposed, default gate activation, no post-expert norm).
Other fused layouts (GPT-OSS: transposed, biases, clamped gate) are left alone and named in scope errors.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch.nn as nn

from ..errors import ActSparseError, AlreadySparsifiedError, CalibrationError
from ..sparse_linear import SparseLinear
from .experts import ExpertMLP, UnfusedExperts

__all__ = [
    "UnfusedExperts",
    "ExpertMLP",
    "UnsupportedExpertsError",
    "fused_experts",
    "unfuse_experts",
    "fuse_experts",
    "experts_unfused",
    "unfuses_experts",
    "linear_shapes",
    "expert_scope_hint",
    "explain_calibration_error",
    "EXPERT_PATTERNS",
]

# scope patterns for per-expert layers (they match the unfused names and old-style per-expert Linears alike)
EXPERT_PATTERNS = {
    "gate_proj": r".*experts\.\d+\.gate_proj",
    "up_proj": r".*experts\.\d+\.up_proj",
    "down_proj": r".*experts\.\d+\.down_proj",
}
_SIGNATURE = ["hidden_states", "top_k_index", "top_k_weights"]
# (attribute set by transformers' @use_experts_implementation, the value we understand, what else means)
_FLAGS = (
    ("has_gate", True, "no gate projection (up_proj only)"),
    ("has_bias", False, "biases"),
    ("is_transposed", False, "transposed [E, in, out] weights"),
    ("is_concatenated", True, "interleaved gate/up rows"),
    ("has_post_expert_norm", False, "a norm after each expert"),
    ("_is_expert_parallel", False, "expert parallelism"),
)
_EXPERT_LAYER = re.compile(r"(^|\.)experts\.\d+\.")
T = TypeVar("T")


class UnsupportedExpertsError(ActSparseError, ValueError):
    """A module stores fused expert weights in a layout actsparse cannot split into Linears."""


# ----------------------------------------------------------------------------------------------- detection


def _is_candidate(m: nn.Module) -> bool:
    """Does ``m`` hold fused expert weights (a 3D ``*_proj`` Parameter, or 3D weights in an ``*Experts``)?"""
    if isinstance(m, UnfusedExperts):
        return False
    three_d = [k for k, p in m._parameters.items() if p is not None and p.dim() == 3]
    return any(k.endswith("_proj") for k in three_d) or (bool(three_d) and type(m).__name__.endswith("Experts"))


def _default_apply_gate():
    try:
        from transformers.integrations.moe import _default_apply_gate as f
    except ImportError:  # pragma: no cover - transformers without the experts interface
        return None
    return f


def _layout_problems(m: nn.Module) -> list[str]:
    """Why ``m`` (a candidate) cannot be split into per-expert Linears; empty when it can."""
    problems = []
    params = {k: p for k, p in m._parameters.items() if p is not None}
    if set(params) != {"gate_up_proj", "down_proj"}:
        problems.append(
            f"parameters {sorted(params)} instead of exactly gate_up_proj [E, 2I, H] and down_proj [E, H, I]"
        )
    else:
        gu, dn = params["gate_up_proj"], params["down_proj"]
        ok = gu.dim() == 3 and dn.dim() == 3 and gu.shape[1] % 2 == 0
        if not ok or tuple(dn.shape) != (gu.shape[0], gu.shape[2], gu.shape[1] // 2):
            problems.append(
                f"shapes gate_up_proj {tuple(gu.shape)} and down_proj {tuple(dn.shape)} are not "
                f"[E, 2I, H] and [E, H, I]"
            )
        elif getattr(m, "num_experts", gu.shape[0]) != gu.shape[0]:
            problems.append(f"num_experts={m.num_experts} but {gu.shape[0]} expert weights")
    if m._buffers:
        problems.append(f"buffers {sorted(m._buffers)}")
    if not hasattr(m, "is_transposed"):
        problems.append(
            "its class is not declared through transformers' @use_experts_implementation, so its "
            "forward semantics are unknown"
        )
    else:
        problems += [what for attr, want, what in _FLAGS if getattr(m, attr, want) != want]
        default = _default_apply_gate()
        if default is None or getattr(type(m), "_apply_gate", default) is not default:
            problems.append("a custom gate activation (_apply_gate)")
    if not callable(getattr(m, "act_fn", None)):
        problems.append("no act_fn")
    try:
        names = list(inspect.signature(type(m).forward).parameters)[1:4]
    except (TypeError, ValueError):  # pragma: no cover - builtin or odd forward
        names = []
    if names != _SIGNATURE:
        problems.append(f"forward{tuple(names)} is not forward(hidden_states, top_k_index, top_k_weights)")
    if hasattr(m, "_hf_hook"):
        problems.append("accelerate hooks (device_map offloading) on the module")
    return problems


def fused_experts(model: nn.Module) -> dict[str, list[str]]:
    """``{module name: problems}`` for every module of ``model`` holding fused expert weights.

    An empty problem list means :func:`unfuse_experts` can split it; otherwise the list says why not.
    """
    return {n: _layout_problems(m) for n, m in model.named_modules() if n and _is_candidate(m)}


def linear_shapes(model: nn.Module) -> Iterator[tuple[str, int, int]]:
    """``(name, in_features, out_features)`` of every Linear of ``model``, in module order, counting the
    per-expert Linears of splittable fused experts as if they were unfused (the same either way)."""
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            yield n, m.in_features, m.out_features
        elif n and _is_candidate(m) and not _layout_problems(m):
            e_count, two_i, h = m.gate_up_proj.shape
            i = two_i // 2
            for e in range(e_count):
                yield f"{n}.{e}.gate_proj", h, i
                yield f"{n}.{e}.up_proj", h, i
                yield f"{n}.{e}.down_proj", i, h


# ------------------------------------------------------------------------------------------- operations


def unfuse_experts(model: nn.Module, *, strict: bool = True) -> list[str]:
    """Swap every fused experts module of ``model`` for an :class:`UnfusedExperts` (in place).

    Returns the names of the modules unfused now (already unfused ones are left as they are). A module
    in a fused layout that cannot be split raises :class:`UnsupportedExpertsError` before anything
    changes; with ``strict=False`` it is left fused instead.
    """
    found = fused_experts(model)
    bad = {n: p for n, p in found.items() if p}
    if strict and bad:
        raise UnsupportedExpertsError(_unsupported_message(model, bad))
    names = [n for n, p in found.items() if not p]
    for n in names:
        model.set_submodule(n, UnfusedExperts(model.get_submodule(n)))
    return names


def _unfused_modules(model: nn.Module, names: list[str] | None) -> dict[str, UnfusedExperts]:
    found = {n: m for n, m in model.named_modules() if isinstance(m, UnfusedExperts)}
    return found if names is None else {n: found[n] for n in names if n in found}


def _refuse(model: nn.Module, modules: dict[str, UnfusedExperts]) -> None:
    for n, m in modules.items():
        model.set_submodule(n, m.fuse())


def fuse_experts(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Put the original fused experts modules back (in place); ``names`` limits it to those modules.

    Returns the names fused back. Experts that hold sparsified layers are refused (nothing changes):
    ``actsparse.remove_sparsity(model)`` removes the sparsity and fuses them back.
    """
    modules = _unfused_modules(model, names)
    for n, m in modules.items():
        sparse = [k for k, s in m.named_modules() if isinstance(s, SparseLinear)]
        if sparse:
            raise AlreadySparsifiedError(
                f"{n!r} holds sparsified expert layers (e.g. {n}.{sparse[0]}); "
                f"actsparse.remove_sparsity(model) removes the sparsity and fuses them back"
            )
    _refuse(model, modules)
    return list(modules)


@contextmanager
def experts_unfused(model: nn.Module):
    """Unfuse every splittable experts module for the duration of the block (yields their names).

    On any error they are all fused back, leaving the model as it was; on success those that hold no
    ``SparseLinear`` are fused back, so only sparsified experts stay unfused. Nests safely.
    """
    names = unfuse_experts(model, strict=False)
    try:
        yield names
    except BaseException:
        _refuse(model, _unfused_modules(model, names))
        raise
    idle = {
        n: m
        for n, m in _unfused_modules(model, names).items()
        if not any(isinstance(s, SparseLinear) for s in m.modules())
    }
    _refuse(model, idle)


def unfuses_experts(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator for entry points ``fn(model, ...)``: run ``fn`` inside :func:`experts_unfused` (restoring
    the model on error), and name the MoE-specific fix when an expert saw no calibration tokens."""

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        if not isinstance(model, nn.Module):
            return fn(model, *args, **kwargs)
        with experts_unfused(model):
            try:
                return fn(model, *args, **kwargs)
            except CalibrationError as e:
                better = explain_calibration_error(e)
                if better is None:
                    raise
                raise better from None

    return wrapper


# ----------------------------------------------------------------------------------------------- messages


def _unsupported_message(model: nn.Module, bad: dict[str, list[str]]) -> str:
    n, problems = next(iter(bad.items()))
    more = f" (and {len(bad) - 1} more modules)" if len(bad) > 1 else ""
    return (
        f"{n!r} ({type(model.get_submodule(n)).__name__}) stores its experts fused in a layout actsparse "
        f"cannot split into per-expert Linears: {'; '.join(problems)}{more}. Its experts cannot be sparsified; "
        f"exclude them from the scopes"
    )


def expert_scope_hint(model: nn.Module) -> str:
    """Text appended to scope errors of MoE models: the per-expert names to target, unsplittable modules."""
    parts = []
    found = fused_experts(model)
    splittable = [n for n, m in model.named_modules() if isinstance(m, UnfusedExperts)]
    splittable += [n for n, p in found.items() if not p]
    if splittable:
        parts.append(
            f"MoE experts are sparsified per expert: their fused 3D weights (experts.gate_up_proj, "
            f"experts.down_proj) are split into Linears such as {splittable[0]}.0.gate_proj / .up_proj / "
            f".down_proj; target them with r'{EXPERT_PATTERNS['gate_proj']}', r'{EXPERT_PATTERNS['up_proj']}', "
            f"r'{EXPERT_PATTERNS['down_proj']}' (or r'.*experts\\..*' for all three; Mixtral checkpoints' w1, w3, "
            f"w2 are gate_proj, up_proj, down_proj)"
        )
    bad = {n: p for n, p in found.items() if p}
    if bad:
        parts.append(_unsupported_message(model, bad))
    return "".join(f". {p}" for p in parts)


_NO_TOKENS = re.compile(r"layer '([^']+)' saw no calibration tokens")


def explain_calibration_error(err: CalibrationError) -> CalibrationError | None:
    """For "saw no calibration tokens" on an expert layer: the same error with the MoE-specific fix."""
    m = _NO_TOKENS.search(str(err))
    expert = _EXPERT_LAYER.search(m.group(1)) if m is not None else None
    if m is None or expert is None:
        return None
    pattern = re.escape(m.group(1)[: expert.end()])
    return CalibrationError(
        f"{err} An MoE expert only sees the calibration tokens its router sends it, and this one got none: "
        f"calibrate on more tokens, or leave the expert dense with IgnoredScope(patterns=[r'{pattern}', ...])"
    )
