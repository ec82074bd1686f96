"""Dispatch and the ``actsparse::sparse_gemv`` custom op.

``sparse_gemv(x, packed)`` picks, for one input row, the CUDA C++ kernel (:mod:`.cuda_gemv`: Hopper or
later, fp16/bf16 plain-layout weights, nvcc at hand) or the Triton kernel (any CUDA GPU, or the CPU under
``TRITON_INTERPRET=1``) by ``packed.backend`` (:data:`BACKENDS`; ``"auto"`` prefers CUDA C++ where it runs),
and the torch reference everywhere else, so results never depend on what is installed. Rows > 1
(prefill, small batches) take the dense route: mask, then cuBLAS.

The op is registered with ``torch.library.custom_op`` (and a fake kernel), so ``torch.compile`` treats it
as one opaque node and ``mode="reduce-overhead"`` captures it in a CUDA graph.

Split-K reduction of the Triton kernel (``reduce``; the CUDA kernel always reduces in its cluster):
``"kernel"`` (the default) sums the partial sums inside the launch (the last program of each column block
adds them up: one launch); ``"consumer"`` returns them from a second op,
``actsparse::sparse_gemv_partials``, and sums and casts in torch, for ``torch.compile`` to fuse into the
kernel that consumes the output. Both are deterministic and agree with the reference to the dtype's
rounding. Measured on an H200 (benchmarks/README.md), ``"consumer"`` is the slower one in a compiled
decode step (7.08 vs 6.53 µs per GEMV at 100% sparsity): inductor does not fold the sum into the
consumers, it adds a kernel. It stays for same-run ablations and for consumers of our own.
"""

from __future__ import annotations

import warnings
from types import ModuleType

import torch
import torch.nn.functional as F

from ..errors import InvalidTypeError, UsageError
from . import cuda_gemv
from .packing import PackedGemv
from .reference import check_norm, mask_input, rms_norm, sparse_gemv_reference

_tg: ModuleType | None
try:  # Triton is optional: CPU-only installs use the reference
    from . import triton_gemv as _tg
except Exception:  # pragma: no cover - depends on the environment
    _tg = None

__all__ = [
    "sparse_gemv",
    "masked_gemm",
    "triton_available",
    "cuda_kernel_available",
    "kernel_for",
    "REDUCTIONS",
    "BACKENDS",
]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REDUCTIONS = ("kernel", "consumer")
BACKENDS = ("auto", "cuda", "triton")
_CUDA_STATE: dict[int, str | None] = {}  # CUDA device index -> why the CUDA kernel cannot run (None: it can)


def cuda_kernel_available(device: torch.device | str, *, warn: bool = False) -> bool:
    """Whether the CUDA C++ kernel runs on ``device`` (it is built on the first call that needs it). With
    ``warn``, a GPU that could run it but cannot build it (no nvcc, a failed build) says why, once."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return False
    key = dev.index if dev.index is not None else torch.cuda.current_device()
    if key not in _CUDA_STATE:
        reason = _CUDA_STATE[key] = cuda_gemv.unavailable_reason(dev)
        if warn and reason is not None and torch.cuda.get_device_capability(dev)[0] >= 9:
            warnings.warn(f"actsparse: {reason}; the Triton sparse GEMV runs instead", stacklevel=3)
    return _CUDA_STATE[key] is None


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernel can run on ``device`` (CUDA, or any device in the interpreter)."""
    if _tg is None:
        return False
    if _tg.interpreting():
        return True
    dev = torch.device(device) if device is not None else None
    return dev is not None and dev.type == "cuda" and torch.cuda.is_available()


def kernel_for(x: torch.Tensor, packed: PackedGemv) -> str:
    """``"cuda"``, ``"triton"`` or ``"torch"``: what :func:`sparse_gemv` will run for this input."""
    rows = x.numel() // max(packed.in_features, 1)
    if rows != 1 or x.dtype not in _KERNEL_DTYPES:
        return "torch"
    if (
        packed.backend != "triton"
        and x.is_cuda
        and cuda_gemv.supports(x, packed)
        and cuda_kernel_available(x.device, warn=True)
    ):
        return "cuda"
    return "triton" if triton_available(x.device) else "torch"


def _dense_route(x: torch.Tensor, packed: PackedGemv) -> torch.Tensor:
    """Several rows on CUDA: mask in fp32 as the reference does, then one cuBLAS GEMM per layer."""
    x2 = x.reshape(-1, packed.in_features)
    y = torch.zeros(x2.shape[0], packed.padded_out, dtype=x.dtype, device=x.device)
    for i, (off, n) in enumerate(packed.segments):
        mu = packed.shift[i] if packed.shift is not None else 0.0
        xs = mask_input(x2, packed.threshold[i], mu).to(x.dtype)
        w = packed.columns(off, off + n).t() if not packed.quantized else packed.dense_weight(i).to(x.dtype)
        extra = packed.output_offset(i)
        y[:, off : off + n] = F.linear(xs, w, None if extra is None else extra.to(x.dtype))
    return y.reshape(*x.shape[:-1], packed.padded_out)


def masked_gemm(x: torch.Tensor, packed: PackedGemv) -> tuple[torch.Tensor, ...]:
    """The packed layers' outputs for one input row through **one** cuBLAS GEMM: row ``i`` of the ``[S, K]``
    operand is ``x`` masked by layer ``i``'s threshold (and shift), so each layer keeps its own mask and the
    weights are read once. The dense route of a fused group (q/k/v, gate/up) below the break-even sparsity."""
    x2 = x.reshape(1, packed.in_features)
    rows = []
    for i in range(len(packed.segments)):
        mu = packed.shift[i] if packed.shift is not None else 0.0
        rows.append(mask_input(x2, packed.threshold[i], mu))
    y = torch.cat(rows).to(x.dtype) @ packed.weight_t  # [S, N_pad]
    outs = []
    for i, (off, n) in enumerate(packed.segments):
        yi = y[i, off : off + n]
        extra = packed.output_offset(i)
        outs.append((yi if extra is None else yi + extra.to(x.dtype)).reshape(*x.shape[:-1], n))
    return tuple(outs)


def _run(x: torch.Tensor, packed: PackedGemv) -> torch.Tensor:
    kind = kernel_for(x, packed)
    if packed.backend == "cuda" and kind != "cuda" and x.numel() == packed.in_features:
        why = cuda_gemv.unavailable_reason(x.device) if x.is_cuda else f"the input is on {x.device}"
        raise UsageError(
            f"backend='cuda': the CUDA sparse GEMV cannot run this call ({why or 'a layout, dtype or shape it does not take'}); "
            "use backend='auto'"
        )
    if kind == "cuda":
        return cuda_gemv.sparse_gemv_cuda(x, packed).reshape(*x.shape[:-1], packed.padded_out)
    if kind == "triton":
        assert _tg is not None  # kernel_for picks Triton only where triton_available(), which needs _tg
        return _tg.sparse_gemv_triton(x, packed).reshape(*x.shape[:-1], packed.padded_out)
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        return _dense_route(x, packed)
    return sparse_gemv_reference(x, packed)


@torch.library.custom_op("actsparse::sparse_gemv", mutates_args=())
def _sparse_gemv_op(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    threshold: torch.Tensor,
    shift: torch.Tensor | None,
    wsum: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    zero: torch.Tensor | None,
    segments: list[int],
    backend: str = "auto",
    gate: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 0.0,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    packed = _unflatten(weight_t, threshold, shift, wsum, bias, scale, zero, segments, backend)
    norm = None if norm_weight is None else (norm_weight, norm_eps)
    if kernel_for(x, packed) == "cuda" and (gate is not None or norm is not None or residual is not None):
        # silu(gate) * x or the RMSNorm of x formed as the kernel loads its input, the residual added as it writes
        flat = None if residual is None else residual.reshape(-1)
        y = cuda_gemv.sparse_gemv_cuda(x, packed, gate=gate, norm=norm, residual=flat)
        return y.reshape(*x.shape[:-1], packed.padded_out)
    y = _run(_formed_input(x, gate, norm), packed)  # the other kernels take the formed input
    return y if residual is None else residual + y


def _formed_input(x: torch.Tensor, gate: torch.Tensor | None, norm: tuple[torch.Tensor, float] | None) -> torch.Tensor:
    """The GEMV's input: ``silu(gate) * x`` with a gate, ``rms_norm(x)`` with a norm, else ``x``."""
    if gate is not None:
        return F.silu(gate) * x
    return x if norm is None else rms_norm(x, *norm)


def _unflatten(
    weight_t, threshold, shift, wsum, bias, scale, zero, segments: list[int], backend: str = "auto"
) -> PackedGemv:
    """The ``PackedGemv`` a custom op received as tensors and a flat ``[start, n, start, n, ...]`` list."""
    segs = tuple((segments[i], segments[i + 1]) for i in range(0, len(segments), 2))
    return PackedGemv(weight_t, segs, threshold, shift, wsum, bias, scale, zero, backend)


def _padded_out(weight_t: torch.Tensor) -> int:
    return weight_t.shape[-1] * (weight_t.shape[0] if weight_t.dim() == 3 else 1)


@_sparse_gemv_op.register_fake
def _(
    x,
    weight_t,
    threshold,
    shift,
    wsum,
    bias,
    scale,
    zero,
    segments,
    backend="auto",
    gate=None,
    norm_weight=None,
    norm_eps=0.0,
    residual=None,
):
    return x.new_empty(*x.shape[:-1], _padded_out(weight_t))


@torch.library.custom_op("actsparse::sparse_gemv_partials", mutates_args=())
def _sparse_gemv_partials_op(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    threshold: torch.Tensor,
    shift: torch.Tensor | None,
    wsum: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    zero: torch.Tensor | None,
    segments: list[int],
    split: int,
) -> torch.Tensor:
    assert _tg is not None  # only called where kernel_for() picked Triton
    packed = _unflatten(weight_t, threshold, shift, wsum, bias, scale, zero, segments)
    config = _tg.launch_config(packed, x.device)
    if config.split_k != split:
        raise UsageError(f"sparse_gemv_partials: the launch rule splits K {config.split_k} ways, not {split}")
    return _tg.sparse_gemv_triton(x, packed, config, partials=True)


@_sparse_gemv_partials_op.register_fake
def _(x, weight_t, threshold, shift, wsum, bias, scale, zero, segments, split):
    return x.new_empty(split, _padded_out(weight_t), dtype=torch.float32)


def _check_input(
    x: torch.Tensor,
    packed: PackedGemv,
    gate: torch.Tensor | None,
    norm: tuple[torch.Tensor, float] | None = None,
    residual: torch.Tensor | None = None,
) -> None:
    if gate is not None and (gate.shape != x.shape or gate.dtype != x.dtype or gate.device != x.device):
        raise UsageError(
            f"gate and up must have one shape, dtype and device, got {tuple(gate.shape)} {gate.dtype} "
            f"{gate.device} and {tuple(x.shape)} {x.dtype} {x.device}"
        )
    if norm is not None:
        check_norm(norm, gate, packed.in_features, x)
    want = (*x.shape[:-1], packed.padded_out)
    if residual is not None and (
        tuple(residual.shape) != want or residual.dtype != x.dtype or residual.device != x.device
    ):
        raise UsageError(
            f"residual must be a {list(want)} {x.dtype} tensor on {x.device} (the padded output's shape), got "
            f"{tuple(residual.shape)} {residual.dtype} on {residual.device}"
        )
    if packed.backend not in BACKENDS:
        raise UsageError(f"packed.backend must be one of {', '.join(BACKENDS)}, got {packed.backend!r}")
    if x.shape[-1] != packed.in_features:
        raise UsageError(f"input has {x.shape[-1]} features, the packed weights expect {packed.in_features}")
    if x.dtype not in _KERNEL_DTYPES:
        raise InvalidTypeError(f"sparse_gemv supports float16, bfloat16 and float32 inputs, got {x.dtype}")
    if x.device != packed.weight_t.device:
        raise UsageError(f"input on {x.device}, packed weights on {packed.weight_t.device}: move one of them")


def sparse_gemv(
    x: torch.Tensor,
    packed: PackedGemv,
    *,
    reduce: str = "kernel",
    gate: torch.Tensor | None = None,
    norm: tuple[torch.Tensor, float] | None = None,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Outputs ``(y_0, ...)`` of the packed layers for inputs ``x[..., K]``, each ``[..., out_i]``.

    One kernel launch for all packed layers when ``x`` is one row on CUDA; see :mod:`.packing` for the
    exact semantics (threshold in the activation dtype, shift folded into the bias, fp32 accumulation).
    ``reduce`` picks where the split-K partial sums are added (module docstring).
    ``gate`` (a gated MLP's down projection, ``x`` its up projection): the input is ``silu(gate) * x``, each
    product rounded to the dtype as torch rounds ``act_fn(gate) * up``; the CUDA C++ kernel forms it as it
    loads its input (no elementwise kernel before it), elsewhere it is formed first.
    ``norm=(weight, eps)`` (a pre-norm decoder layer's projections, ``x`` the residual stream): the input is
    :func:`~actsparse.kernels.reference.rms_norm` of ``x`` (transformers' ``LlamaRMSNorm``), formed by the CUDA
    C++ kernel as it loads ``x``, elsewhere first. ``residual`` (``[..., N_pad]``, the padded output's shape):
    the output is ``residual + y``, rounded as torch rounds that sum; the CUDA C++ kernel adds it as it writes.
    """
    if reduce not in REDUCTIONS:
        raise UsageError(f"reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    _check_input(x, packed, gate, norm, residual)
    segs = [v for seg in packed.segments for v in seg]
    args = (x, packed.weight_t, packed.threshold, packed.shift, packed.wsum, packed.bias, packed.scale, packed.zero)
    if reduce == "consumer" and kernel_for(x, packed) == "triton":  # (the CUDA kernel reduces in its cluster)
        x = _formed_input(x, gate, norm)
        assert _tg is not None  # kernel_for picks Triton only where triton_available(), which needs _tg
        split = _tg.launch_config(packed, x.device).split_k
        part = torch.ops.actsparse.sparse_gemv_partials(x, *args[1:], segs, split)
        y = (part.sum(0) if split > 1 else part[0]).to(x.dtype).reshape(*x.shape[:-1], packed.padded_out)
        if residual is not None:
            y = residual + y
    else:
        nw, eps = (None, 0.0) if norm is None else (norm[0], float(norm[1]))
        y = torch.ops.actsparse.sparse_gemv(*args, segs, packed.backend, gate, nw, eps, residual)
    return packed.split(y)
