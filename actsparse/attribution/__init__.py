"""Attribution-based sparse activation for small language models (seed 004).

Units (attention heads, MLP neurons) are scored by output magnitude or gradient attributions (gradient,
gradient × output, integrated gradients, SNIP, corrected GxO) and the lowest-scoring ones of each layer are
deactivated, per input (:func:`tradeoff_curves`, ``per-input``) or with a calibrated static mask (``calibrated``;
deployable through ``sparsify_(model, SparsifyConfig(..., method=AttributionMethod(...)))``).
"""

from .curves import MODES, TARGETS, UNIT_SETS, CurvePoint, tradeoff_curves, write_curves
from .scores import (
    METRICS,
    ScoreBatch,
    UnitStats,
    calibrated_scores,
    gradient_drift,
    keep_masks,
    masked_nll,
    unit_scores,
    unit_statistics,
)
from .units import KINDS, UnitLayer, find_unit_layers, unit_layers_for

__all__ = [
    "METRICS",
    "MODES",
    "TARGETS",
    "UNIT_SETS",
    "KINDS",
    "CurvePoint",
    "ScoreBatch",
    "UnitStats",
    "UnitLayer",
    "calibrated_scores",
    "tradeoff_curves",
    "write_curves",
    "gradient_drift",
    "keep_masks",
    "masked_nll",
    "unit_scores",
    "unit_statistics",
    "find_unit_layers",
    "unit_layers_for",
]
