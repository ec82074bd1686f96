"""``SparseLinear``: an ``nn.Linear`` whose input entries with ``|x| <= threshold`` are zeroed.

The wrapper *shares* the original Linear's ``weight``/``bias`` Parameters (no copy) and adds one
fp32 buffer, ``act_threshold``, so thresholds live in ``state_dict()`` under
``<layer>.act_threshold``. ``threshold = -inf`` is an exact identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SparseLinear", "sparsify_tensor"]

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks")


def sparsify_tensor(x: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """Zero the entries of ``x`` with ``|x| <= threshold`` (NNCF's rule: ``<=``).

    The comparison runs in ``x``'s dtype. NaNs are kept (``NaN <= t`` is False).
    """
    return x.masked_fill(x.abs() <= threshold, 0)


def _share_linear_state(src: nn.Linear, dst: nn.Module) -> None:
    dst.in_features, dst.out_features = src.in_features, src.out_features
    dst.register_parameter("weight", src.weight)
    dst.register_parameter("bias", src.bias)
    dst.train(src.training)
    for d in _HOOK_DICTS:  # keep user hooks attached to the layer
        if hasattr(src, d):
            setattr(dst, d, getattr(src, d))


class SparseLinear(nn.Linear):
    """Linear layer with static magnitude activation sparsity on its input."""

    act_threshold: torch.Tensor
    _packed = None  # a PackedGemv once actsparse.kernels.enable_kernels() ran

    def __init__(self, *args, **kwargs):  # pragma: no cover - build with from_linear
        raise TypeError("build a SparseLinear with SparseLinear.from_linear(linear, threshold)")

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = -math.inf, *,
                    target_sparsity: float | None = None, method: str | None = None) -> "SparseLinear":
        if type(linear) is not nn.Linear:
            raise TypeError(f"SparseLinear wraps plain torch.nn.Linear layers, got {type(linear).__name__}; "
                            f"exclude it with an IgnoredScope")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        _share_linear_state(linear, new)
        new.register_buffer("act_threshold",
                            torch.tensor(float(threshold), dtype=torch.float32, device=linear.weight.device))
        new.target_sparsity = target_sparsity
        new.method = method
        return new

    def to_linear(self) -> nn.Linear:
        """The plain ``nn.Linear`` sharing this layer's parameters (and hooks)."""
        if self._packed is not None:  # weights were laid out for the sparse GEMV: back to [out, in]
            from .kernels.linear import disable_kernels
            disable_kernels(self)
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        _share_linear_state(self, lin)
        return lin

    def sparsify_input(self, x: torch.Tensor) -> torch.Tensor:
        return sparsify_tensor(x, self.act_threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:  # set by actsparse.kernels.enable_kernels
            from .kernels.linear import kernel_forward
            y = kernel_forward(self, x)
            if y is not None:
                return y
        return F.linear(self.sparsify_input(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        t = f", target_sparsity={self.target_sparsity}" if self.target_sparsity is not None else ""
        return f"{super().extra_repr()}, act_threshold={self.act_threshold.item():.4g}{t}"
