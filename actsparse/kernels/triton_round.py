"""Rounding fp32 to a 16-bit float inside Triton kernels the way torch's ``.to`` rounds (nearest, ties to even).

Compiled kernels round so already; Triton's CPU interpreter truncates fp32 to bfloat16, so the bf16 case rounds by
its bits and gives the same result in both. Shared by the GEMV's epilogue (``triton_gemv``) and the rotation of the
decode attention (``decode_attention``): one rounding, one NaN rule.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["round_nearest_even"]


@triton.jit
def round_nearest_even(v, DTYPE: tl.constexpr):
    """fp32 ``v`` rounded to nearest-even in ``DTYPE`` (bf16, fp16; others pass through), returned as fp32.

    NaN stays NaN: NVIDIA's canonical NaN is ``0x7FFFFFFF``, and the rounding bias added to its bits carries into
    the sign (``0x80007FFF``, which masks to −0.0): a NaN output would read as zero."""
    if tl.bfloat16 == DTYPE:
        b = v.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        v = tl.where(v != v, v, b.to(tl.float32, bitcast=True))
    elif tl.float16 == DTYPE:
        v = v.to(tl.float16).to(tl.float32)
    return v
