"""actsparse: post-training activation sparsity for Hugging Face causal LMs."""

from ._version import __version__
from .quiet import quiet_torchao

with quiet_torchao():  # the first import of transformers' model classes (below) imports torchao when installed
    import transformers.modeling_utils  # noqa: F401

from .api import SparsifyConfig, apply_thresholds, remove_sparsity, sparse_layers, sparsify_, sparsify_activations
from .engine import Decoder
from .errors import (
    ActSparseError,
    AlreadySparsifiedError,
    CalibrationError,
    ConfigFileError,
    DatasetError,
    DecoderError,
    ScopeError,
    ThresholdFileError,
)
from .generation import compare_generate, generate
from .input_rotation import InputRotationResult, rotate_inputs
from .io import (
    from_pretrained,
    import_scap_json,
    load_thresholds,
    read_input_rotation,
    read_rotation,
    save_pretrained,
    save_thresholds,
)
from .methods import register_method, registered_methods
from .methods.attribution import AttributionMethod
from .methods.quantile import QuantileMethod
from .methods.rsparse import RSparseMethod
from .methods.scap import ScapMethod, export_scap_json, parse_scap_config
from .methods.sparsing_law import SparsingLawMethod
from .methods.teal import TealMethod
from .methods.wina import WinaMethod
from .moe import UnsupportedExpertsError, fuse_experts, unfuse_experts
from .quant import compress_weights
from .rotation import RotationResult, rotate_residual
from .scope import IgnoredScope, TargetScope
from .sparse_linear import SparseLinear, SparsityParams

__all__ = [
    "__version__",
    "sparsify_activations",
    "sparsify_",
    "SparsifyConfig",
    "remove_sparsity",
    "sparse_layers",
    "apply_thresholds",
    "TargetScope",
    "IgnoredScope",
    "SparseLinear",
    "SparsityParams",
    "QuantileMethod",
    "ScapMethod",
    "TealMethod",
    "WinaMethod",
    "SparsingLawMethod",
    "AttributionMethod",
    "RSparseMethod",
    "parse_scap_config",
    "export_scap_json",
    "import_scap_json",
    "register_method",
    "registered_methods",
    "compress_weights",
    "rotate_residual",
    "rotate_inputs",
    "InputRotationResult",
    "RotationResult",
    "unfuse_experts",
    "fuse_experts",
    "UnsupportedExpertsError",
    "generate",
    "compare_generate",
    "save_thresholds",
    "load_thresholds",
    "read_rotation",
    "read_input_rotation",
    "save_pretrained",
    "from_pretrained",
    "ActSparseError",
    "ScopeError",
    "DatasetError",
    "CalibrationError",
    "ThresholdFileError",
    "AlreadySparsifiedError",
    "ConfigFileError",
    "DecoderError",
    "Decoder",
]
# lm-eval is an optional extra: `from actsparse.eval.lmeval import run_lm_eval`.
