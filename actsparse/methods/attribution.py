"""Calibrated attribution-based unit masks (seed 004, deployable mode) as a calibration method.

Scores every unit (attention head of an attention output projection, else input channel = MLP neuron) of each
target layer with an attribution metric averaged over the calibration set (``actsparse.attribution``), and
deactivates the ``target`` fraction of lowest-scoring units of each layer for every input: a static mask, stored
as ``SparsityParams(threshold=0, scale=0/1 per input channel)`` so it saves, loads and evaluates like any
other thresholds. Calibration uses the true next tokens of the calibration text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..attribution.scores import ScoreBatch, calibrated_scores, check_metrics, keep_masks
from ..attribution.units import unit_layers_for
from ..errors import UsageError
from ..forward import leading_batches
from ..rule import SparsityParams
from .base import MethodConfig, register_method

__all__ = ["AttributionMethod"]


@register_method("attribution")
@dataclass(frozen=True)
class AttributionMethod(MethodConfig):
    """``metric``: magnitude | gradient | gxo | ig | snip | cor_gxo; ``n_steps`` IG interpolations (streamed in
    chunks of ``ig_chunk``); ``rho`` the corrected-GxO weight (a number, or ``"auto"`` to measure the gradient
    drift); ``tokens`` limits the calibration tokens used (None = all)."""

    metric: str = "cor_gxo"
    n_steps: int = 8
    ig_chunk: int = 4
    rho: float | str = 0.5
    tokens: int | None = None

    def __post_init__(self):
        super().__post_init__()
        check_metrics([self.metric])
        if isinstance(self.n_steps, bool) or not isinstance(self.n_steps, int) or self.n_steps <= 0:
            raise UsageError(f"n_steps must be a positive number of IG interpolations, got {self.n_steps!r}")
        if not isinstance(self.ig_chunk, int) or self.ig_chunk <= 0:
            raise UsageError(f"ig_chunk must be a positive int, got {self.ig_chunk!r}")
        if self.rho != "auto" and not (isinstance(self.rho, (int, float)) and self.rho >= 0):
            raise UsageError(f"rho must be a number >= 0 or 'auto', got {self.rho!r}")
        if self.topk:
            raise UsageError("attribution masks are static per unit; '+topk' does not apply")

    def searches(self) -> bool:
        return True

    def calibrate_model(
        self, model: nn.Module, batches, targets: dict[str, float], device, *, progress: bool = True
    ) -> dict[str, SparsityParams]:
        layers = unit_layers_for(model, list(targets))
        n = leading_batches(batches, self.tokens)
        data = [ScoreBatch.from_ids(b.inputs["input_ids"], b.token_mask) for b in batches[:n]]
        scores = calibrated_scores(
            model,
            layers,
            data,
            self.metric,
            n_steps=self.n_steps,
            ig_chunk=self.ig_chunk,
            rho=self.rho,
            sparsity=dict(targets),
            progress=progress,
        )
        keep = keep_masks(scores, dict(targets))
        out = {}
        for la in layers:
            k = keep[la.name]
            out[la.name] = SparsityParams(
                0.0,
                scale=k.repeat_interleave(la.group).float(),
                info={
                    "metric": self.metric,
                    "units": la.kind,
                    "n_units": la.n_units,
                    "deactivated_units": int((~k).sum()),
                    "deactivated": [int(i) for i in (~k).nonzero().flatten()],
                },
            )
        return out
