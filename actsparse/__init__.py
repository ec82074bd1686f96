"""actsparse: post-training activation sparsity for Hugging Face causal LMs."""

__version__ = "0.1.0"

from .api import (SparsifyConfig, apply_thresholds, remove_sparsity, sparse_layers,  # noqa: E402
                  sparsify_, sparsify_activations)
from .errors import (ActSparseError, AlreadySparsifiedError, CalibrationError, DatasetError,  # noqa: E402
                     ScopeError, ThresholdFileError)
from .io import from_pretrained, load_thresholds, save_pretrained, save_thresholds  # noqa: E402
from .methods import register_method, registered_methods  # noqa: E402
from .methods.quantile import QuantileMethod  # noqa: E402
from .scope import IgnoredScope, TargetScope  # noqa: E402
from .sparse_linear import SparseLinear  # noqa: E402

__all__ = [
    "__version__", "sparsify_activations", "sparsify_", "SparsifyConfig", "remove_sparsity", "sparse_layers",
    "apply_thresholds", "TargetScope", "IgnoredScope", "SparseLinear", "QuantileMethod", "register_method",
    "registered_methods", "save_thresholds", "load_thresholds", "save_pretrained", "from_pretrained",
    "ActSparseError", "ScopeError", "DatasetError", "CalibrationError", "ThresholdFileError",
    "AlreadySparsifiedError",
]
