"""Measured activation sparsity: the fraction of zeros the SparseLinear layers actually produce."""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack

import torch
import torch.nn as nn

from ..errors import UsageError
from ..forward import input_hooks
from ..sparse_linear import SparseLinear

__all__ = ["SparsityMonitor", "summarize_by_type", "layer_type"]


class SparsityMonitor:
    """Context manager counting zeros in the sparsified inputs of every ``SparseLinear``.

    >>> with SparsityMonitor(model) as mon:
    ...     model(ids)
    >>> mon.sparsity()   # {layer name: fraction of zero input entries}

    ``with mon.counting(mask):`` counts only the token positions where ``mask`` (``[batch, seq]``, bool) is
    true during the forward passes inside it: padding is then not measured.
    """

    def __init__(self, model: nn.Module):
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
        if not self.layers:
            raise UsageError("the model has no SparseLinear layers to measure; sparsify it first")
        self.zeros: dict[str, int] = defaultdict(int)
        self.total: dict[str, int] = defaultdict(int)
        self._hooks: ExitStack | None = None
        self._mask: torch.Tensor | None = None

    @contextlib.contextmanager
    def counting(self, mask: torch.Tensor) -> Iterator[None]:
        """Count only the positions where ``mask`` is true (inputs shaped ``[*mask.shape, features]``)."""
        previous, self._mask = self._mask, mask.to(torch.bool)
        try:
            yield
        finally:
            self._mask = previous

    def _hook(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        assert isinstance(module, SparseLinear)
        xs = module.sparsify_input(x)
        if self._mask is not None:
            if tuple(xs.shape[:-1]) != tuple(self._mask.shape):
                raise UsageError(
                    f"SparsityMonitor.counting: mask of shape {tuple(self._mask.shape)} does not match the input "
                    f"{tuple(xs.shape)} of {name}"
                )
            xs = xs[self._mask.to(xs.device)]
        self.zeros[name] += int((xs == 0).sum().item())
        self.total[name] += xs.numel()

    def __enter__(self) -> SparsityMonitor:
        self._hooks = ExitStack()
        self._hooks.enter_context(input_hooks(self.layers, self._hook))
        return self

    def __exit__(self, *exc) -> None:
        if self._hooks is not None:
            self._hooks.close()
            self._hooks = None

    def sparsity(self) -> dict[str, float]:
        """The fraction of weight bytes each layer skipped: zero inputs, less what a low-rank term reads."""
        return {n: self.zeros[n] / self.total[n] - self.layers[n].lowrank_share for n in self.layers if self.total[n]}

    def targets(self) -> dict[str, float | None]:
        return {n: m.target_sparsity for n, m in self.layers.items()}


def layer_type(name: str) -> str:
    """The projection type of a layer name: its last component (``up_proj``)."""
    return re.split(r"\.", name)[-1]


def summarize_by_type(per_layer: dict[str, float]) -> dict[str, float]:
    """Mean of per-layer values grouped by projection type (``up_proj``, ``down_proj``, ...)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for n, v in per_layer.items():
        groups[layer_type(n)].append(v)
    return {k: sum(v) / len(v) for k, v in groups.items()}
