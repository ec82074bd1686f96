"""Gated MLPs whose activation runs inside the down projection's sparse GEMV.

A Llama-style MLP computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``. At batch-1 decode the product is
an elementwise kernel of its own between the gate/up GEMV and the down GEMV, one more launch per layer in the
CUDA graph. :func:`fuse_glu` gives such MLPs a forward that hands ``gate`` and ``up`` to the down projection's
CUDA C++ kernel (:func:`actsparse.kernels.linear.glu_kernel_forward`), which forms ``silu(gate) * up`` as it
loads its input, rounded as torch rounds it. Every other call (prefill, batches, hooks on ``down_proj``, a
layer on the dense route, kernels disabled since) computes the product and calls ``down_proj`` as before.

An MLP takes part when its ``act_fn`` is SiLU, its ``gate_proj``/``up_proj``/``down_proj`` are children, its
``down_proj`` is a lone packed sparse layer that the CUDA kernel runs (``require_cuda=False``: any packed lone
layer, for tests on the CPU), it has no hooks, its class's forward is, instruction for instruction, Llama's
``return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))`` (so a class that adds anything, a
scale, a clamp of large values, dropout in training, keeps its forward), and that forward gives exactly the
fused arithmetic on a probe input (two rows: the dense route). :func:`unfuse_glu` undoes it; :func:`fuse_glu`
called again unfuses the MLPs that no longer qualify (a hook added, kernels disabled). A call whose ``act_fn`` was
replaced or hooked since runs the class forward.
"""

from __future__ import annotations

import types
from typing import Any, cast

import torch
import torch.nn as nn

from ..kernels.linear import glu_kernel_forward
from ..kernels.ops import kernel_for
from ..kernels.packing import PackedGemv
from .hf import code_key, has_hooks

__all__ = ["fuse_glu", "unfuse_glu", "glu_fused"]

_SILU_TYPES = ("SiLU", "SiLUActivation")


def _llama_forward(self, x):  # the forms the fused forward replaces (compared as bytecode, see _llama_style)
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj


def _llama_forward_direct(self, x):
    return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


_LLAMA_CODES = {code_key(_llama_forward), code_key(_llama_forward_direct)}


def _llama_style(mlp: nn.Module) -> bool:
    """Whether the class's own forward is one of the Llama forms above (the same instructions and names)."""
    return code_key(type(mlp).forward) in _LLAMA_CODES


def _silu_unhooked(act: Any) -> bool:
    return type(act).__name__ in _SILU_TYPES and not (act._forward_hooks or act._forward_pre_hooks)


def _glu_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    if not _silu_unhooked(self.act_fn):  # replaced or hooked since fusing: the class's own arithmetic
        return type(self).forward(self, x)
    gate, up = self.gate_proj(x), self.up_proj(x)
    y = glu_kernel_forward(self.down_proj, gate, up)
    return self.down_proj(self.act_fn(gate) * up) if y is None else y  # (the class forward's expression)


def _candidate(mlp: nn.Module, require_cuda: bool) -> bool:
    """The static conditions of the module docstring (the probe is :func:`_same_function`)."""
    down = getattr(mlp, "down_proj", None)
    parts = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj")] + [down]
    if (
        not _llama_style(mlp)
        or type(getattr(mlp, "act_fn", None)).__name__ not in _SILU_TYPES
        or not all(isinstance(p, nn.Linear) for p in parts)
        or getattr(down, "_packed", None) is None
        or getattr(down, "_kernel_group", None) is not None
        or getattr(getattr(down, "_kernel_route", None), "route", None) != "kernel"
        or has_hooks(mlp)
    ):
        return False
    assert isinstance(down, nn.Linear)
    row = torch.empty(down.in_features, dtype=down.weight.dtype, device=down.weight.device)
    return not require_cuda or kernel_for(row, cast(PackedGemv, vars(down)["_packed"])) == "cuda"


@torch.no_grad()
def _same_function(mlp: Any) -> bool:
    """Whether the MLP's class forward is ``down(act(gate(x)) * up(x))`` on a seeded two-row probe."""
    w = mlp.gate_proj.weight
    gen = torch.Generator(device=w.device).manual_seed(0)
    x = torch.randn(1, 2, mlp.gate_proj.in_features, generator=gen, device=w.device).to(w.dtype)
    try:
        own = type(mlp).forward(mlp, x)
    except Exception:  # a forward that takes more than the hidden states (or rejects a probe): not ours to change
        return False
    glu = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    return isinstance(own, torch.Tensor) and own.shape == glu.shape and bool(torch.equal(own, glu))


def fuse_glu(model: nn.Module, *, require_cuda: bool = True) -> list[str]:
    """Give ``model``'s eligible gated MLPs the fused forward (module docstring); returns their names.

    Idempotent: MLPs fused already and still eligible stay as they are (a compiled step that traced them stays
    valid); those no longer eligible are unfused."""
    names = []
    for name, m in model.named_modules():
        if vars(m).get("_glu"):
            if _candidate(m, require_cuda):
                names.append(name)
            else:
                _unfuse(m)
        elif _candidate(m, require_cuda) and _same_function(m):
            vars(m).update(_glu=True, forward=types.MethodType(_glu_forward, m))
            names.append(name)
    return names


def unfuse_glu(model: nn.Module) -> None:
    """Undo :func:`fuse_glu`: every MLP runs its class forward again."""
    for m in model.modules():
        _unfuse(m)


def _unfuse(m: nn.Module) -> None:
    if vars(m).pop("_glu", None) and getattr(vars(m).get("forward"), "__func__", None) is _glu_forward:
        vars(m).pop("forward")  # (a forward someone wrapped around ours since, e.g. accelerate's, stays)


def glu_fused(model: nn.Module) -> list[str]:
    """The names of the MLPs fused now, in model order."""
    return [n for n, m in model.named_modules() if vars(m).get("_glu")]
