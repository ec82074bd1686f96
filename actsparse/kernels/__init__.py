"""Sparse GEMV back end: packed weights, the torch reference, the Triton kernel and its custom op."""

from .linear import (
    CUDA_MIN_SPARSITY,
    INT8_MIN_SPARSITY,
    KERNEL_MIN_SPARSITY,
    SHARED_INPUT_GROUPS,
    KernelRoute,
    disable_kernels,
    enable_kernels,
    expected_sparsity,
    kernel_routes,
    stale_kernels,
)
from .ops import kernel_for, sparse_gemv, triton_available
from .packing import COLUMN_ALIGN, MAX_SEGMENTS, PackedGemv, pack, quantize_int8
from .reference import mask_input, sparse_gemv_reference

__all__ = [
    "PackedGemv",
    "pack",
    "quantize_int8",
    "sparse_gemv",
    "sparse_gemv_reference",
    "mask_input",
    "triton_available",
    "kernel_for",
    "enable_kernels",
    "disable_kernels",
    "kernel_routes",
    "stale_kernels",
    "expected_sparsity",
    "KernelRoute",
    "KERNEL_MIN_SPARSITY",
    "CUDA_MIN_SPARSITY",
    "INT8_MIN_SPARSITY",
    "SHARED_INPUT_GROUPS",
    "COLUMN_ALIGN",
    "MAX_SEGMENTS",
]
