"""Exceptions raised by actsparse. Each message says what is wrong and how to fix it."""

__all__ = [
    "ActSparseError",
    "ScopeError",
    "DatasetError",
    "CalibrationError",
    "ThresholdFileError",
    "AlreadySparsifiedError",
    "ConfigFileError",
    "DecoderError",
]


class ActSparseError(Exception):
    """Base class for all actsparse errors."""


class ScopeError(ActSparseError, ValueError):
    """A target or ignored scope is invalid or resolves to nothing usable."""


class DatasetError(ActSparseError, ValueError):
    """The calibration/evaluation dataset is empty or has items of an unsupported type."""


class CalibrationError(ActSparseError, RuntimeError):
    """Calibration could not produce valid thresholds (e.g. NaN/inf activations)."""


class ThresholdFileError(ActSparseError, ValueError):
    """A thresholds file is unreadable, corrupted, or was made for another model."""


class AlreadySparsifiedError(ActSparseError, RuntimeError):
    """The model already carries actsparse wrappers."""


class ConfigFileError(ActSparseError, ValueError):
    """A JSON sparsify config is unreadable, of another format or version, or holds invalid values."""


class DecoderError(ActSparseError, ValueError):
    """The decoder cannot run this model or these inputs (bad sizes, a graph that cannot be captured)."""
