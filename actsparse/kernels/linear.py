"""Route ``SparseLinear`` batch-1 decode calls to the sparse GEMV.

``enable_kernels(model)`` gives every ``SparseLinear`` a :class:`PackedGemv` view of its weights. Where
``out_features`` is a multiple of ``COLUMN_ALIGN`` (every real LLM projection), the layer's weight
*becomes* a transposed view of the packed ``weight_t``: no second copy, and prefill's ``F.linear`` reads
the same memory (cuBLAS takes the transposed layout). Odd widths keep a padded packed copy.

After that, ``SparseLinear.forward`` uses the kernel when the input is a single row on a device the
kernel supports and no gradient is being recorded; everything else (prefill, batches, training, CPU)
takes the usual masked ``F.linear``. Thresholds stay live: the packed threshold is the layer's
``act_threshold`` buffer itself.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..quant import int8_codes
from .ops import sparse_gemv, triton_available
from .packing import COLUMN_ALIGN, PackedGemv, pack

__all__ = ["enable_kernels", "disable_kernels", "kernel_forward"]

_DTYPES = (torch.float16, torch.bfloat16)


def _weight_key(w: torch.Tensor) -> tuple[int, int]:
    """Identity of a weight's storage and its in-place edits (of the int8 codes for compressed weights)."""
    codes = int8_codes(w)
    t = w if codes is None else codes[0]
    return t.data_ptr(), t._version


def _pack_layer(layer) -> PackedGemv:
    w = layer.weight
    shift = layer._buffers.get("act_shift")
    codes = int8_codes(w)
    quantize = None if codes is None else "int8" if codes[2] is not None else "int8-sym"
    packed = pack([w.detach()], layout_block=None, shifts=None if shift is None else [float(shift)],
                  biases=[layer.bias.detach()] if layer.bias is not None else None, quantize=quantize)
    packed.threshold = layer.act_threshold.view(1)  # live: load_thresholds/apply_thresholds update it
    if shift is not None:
        packed.shift = shift.view(1)
    if codes is None and layer.out_features % COLUMN_ALIGN == 0:  # share: the weight is a view of weight_t
        layer.weight.data = packed.weight_t.t()
        if layer.bias is not None:
            packed.bias = layer.bias.detach()  # same length, read as fp32 by the kernel
    return packed


def enable_kernels(model: nn.Module) -> list[str]:
    """Pack every eligible ``SparseLinear`` of ``model`` for the sparse GEMV; returns the layer names.

    Eligible: threshold (and shift) layers, without a per-channel scale or top-k, with fp16/bf16 weights
    (or int8 weights from :func:`actsparse.quant.compress_weights` with fp16/bf16 activations: the int8
    sparse GEMV, from a packed copy of the codes) on a device where Triton runs (CUDA; any device under
    ``TRITON_INTERPRET=1``). Other layers are left as they are (they run the torch path).
    """
    from ..sparse_linear import SparseLinear

    names = []
    for name, m in model.named_modules():
        if (isinstance(m, SparseLinear) and m._buffers.get("act_scale") is None and m._buffers.get("act_topk") is None
                and m.weight.dtype in _DTYPES and triton_available(m.weight.device)):
            if getattr(m, "_packed", None) is None:
                m._packed = _pack_layer(m)
                m._packed_from = _weight_key(m.weight)
            names.append(name)
    return names


def disable_kernels(model: nn.Module) -> None:
    """Undo :func:`enable_kernels`: contiguous ``[out, in]`` weights again, no packed state."""
    from ..sparse_linear import SparseLinear

    for m in model.modules():
        if isinstance(m, SparseLinear) and getattr(m, "_packed", None) is not None:
            if int8_codes(m.weight) is None and not m.weight.is_contiguous():
                m.weight.data = m.weight.data.contiguous()
            m._packed = m._packed_from = None


def kernel_forward(layer, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's output through the sparse GEMV, or ``None`` when this call should stay dense."""
    packed = getattr(layer, "_packed", None)
    if (packed is None or x.numel() != layer.in_features or x.dtype != layer.weight.dtype
            or torch.is_grad_enabled() and (x.requires_grad or layer.weight.requires_grad)):
        return None
    if layer._packed_from != _weight_key(layer.weight):
        return None  # the weight was replaced or edited since packing: stay correct (re-run enable_kernels)
    return sparse_gemv(x, packed)[0]
