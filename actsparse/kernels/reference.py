"""The torch reference of the sparse GEMV: the definition every kernel is tested against, and the
fallback wherever Triton cannot run (CPU, Triton missing, unsupported dtype)."""

from __future__ import annotations

import torch

from ..rule import sparsify_tensor
from .packing import PackedGemv

__all__ = ["sparse_gemv_reference", "mask_input", "rms_norm"]


def mask_input(x: torch.Tensor, threshold: torch.Tensor, shift: torch.Tensor | float = 0.0) -> torch.Tensor:
    """``x' = D(d * (not |d| <= τ))`` with ``d = float32(x) - μ``, ``τ`` rounded to ``x``'s dtype ``D``.

    Returned in fp32 (values representable in ``D``). NaNs are kept, as in
    :func:`actsparse.sparse_linear.sparsify_tensor`; with ``μ = 0`` this is exactly that function.
    """
    return sparsify_tensor(x, threshold, shift).float()


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm as transformers computes it: the mean square in fp32, ``h * rsqrt(ms + eps)`` rounded to
    ``h``'s dtype, then times ``weight`` in that dtype (``weight * hidden.to(dtype)``)."""
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hf.to(h.dtype)


def sparse_gemv_reference(
    x: torch.Tensor,
    packed: PackedGemv,
    *,
    norm: tuple[torch.Tensor, float] | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Padded output ``[..., N_pad]`` in ``x``'s dtype for inputs ``x[..., K]`` (any number of rows).

    ``norm=(weight, eps)``: ``x`` is a residual stream and the GEMV's input is :func:`rms_norm` of it (what a
    kernel forms as it loads ``x``). ``residual`` (``[..., N_pad]``): the output is ``residual + y``, rounded
    to the dtype as ``residual + hidden_states`` rounds it (what a kernel adds as it writes ``y``)."""
    if norm is not None:
        x = rms_norm(x, *norm)
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
    out = y.to(x.dtype).reshape(*lead, packed.padded_out)
    return out if residual is None else residual + out
