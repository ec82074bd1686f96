"""Weights laid out for the sparse GEMV: one input channel's weights contiguous.

A ``PackedGemv`` holds one or more Linear layers that read the same input (q/k/v, gate/up) as a single
transposed matrix ``weight_t[K, N_pad]``: row ``k`` is input channel ``k``'s weights for every output of
every layer, so a zeroed input skips one contiguous row. Each layer ("segment") starts at a column that is
a multiple of ``COLUMN_ALIGN`` (its columns padded with zeros up to that), so a kernel tile of output
columns never straddles two layers and can use one threshold per tile.

Semantics (per segment ``i`` with threshold ``τ_i`` and shift ``μ_i``, activations ``x`` of dtype ``D``)::

    d   = float32(x) - μ_i
    x'  = D(d where not (|d| <= float32(D(τ_i))) else 0)     # τ rounded to D, as SparseLinear compares
    y_i = D( x' @ W_i^T + μ_i * W_i.sum(1) + b_i )           # fp32 accumulation; μ folded into the bias

With ``μ = 0`` the mask is exactly ``SparseLinear``'s (``|x| <= τ`` in the activation dtype).
Int8 weights are ``W = (q - zero) * scale`` per output channel; the kernel accumulates ``q·x'`` and
``Σx'`` and applies ``scale``/``zero`` once per output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import UsageError
from ..weights import int8_codes

__all__ = ["PackedGemv", "pack", "quantize_int8", "COLUMN_ALIGN", "MAX_SEGMENTS"]

COLUMN_ALIGN = 256
MAX_SEGMENTS = 3
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def quantize_int8(weight: torch.Tensor, *, symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-output-channel int8 weight-only quantization of ``weight[N, K]``.

    Returns ``(q int8 [N, K], scale fp32 [N], zero fp32 [N])`` with ``W ≈ (q - zero) * scale``;
    ``zero`` is all zeros when ``symmetric``. Rows of zeros get scale 1.
    """
    if weight.dim() != 2:
        raise UsageError(f"quantize_int8 expects a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    if symmetric:
        scale = w.abs().amax(dim=1) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.zeros_like(scale)
        q = torch.clamp(torch.round(w / scale[:, None]), -127, 127)
    else:
        lo = w.amin(dim=1).clamp(max=0.0)
        hi = w.amax(dim=1).clamp(min=0.0)
        scale = (hi - lo) / 255.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.clamp(torch.round(-128.0 - lo / scale), -128, 127)
        q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], -128, 127)
    return q.to(torch.int8), scale, zero


@dataclass
class PackedGemv:
    """One or more Linear layers sharing an input, stored for the sparse GEMV (see module docstring)."""

    weight_t: torch.Tensor  # [K, N_pad] or blocked [N_pad/L, K, L]; fp16/bf16/fp32 or int8
    segments: tuple[tuple[int, int], ...]  # (first column, out_features) per layer
    threshold: torch.Tensor  # fp32 [n_segments]
    shift: torch.Tensor | None = None  # fp32 [n_segments] (μ), or None for 0
    wsum: torch.Tensor | None = None  # fp32 [N_pad], Σ_k W[n, k]; needed when shift is set
    bias: torch.Tensor | None = None  # fp32 [N_pad]
    scale: torch.Tensor | None = None  # fp32 [N_pad], int8 only
    zero: torch.Tensor | None = None  # fp32 [N_pad], int8 asymmetric only
    backend: str = "auto"  # which GEMV runs it: "auto" (CUDA C++ where it can, else Triton), "cuda", "triton"

    @property
    def in_features(self) -> int:
        return self.weight_t.shape[-2]

    @property
    def padded_out(self) -> int:
        return self.weight_t.shape[-1] * (self.weight_t.shape[0] if self.weight_t.dim() == 3 else 1)

    @property
    def layout_block(self) -> int:
        """Columns stored together per input row: ``L`` of a blocked layout, ``N_pad`` when plain."""
        return self.weight_t.shape[-1]

    def columns(self, start: int, stop: int) -> torch.Tensor:
        """``weight_t[:, start:stop]`` as ``[K, stop-start]`` (a view for the plain layout, else a copy)."""
        if self.weight_t.dim() == 2:
            return self.weight_t[:, start:stop]
        return self.weight_t.permute(1, 0, 2).reshape(self.in_features, -1)[:, start:stop]

    @property
    def quantized(self) -> bool:
        return self.weight_t.dtype == torch.int8

    @property
    def segment_starts(self) -> list[int]:
        """Column where segments 1 and 2 begin (``N_pad`` where there is none): the kernel's tile → layer map."""
        starts = [off for off, _ in self.segments[1:]]
        return (starts + [self.padded_out] * (MAX_SEGMENTS - 1))[: MAX_SEGMENTS - 1]

    def dense_weight(self, segment: int) -> torch.Tensor:
        """Layer ``segment``'s weight ``[out, in]`` in fp32 (dequantized for int8)."""
        off, n = self.segments[segment]
        w = self.columns(off, off + n).float()
        if self.quantized:
            assert self.scale is not None  # int8 packs always carry their scales
            zero = self.zero[off : off + n] if self.zero is not None else 0.0
            w = (w - zero) * self.scale[off : off + n]
        return w.t()

    def output_offset(self, segment: int) -> torch.Tensor | None:
        """What layer ``segment`` adds to ``x' @ Wᵀ``: ``bias + μ·ΣW`` (fp32 ``[out]``), or None."""
        off, n = self.segments[segment]
        cols = slice(off, off + n)
        extra = self.bias[cols] if self.bias is not None else None
        if self.shift is not None:
            assert self.wsum is not None  # set whenever shift is (see the field comments)
            s = self.shift[segment] * self.wsum[cols]
            extra = s if extra is None else extra + s
        return extra

    def split(self, y_pad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Views of each layer's outputs in a padded output ``[..., N_pad]``."""
        return tuple(y_pad[..., off : off + n] for off, n in self.segments)


def pack(
    weights: Sequence[torch.Tensor],
    thresholds: Sequence[float] | torch.Tensor | None = None,
    *,
    shifts: Sequence[float] | torch.Tensor | None = None,
    biases: Sequence[torch.Tensor | None] | None = None,
    quantize: str | None = None,
    layout_block: int | None = COLUMN_ALIGN,
) -> PackedGemv:
    """Pack Linear weights ``[out_i, in]`` that read one input into a :class:`PackedGemv`.

    ``thresholds``/``shifts`` are one per weight (default ``-inf``/none); ``quantize`` is ``None``,
    ``"int8"`` (asymmetric, per output channel) or ``"int8-sym"``. Weights keep their dtype and device.
    Weights already compressed to per-channel int8 (:func:`actsparse.quant.compress_weights`) keep their codes.
    ``layout_block``: store ``weight_t`` blocked as ``[N_pad/L, K, L]`` (each kernel program then streams
    one contiguous region); ``None`` keeps the plain ``[K, N_pad]`` layout.
    """
    weights = list(weights)
    if not 1 <= len(weights) <= MAX_SEGMENTS:
        raise UsageError(f"pack() takes 1 to {MAX_SEGMENTS} weights sharing one input, got {len(weights)}")
    k = weights[0].shape[-1]
    dev, dtype = weights[0].device, weights[0].dtype
    for w in weights:
        if w.dim() != 2 or w.shape[1] != k:
            raise UsageError(f"weights must be 2-D [out, {k}] with the same in_features, got {tuple(w.shape)}")
        if w.dtype not in _FLOAT_DTYPES or w.dtype != dtype or w.device != dev:
            raise UsageError(f"weights must share one float dtype and device, got {w.dtype} on {w.device}")
    if layout_block is not None and (layout_block <= 0 or COLUMN_ALIGN % layout_block):
        raise UsageError(f"layout_block must divide {COLUMN_ALIGN} (e.g. 128 or 256), got {layout_block}")
    if quantize not in (None, "int8", "int8-sym"):
        raise UsageError(f"quantize must be None, 'int8' or 'int8-sym', got {quantize!r}")
    n_seg = len(weights)

    def per_segment(values, name, default):
        if values is None:
            return torch.full((n_seg,), default, dtype=torch.float32, device=dev)
        t = torch.as_tensor(values, dtype=torch.float32).reshape(-1).to(dev)
        if t.numel() != n_seg:
            raise UsageError(f"{name}: need one value per weight ({n_seg}), got {t.numel()}")
        return t.clone()

    threshold = per_segment(thresholds, "thresholds", -math.inf)
    shift = per_segment(shifts, "shifts", 0.0) if shifts is not None else None
    if shift is not None and not torch.isfinite(shift).all():
        raise UsageError("shifts must be finite")

    segments, off = [], 0
    for w in weights:
        segments.append((off, w.shape[0]))
        off += _round_up(w.shape[0], COLUMN_ALIGN)
    n_pad = off
    store_dtype = torch.int8 if quantize else dtype
    weight_t = torch.zeros(k, n_pad, dtype=store_dtype, device=dev)
    scale = torch.ones(n_pad, dtype=torch.float32, device=dev) if quantize else None
    zero = torch.zeros(n_pad, dtype=torch.float32, device=dev) if quantize == "int8" else None
    for (o, n), w in zip(segments, weights):
        codes = int8_codes(w)
        if codes is not None and quantize != ("int8" if codes[2] is not None else "int8-sym"):
            raise UsageError(
                f"weight {len(segments)} already holds {'asymmetric' if codes[2] is not None else 'symmetric'} "
                f"int8 codes; pack it with quantize={'int8' if codes[2] is not None else 'int8-sym'!r}"
            )
        if quantize:
            q, s, z = codes if codes is not None else quantize_int8(w, symmetric=quantize == "int8-sym")
            z = torch.zeros_like(s) if z is None else z
            weight_t[:, o : o + n] = q.t()
            assert scale is not None  # made above whenever quantize is set
            scale[o : o + n] = s
            if zero is not None:
                zero[o : o + n] = z
        else:
            weight_t[:, o : o + n] = w.detach().t()

    bias = None
    if biases is not None and any(b is not None for b in biases):
        if len(biases) != n_seg:
            raise UsageError(f"biases: need one entry (tensor or None) per weight ({n_seg}), got {len(biases)}")
        bias = torch.zeros(n_pad, dtype=torch.float32, device=dev)
        for (o, n), b in zip(segments, biases):
            if b is not None:
                if b.shape != (n,):
                    raise UsageError(f"bias of shape {tuple(b.shape)} does not match out_features {n}")
                bias[o : o + n] = b.detach().float()
    if layout_block is not None:
        weight_t = weight_t.reshape(k, n_pad // layout_block, layout_block).permute(1, 0, 2).contiguous()
    packed = PackedGemv(weight_t, tuple(segments), threshold, shift, None, bias, scale, zero)
    if shift is not None:
        packed.wsum = torch.zeros(n_pad, dtype=torch.float32, device=dev)
        for i, (o, n) in enumerate(segments):
            packed.wsum[o : o + n] = packed.dense_weight(i).sum(dim=1)
    return packed
