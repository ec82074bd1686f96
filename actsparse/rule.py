"""The sparsity rule: one layer's parameters (:class:`SparsityParams`) and which input entries it drops.

The one definition every other part follows (``SparseLinear``'s forward, the kernels' torch reference, the
calibration engine, the sparsity monitor). With ``D`` the activation dtype::

    plain (no shift, scale or top-k):  x' = x where not |x| <= D(τ)          (compared in D, as NNCF)
    otherwise:  d = float32(x) - μ;  score = |d| · s;  keep = not score <= τ' (or score in the top k)
                x' = D(d · keep)

where ``τ' = float32(D(τ))`` without a scale (the kernels' rule) and ``τ`` itself with one. ``τ = -inf``
keeps everything; NaNs are kept. With μ = 0 and no scale the general rule equals the plain one.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .errors import UsageError

__all__ = ["SparsityParams", "drop_mask", "sparsify_tensor", "dense_equivalent_input", "lowrank_term"]


@dataclass
class SparsityParams:
    """One layer's calibrated sparsity parameters (what a method returns, what a file stores)."""

    threshold: float = -math.inf
    shift: float = 0.0
    scale: torch.Tensor | None = None  # [in_features], >= 0
    topk: int | None = None  # tokens keep this many entries
    info: dict[str, Any] = field(default_factory=dict)  # what the method reports (JSON-able), e.g. the mode
    # (U [out, r], V [r, in]): the dropped entries' contribution W·x_dropped is approximated by U·V·x_dropped
    lowrank: tuple[torch.Tensor, torch.Tensor] | None = None

    def lowrank_share(self, in_features: int, out_features: int) -> float:
        """The fraction of the layer's weight bytes the low-rank term reads per token: ``r(in+out)/(in·out)``."""
        if self.lowrank is None:
            return 0.0
        return self.lowrank[1].shape[0] * (in_features + out_features) / (in_features * out_features)

    def validate(self, in_features: int, where: str, out_features: int | None = None) -> None:
        for what, value in (("threshold", self.threshold), ("shift", self.shift)):
            if not _is_real(value):
                raise UsageError(f"{what} for {where!r} must be a number, got {value!r}")
        if self.scale is not None and not isinstance(self.scale, torch.Tensor):
            raise UsageError(f"scale for {where!r} must be a torch.Tensor of shape [{in_features}], got {self.scale!r}")
        if self.topk is not None and not _is_whole(self.topk):
            raise UsageError(f"topk for {where!r} must be a whole number or None, got {self.topk!r}")
        if not isinstance(self.info, dict):
            raise UsageError(f"info for {where!r} must be a dict, got {self.info!r}")
        if self.lowrank is not None and not (
            isinstance(self.lowrank, tuple)
            and len(self.lowrank) == 2
            and all(isinstance(t, torch.Tensor) for t in self.lowrank)
        ):
            raise UsageError(f"low-rank factors for {where!r} must be a tuple (U, V) of tensors, got {self.lowrank!r}")
        if math.isnan(self.threshold):
            raise UsageError(f"threshold for {where!r} is NaN")
        if not math.isfinite(self.shift):
            raise UsageError(f"shift for {where!r} must be finite, got {self.shift}")
        if self.scale is not None:
            s = self.scale
            if s.dim() != 1 or s.numel() != in_features:
                raise UsageError(f"scale for {where!r} must have shape [{in_features}], got {tuple(s.shape)}")
            if not (torch.isfinite(s).all() and (s >= 0).all()):
                raise UsageError(
                    f"scale for {where!r} must be finite and >= 0 (0 drops the channel whenever "
                    f"τ >= 0: a static unit mask)"
                )
        if self.topk is not None and not 0 <= self.topk <= in_features:
            raise UsageError(f"topk for {where!r} must be in [0, {in_features}], got {self.topk}")
        if self.lowrank is not None:
            u, v = self.lowrank
            r = v.shape[0] if v.dim() == 2 else -1
            if (
                u.dim() != 2
                or v.dim() != 2
                or v.shape[1] != in_features
                or u.shape[1] != r
                or r < 1
                or (out_features is not None and u.shape[0] != out_features)
            ):
                raise UsageError(
                    f"low-rank factors for {where!r} must be U [out, r] and V [r, {in_features}] with r >= 1, got "
                    f"{tuple(u.shape)} and {tuple(v.shape)}"
                )
            if not (torch.isfinite(u).all() and torch.isfinite(v).all()):
                raise UsageError(f"low-rank factors for {where!r} must be finite")


def _is_real(v: Any) -> bool:
    """A Python or NumPy real number, or a one-element real tensor (not a bool, not a string)."""
    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and not v.is_complex() and v.dtype != torch.bool
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_whole(v: Any) -> bool:
    """A Python or NumPy integer, or a one-element integer tensor (not a bool)."""
    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and not v.is_floating_point() and not v.is_complex() and v.dtype != torch.bool
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def drop_mask(
    x: torch.Tensor,
    threshold: torch.Tensor | float,
    shift: torch.Tensor | float | None = None,
    scale: torch.Tensor | None = None,
    topk: int | None = None,
) -> torch.Tensor:
    """Boolean mask of the entries of ``x`` the rule of the module docstring drops."""
    if shift is None and scale is None and topk is None:
        return x.abs() <= threshold
    score = (x.float() - (0.0 if shift is None else shift)).abs()
    if scale is not None:
        score = score * scale
    if topk is not None:
        drop = torch.ones_like(score, dtype=torch.bool)
        if topk > 0:
            drop.scatter_(-1, score.nan_to_num(nan=math.inf).topk(topk, dim=-1).indices, False)
        return drop
    tau = threshold if scale is not None else torch.as_tensor(threshold).to(x.dtype).float()
    return score <= tau


def sparsify_tensor(
    x: torch.Tensor,
    threshold: torch.Tensor | float,
    shift: torch.Tensor | float | None = None,
    scale: torch.Tensor | None = None,
    topk: int | None = None,
) -> torch.Tensor:
    """``x'`` of the module docstring's rule (the shifted, masked input; same dtype as ``x``)."""
    drop = drop_mask(x, threshold, shift, scale, topk)
    if shift is None:
        return x.masked_fill(drop, 0)
    return (x.float() - shift).masked_fill(drop, 0.0).to(x.dtype)


def dense_equivalent_input(
    x: torch.Tensor,
    threshold: torch.Tensor | float,
    shift: torch.Tensor | float | None = None,
    scale: torch.Tensor | None = None,
    topk: int | None = None,
) -> torch.Tensor:
    """What a *dense* layer must be fed to compute the sparse layer's output: the dropped entries replaced
    by μ (0 without a shift), since ``W·x_eff = W·x' + μ·ΣW``. Calibration hooks apply a layer's parameters
    this way, before it is swapped for a ``SparseLinear``."""
    return x.masked_fill(drop_mask(x, threshold, shift, scale, topk), 0.0 if shift is None else shift)


def lowrank_term(d: torch.Tensor, drop: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """R-Sparse's output term for the dropped entries: ``U·V·d_dropped`` (fp32), with ``d`` the fp32 centred input
    ``x - μ`` and ``drop`` its :func:`drop_mask` (``SparseLinear`` adds it to its output; calibration too)."""
    return F.linear(F.linear(d.masked_fill(~drop, 0.0), v), u)
