"""Weight-aware magnitude scoring (after WINA): score_j = |x_j| · ‖W[:, j]‖₂.

An input entry matters in proportion to how far it moves the output: ``‖x_j W[:, j]‖ = |x_j|·‖W[:, j]‖``.
τ is the quantile of the score at the target sparsity, so exactly that fraction of entries is dropped
on the calibration data, but the ones dropped move the output least. The column norms are stored as the
layer's ``act_scale`` (the test is ``|x_j|·s_j <= τ``, i.e. a per-channel threshold ``τ / s_j``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..offload import layer_weight
from ..rule import SparsityParams
from ..stats import Collector, HistogramQuantile
from ..weights import dense_weight
from .base import MethodConfig, register_method

__all__ = ["WinaMethod", "column_norms", "ScoreQuantile"]


def column_norms(weight: torch.Tensor, floor: float = 1e-12) -> torch.Tensor:
    """``‖W[:, j]‖₂`` per input channel in fp32, floored so that every score weight is > 0."""
    return dense_weight(weight.detach()).float().norm(dim=0).clamp_min(floor)


class ScoreQuantile(Collector):
    """The quantile of ``|x_j|·s_j`` (``scale`` s, one weight per input channel; None: plain ``|x_j|``)."""

    def __init__(self, q: float, scale: torch.Tensor | None, bins_per_octave: int = 1024):
        self.scale = scale
        self.hist = HistogramQuantile(q, bins_per_octave)

    def update(self, x: torch.Tensor) -> None:
        score = x.float().abs()
        self.hist.update(score if self.scale is None else score * self.scale.to(x.device))

    def result(self) -> SparsityParams:
        return SparsityParams(self.hist.result(), scale=None if self.scale is None else self.scale.cpu())


@register_method("wina")
@dataclass(frozen=True)
class WinaMethod(MethodConfig):
    """Per-layer quantile of the weight-aware score ``|x_j|·‖W[:, j]‖₂`` at the target sparsity."""

    bins_per_octave: int = 1024

    def make_collector(self, layer_name, module, target_sparsity):
        return ScoreQuantile(target_sparsity, column_norms(layer_weight(module)), self.bins_per_octave)
