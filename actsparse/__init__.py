"""actsparse: post-training activation sparsity for Hugging Face causal LMs."""

__version__ = "0.1.0"

from .api import (SparsifyConfig, apply_thresholds, remove_sparsity, sparse_layers,  # noqa: E402
                  sparsify_, sparsify_activations)
from .errors import (ActSparseError, AlreadySparsifiedError, CalibrationError, ConfigFileError,  # noqa: E402
                     DatasetError, ScopeError, ThresholdFileError)
from .io import from_pretrained, load_thresholds, save_pretrained, save_thresholds  # noqa: E402
from .generate import compare_generate, generate  # noqa: E402
from .methods import register_method, registered_methods  # noqa: E402
from .methods.attribution import AttributionMethod  # noqa: E402
from .methods.quantile import QuantileMethod  # noqa: E402
from .methods.scap import ScapMethod, export_scap_json, import_scap_json, parse_scap_config  # noqa: E402
from .methods.sparsing_law import SparsingLawMethod  # noqa: E402
from .methods.teal import TealMethod  # noqa: E402
from .methods.wina import WinaMethod  # noqa: E402
from .moe import UnsupportedExpertsError, fuse_experts, unfuse_experts  # noqa: E402
from .quant import compress_weights  # noqa: E402
from .scope import IgnoredScope, TargetScope  # noqa: E402
from .sparse_linear import SparseLinear, SparsityParams  # noqa: E402

__all__ = [
    "__version__", "sparsify_activations", "sparsify_", "SparsifyConfig", "remove_sparsity", "sparse_layers",
    "apply_thresholds", "TargetScope", "IgnoredScope", "SparseLinear", "SparsityParams", "QuantileMethod",
    "ScapMethod", "TealMethod", "WinaMethod", "SparsingLawMethod", "AttributionMethod", "parse_scap_config",
    "export_scap_json", "import_scap_json", "register_method", "registered_methods", "compress_weights",
    "unfuse_experts", "fuse_experts", "UnsupportedExpertsError", "generate", "compare_generate", "save_thresholds", "load_thresholds", "save_pretrained", "from_pretrained",
    "ActSparseError", "ScopeError", "DatasetError", "CalibrationError", "ThresholdFileError",
    "AlreadySparsifiedError", "ConfigFileError",
]
# lm-eval is an optional extra: `from actsparse.eval.lmeval import run_lm_eval`.
