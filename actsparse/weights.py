"""Weight views: a Linear's weight as a plain tensor, and the int8 codes of a compressed one (torchao)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["dense_weight", "int8_codes", "weight_key"]


def dense_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as a plain tensor: torchao's quantized weights are dequantized, others returned as is."""
    if type(weight) not in (torch.Tensor, nn.Parameter) and hasattr(weight, "qdata"):
        return weight.dequantize()
    return weight


def int8_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """``(q int8 [N, K], scale fp32 [N], zero fp32 [N] or None)`` of a per-channel int8 weight, else None."""
    q = getattr(weight, "qdata", None)
    if type(weight) in (torch.Tensor, nn.Parameter) or q is None or q.dtype != torch.int8 or q.dim() != 2:
        return None
    codes: Any = weight  # a torchao int8 tensor: qdata, scale, zero_point
    scale = codes.scale.float().reshape(-1)
    if scale.numel() != q.shape[0]:  # grouped scales: not the per-output-channel layout the kernels read
        return None
    zero = codes.zero_point.float().reshape(-1)
    return q, scale, None if bool((zero == 0).all()) else zero


def weight_key(w: torch.Tensor) -> tuple[int, int]:
    """Identity of a weight's storage and its in-place edits (of the int8 codes for compressed weights)."""
    codes = int8_codes(w)
    t = w if codes is None else codes[0]
    return t.data_ptr(), t._version
