"""The torch reference of the sparse GEMV: the definition every kernel is tested against, and the
fallback wherever Triton cannot run (CPU, Triton missing, unsupported dtype)."""

from __future__ import annotations

import torch

from ..rule import sparsify_tensor
from .packing import PackedGemv

__all__ = ["sparse_gemv_reference", "mask_input"]


def mask_input(x: torch.Tensor, threshold: torch.Tensor, shift: torch.Tensor | float = 0.0) -> torch.Tensor:
    """``x' = D(d * (not |d| <= τ))`` with ``d = float32(x) - μ``, ``τ`` rounded to ``x``'s dtype ``D``.

    Returned in fp32 (values representable in ``D``). NaNs are kept, as in
    :func:`actsparse.sparse_linear.sparsify_tensor`; with ``μ = 0`` this is exactly that function.
    """
    return sparsify_tensor(x, threshold, shift).float()


def sparse_gemv_reference(x: torch.Tensor, packed: PackedGemv) -> torch.Tensor:
    """Padded output ``[..., N_pad]`` in ``x``'s dtype for inputs ``x[..., K]`` (any number of rows)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.zeros(x2.shape[0], packed.padded_out, dtype=torch.float32, device=x.device)
    for i, (off, n) in enumerate(packed.segments):
        mu = packed.shift[i] if packed.shift is not None else 0.0
        xs = mask_input(x2, packed.threshold[i], mu)
        cols = slice(off, off + n)
        y[:, cols] = xs @ packed.dense_weight(i).t()
        extra = packed.output_offset(i)
        if extra is not None:
            y[:, cols] += extra
    return y.to(x.dtype).reshape(*lead, packed.padded_out)
