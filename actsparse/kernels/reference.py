"""The torch reference of the sparse GEMV: the definition every kernel is tested against, and the
fallback wherever Triton cannot run (CPU, Triton missing, unsupported dtype)."""

from __future__ import annotations

import math

import torch

from ..errors import UsageError
from ..rule import sparsify_tensor
from .packing import PackedGemv

__all__ = ["sparse_gemv_reference", "mask_input", "rms_norm", "check_norm"]


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


def check_norm(
    norm: object, gate: torch.Tensor | None, k: int, x: torch.Tensor, *, contiguous: bool = False
) -> tuple[torch.Tensor, float]:
    """``norm``'s ``(weight, eps)`` for a GEMV of ``k`` inputs like ``x``, after checking them; a mistake raises
    :class:`UsageError` naming it (``contiguous``: a kernel that reads the weight as one row requires it)."""
    if gate is not None:
        raise UsageError("norm and gate are two ways of forming the input: pass one of them")
    if not (isinstance(norm, tuple) and len(norm) == 2 and isinstance(norm[0], torch.Tensor)):
        raise UsageError(f"norm must be a (weight, eps) pair, got {type(norm).__name__}")
    weight, eps = norm
    if (
        weight.shape != (k,)
        or weight.dtype != x.dtype
        or weight.device != x.device
        or (contiguous and not weight.is_contiguous())
    ):
        raise UsageError(
            f"the norm's weight must be a {'contiguous ' if contiguous else ''}[{k}] {x.dtype} tensor on "
            f"{x.device}, got {tuple(weight.shape)} {weight.dtype} on {weight.device}"
        )
    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise UsageError(f"the norm's eps must be a finite number >= 0, got {eps!r}")
    return weight, float(eps)


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
