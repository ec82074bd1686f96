"""Gated MLPs whose activation runs inside the down projection's sparse GEMV.

A Llama-style MLP computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``. At batch-1 decode the product is
an elementwise kernel of its own between the gate/up GEMV and the down GEMV, one more launch per layer in the
CUDA graph. :func:`fuse_glu` gives such MLPs a forward that hands ``gate`` and ``up`` to the down projection's
CUDA C++ kernel (:func:`actsparse.kernels.linear.glu_kernel_forward`), which forms ``silu(gate) * up`` as it
loads its input, rounded as torch rounds it. Every other call (prefill, batches, hooks on ``down_proj``, a
layer on the dense route, kernels disabled since) computes the product and calls ``down_proj`` as before.

An MLP takes part when its ``act_fn`` is SiLU, its ``gate_proj``/``up_proj``/``down_proj`` are children, its
``down_proj`` is a lone packed sparse layer that the CUDA kernel runs (``require_cuda=False``: any packed lone
layer, for tests on the CPU), it has no hooks, and its own forward gives exactly
``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` on a probe input (two rows: the dense route), so a class that
adds anything (a scale, a clamp, dropout in training) keeps its forward. :func:`unfuse_glu` undoes it.
"""

from __future__ import annotations

import types
from typing import Any, cast

import torch
import torch.nn as nn

from ..kernels.linear import glu_kernel_forward
from ..kernels.ops import kernel_for
from ..kernels.packing import PackedGemv

__all__ = ["fuse_glu", "unfuse_glu", "glu_fused"]

_SILU_TYPES = ("SiLU", "SiLUActivation")


def _glu_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_proj(x), self.up_proj(x)
    y = glu_kernel_forward(self.down_proj, gate, up)
    return self.down_proj(self.act_fn(gate) * up) if y is None else y


def _has_hooks(m: nn.Module) -> bool:
    """Hooks, or accelerate's dispatch (offloading), on ``m`` or a submodule."""
    return any(
        bool(s._forward_hooks or s._forward_pre_hooks) or getattr(s, "_hf_hook", None) is not None for s in m.modules()
    )


def _candidate(mlp: nn.Module, require_cuda: bool) -> bool:
    """The static conditions of the module docstring (the probe is :func:`_same_function`)."""
    down = getattr(mlp, "down_proj", None)
    parts = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj")] + [down]
    if (
        type(getattr(mlp, "act_fn", None)).__name__ not in _SILU_TYPES
        or not all(isinstance(p, nn.Linear) for p in parts)
        or getattr(down, "_packed", None) is None
        or getattr(down, "_kernel_group", None) is not None
        or getattr(getattr(down, "_kernel_route", None), "route", None) != "kernel"
        or _has_hooks(mlp)
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

    Idempotent: MLPs fused already stay as they are (a compiled step that traced them stays valid)."""
    names = []
    for name, m in model.named_modules():
        if "forward" in vars(m) and vars(m).get("_glu"):
            names.append(name)
        elif _candidate(m, require_cuda) and _same_function(m):
            vars(m).update(_glu=True, forward=types.MethodType(_glu_forward, m))
            names.append(name)
    return names


def unfuse_glu(model: nn.Module) -> None:
    """Undo :func:`fuse_glu`: every MLP runs its class forward again."""
    for m in model.modules():
        if vars(m).pop("_glu", None):
            vars(m).pop("forward", None)


def glu_fused(model: nn.Module) -> list[str]:
    """The names of the MLPs fused now, in model order."""
    return [n for n, m in model.named_modules() if vars(m).get("_glu")]
