"""Magnitude quantile thresholds: τ = Quantile(|x|, target sparsity) (NNCF, TEAL uniform)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from ..stats import EMAQuantile, HistogramQuantile
from .base import MethodConfig, register_method

__all__ = ["QuantileMethod"]

STATISTICS = ("histogram", "ema")


@register_method("quantile")
@dataclass(frozen=True)
class QuantileMethod(MethodConfig):
    """Per-layer quantile of |x| at the target sparsity.

    ``statistic="histogram"`` (default): one quantile over all calibration tokens, exact to 0.07%.
    ``statistic="ema"``: NNCF's rule, per-batch quantiles combined by a bias-corrected EMA
    with decay ``ema_alpha`` (NNCF: 0.2). Use it for parity with NNCF results.
    """

    statistic: str = "histogram"
    ema_alpha: float = 0.2
    bins_per_octave: int = 1024

    def __post_init__(self):
        super().__post_init__()
        if self.statistic not in STATISTICS:
            raise UsageError(f"unknown statistic {self.statistic!r}; choose one of {', '.join(STATISTICS)}")
        if not 0.0 < self.ema_alpha < 1.0:
            raise UsageError(f"ema_alpha must be in (0, 1), got {self.ema_alpha}")

    def make_collector(self, layer_name, module, target_sparsity):
        if self.statistic == "ema":
            return EMAQuantile(target_sparsity, self.ema_alpha)
        return HistogramQuantile(target_sparsity, self.bins_per_octave)
