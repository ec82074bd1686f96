"""Route sparse Linear layers' batch-1 decode calls to the sparse GEMV.

``enable_kernels(model)`` gives sparse Linear layers (``nn.Linear`` modules with an ``act_threshold``
buffer, i.e. :class:`actsparse.SparseLinear`; this module knows them by that protocol only) a
:class:`PackedGemv` view of their weights, by three rules:

* **Eligible**: a threshold (and shift) layer without per-channel scale, top-k or low-rank term, with fp16/bf16 weights
  (or int8 codes from :func:`actsparse.quant.compress_weights`), on a device where Triton runs.
* **Fused**: layers that read one input (``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/``up_proj`` and
  the other sibling sets in :data:`SHARED_INPUT_GROUPS`) are packed together and run as **one** launch: the
  first of them called with an input computes every output and leaves the others' for them, so the
  model's own forward, which calls them one by one, launches one kernel per group.
* **Never slower than dense**: a layer (or group) whose expected sparsity is below ``min_sparsity``
  (default :data:`KERNEL_MIN_SPARSITY` for the Triton kernel; 0 for the CUDA C++ kernel and int8 codes,
  which no dense route beats) takes the dense route, as the sparse GEMV loses to cuBLAS there. A
  group on the dense route still runs as one launch where its weights can be shared (no int8, widths that
  are multiples of ``COLUMN_ALIGN``): one cuBLAS GEMM whose row ``i`` is the input masked by layer ``i``
  (:func:`~actsparse.kernels.ops.masked_gemm`), as fast as a dense model's fused q/k/v.
  The expected sparsity is the layer's calibration target (``target_sparsity``), 0 for ``τ = -inf`` and
  1 for ``τ = +inf``; a layer with a threshold but no target counts as sparse. A group's is the mean of its
  layers' weighted by ``out_features``. The rule is deterministic: the same model gives the same routes.

Where ``out_features`` is a multiple of ``COLUMN_ALIGN`` (every real LLM projection), a layer's weight
*becomes* a transposed view of the packed ``weight_t``: no second copy, and prefill's ``F.linear`` reads
the same memory (cuBLAS takes the transposed layout). Odd widths keep a padded packed copy.

After that, a packed layer uses the kernel when its input is a single row and no gradient is recorded;
everything else (prefill, batches, training) takes the usual masked ``F.linear``. Thresholds stay live: the
packed thresholds are the layers' ``act_threshold`` buffers themselves. :func:`kernel_forward` does no
Python-side checks of the weights' storage in the hot path, so it traces under
``torch.compile(fullgraph=True)``; eagerly it also checks that the weight was not replaced or edited since
packing (and then stays dense). :func:`stale_kernels` is that check for a whole model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard, cast

import torch
import torch.nn as nn

from ..errors import UsageError
from ..weights import int8_codes, weight_key
from . import cuda_gemv
from .ops import BACKENDS, cuda_kernel_available, masked_gemm, sparse_gemv, triton_available
from .packing import COLUMN_ALIGN, PackedGemv, pack
from .reference import rms_norm

__all__ = [
    "enable_kernels",
    "disable_kernels",
    "kernel_forward",
    "glu_kernel_forward",
    "kernel_routes",
    "stale_kernels",
    "KernelRoute",
    "expected_sparsity",
    "KERNEL_MIN_SPARSITY",
    "CUDA_MIN_SPARSITY",
    "INT8_MIN_SPARSITY",
    "SHARED_INPUT_GROUPS",
    "shared_input_group",
    "SharedInput",
    "ResidualSlot",
    "leave_normed_outputs",
]

_DTYPES = (torch.float16, torch.bfloat16)

# Below this expected sparsity the Triton sparse GEMV is slower than cuBLAS. Measured on an H200 (issue 16/17,
# benchmarks/README.md): 4096x14336 bf16 costs 36.0 µs at 0% and 23.4 µs at 50% against cuBLAS's 30.2 µs
# (graph-timed), i.e. break-even at ≈ 23%; on the whole Llama-2-7B decode step ×0.95 at 0% and ×1.20 at 40%.
KERNEL_MIN_SPARSITY = 0.2
# The CUDA C++ kernel (cuda_gemv) is no slower than cuBLAS even at 0% (H200, graph-timed, bf16, its launch
# rule: 4096x12288 27.1 vs 28.5 µs, 4096x22016 45.3 vs 47.2, 4096x4096 11.7 vs 13.3, 11008x4096 25.7 vs 28.0,
# 14336x4096 31.7 vs 32.1; benchmarks/results/exp_cuda_variants_h200.json), so its layers never take the dense route.
CUDA_MIN_SPARSITY = 0.0
# Int8 codes: the dense route would be the int8 weight's own matmul (torchao's: the whole Llama-2-7B decode at
# 0.45x the bf16 Decoder), while either kernel at 0% is about as fast as bf16 cuBLAS (H200, 4096x12288: Triton
# 28.1 µs, CUDA 18.2, bf16 cuBLAS 28.5; benchmarks/results/exp_cuda_int8_h200.json), so they never take it.
INT8_MIN_SPARSITY = 0.0

# Sibling Linear layers (same parent module) that HF architectures feed the same input, in call order.
SHARED_INPUT_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),  # Llama, Mistral, Qwen2/3, Gemma, Phi-3 (unfused), OPT, ...
    ("gate_proj", "up_proj"),  # Llama-style gated MLPs
    ("w1", "w3"),  # Mixtral-style experts (gate, up)
    ("query", "key", "value"),  # BERT-style attention
)


def shared_input_group(
    modules: dict[str, nn.Module], name: str
) -> tuple[tuple[str, ...], list[nn.Module | None]] | None:
    """The :data:`SHARED_INPUT_GROUPS` group led by the module called ``name``: its members' full names and
    modules (None where a sibling is missing), or None when ``name`` leads no group."""
    parent, _, leaf = name.rpartition(".")
    for group in SHARED_INPUT_GROUPS:
        if leaf == group[0]:
            names = tuple(f"{parent}.{g}" if parent else g for g in group)
            return names, [modules.get(n) for n in names]
    return None


def _is_sparse_linear(m: nn.Module) -> TypeGuard[nn.Linear]:
    return isinstance(m, nn.Linear) and "act_threshold" in m._buffers


def _kernel_rule(m: nn.Module) -> TypeGuard[nn.Linear]:
    """A sparse layer whose rule the kernels run: a threshold and maybe a shift (per-channel scale, top-k and
    low-rank layers stay on the torch path)."""
    return _is_sparse_linear(m) and not any(
        m._buffers.get(b) is not None for b in ("act_scale", "act_topk", "act_lr_u")
    )


def _eligible(m: nn.Module) -> TypeGuard[nn.Linear]:
    return _kernel_rule(m) and m.weight.dtype in _DTYPES and triton_available(m.weight.device)


def _weight_kind(w: torch.Tensor) -> tuple:
    codes = int8_codes(w)
    return (w.dtype, w.device, None if codes is None else codes[2] is not None)


def expected_sparsity(layer: nn.Module) -> float | None:
    """The fraction of inputs ``layer`` is expected to drop: its ``target_sparsity``, 0 for ``τ = -inf``,
    1 for ``τ = +inf``, else None (unknown)."""
    target = getattr(layer, "target_sparsity", None)
    if target is not None:
        return float(target)
    tau = float(cast(torch.Tensor, layer.act_threshold))
    return 0.0 if tau == -math.inf else 1.0 if tau == math.inf else None


class SharedInput:
    """The layers of one packed group: the first called with an input computes all their outputs and leaves
    the others' here (``pending``: input, its version, outputs, indices still to be taken). Outputs can also be
    left beforehand (:meth:`leave`) by a caller that computed them another way (a fused decoder layer: for the
    RMSNorm of ``x``); then every member must be called with that ``x``."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.pending: tuple | None = None
        self.left = False  # the pending outputs were left by leave(), not by a member

    def leave(self, x: torch.Tensor, outs: tuple[torch.Tensor, ...]) -> None:
        """Leave ``outs`` for the members' calls with this very ``x``."""
        self.pending, self.left = (x, _version(x), outs, tuple(range(len(outs)))), True

    def output(self, i: int, x: torch.Tensor, compute: Callable[[], tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """Member ``i``'s output for ``x``: left by a sibling called with this very ``x`` (unchanged since),
        else ``compute()`` of all outputs, whose others are left for the siblings."""
        pending = self.pending
        if pending is not None and pending[0] is x and i in pending[3] and pending[1] == _version(x):
            rest = tuple(j for j in pending[3] if j != i)
            self.pending = (pending[0], pending[1], pending[2], rest) if rest else None
            self.left = self.left and bool(rest)
            return pending[2][i]
        if self.left:
            self.pending, self.left = None, False
            raise UsageError(
                f"{self.names[i]} was called with another input than the one its outputs were computed for by a "
                "fused decoder layer (its attention or MLP does not project the layer's input as Llama's do); "
                "call actsparse.engine.unfuse_norms(model)"
            )
        outs = compute()
        self.pending = (x, _version(x), outs, tuple(j for j in range(len(outs)) if j != i))
        return outs[i]

    def unclaimed(self) -> bool:
        """Whether outputs left by :meth:`leave` were not all taken (then they are dropped)."""
        left, self.left = self.left, False
        if left:
            self.pending = None
        return left


class ResidualSlot:
    """A residual that the next kernel call of one sparse layer adds to its output as it writes it (set for one
    call by a fused decoder layer, taken by :func:`kernel_forward` / :func:`glu_kernel_forward`)."""

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None

    def take(self) -> torch.Tensor | None:
        tensor, self.tensor = self.tensor, None
        return tensor


@dataclass(frozen=True)
class KernelRoute:
    """How a sparse layer runs batch-1 decode: ``"kernel"`` (with the layers of its ``group``) or ``"dense"``."""

    route: str
    group: tuple[str, ...]
    expected_sparsity: float | None
    reason: str


def _units(model: nn.Module, fuse: bool) -> list[tuple[str, ...]]:
    """Eligible layers in packing units: shared-input groups where all members qualify, else single layers."""
    modules = dict(model.named_modules())
    eligible = [n for n, m in modules.items() if _eligible(m)]
    taken: set[str] = set()
    units: list[tuple[str, ...]] = []
    if fuse:
        for name in eligible:
            group = shared_input_group(modules, name)
            if group is None or not all(m is not None and _eligible(m) for m in group[1]):
                continue
            names, linears = group[0], cast("list[nn.Linear]", group[1])  # all present, eligible sparse Linears
            if len({m.in_features for m in linears}) == 1 and len({_weight_kind(m.weight) for m in linears}) == 1:
                units.append(names)
                taken.update(names)
    units += [(n,) for n in eligible if n not in taken]
    return units


def _unit_sparsity(layers: list[nn.Linear]) -> float | None:
    values = [expected_sparsity(m) for m in layers]
    if any(v is None for v in values):
        return None
    known = cast("list[float]", values)  # no None left (checked above)
    return sum(v * m.out_features for v, m in zip(known, layers)) / sum(m.out_features for m in layers)


def _pack_unit(layers: list[nn.Linear]) -> PackedGemv:
    weights = [m.weight for m in layers]
    codes = int8_codes(weights[0])
    quantize = None if codes is None else "int8" if codes[2] is not None else "int8-sym"
    shifts = [m._buffers.get("act_shift") for m in layers]
    has_shift = any(s is not None for s in shifts)
    packed = pack(
        [w.detach() for w in weights],
        layout_block=None,
        shifts=[float(s) if s is not None else 0.0 for s in shifts] if has_shift else None,
        biases=[m.bias.detach() if m.bias is not None else None for m in layers],
        quantize=quantize,
    )
    # live thresholds: one buffer per layer, so updates (load_thresholds, apply_thresholds) reach the kernel
    if len(layers) == 1:
        packed.threshold = cast(torch.Tensor, layers[0].act_threshold).view(1)
        if has_shift:
            shift = shifts[0]
            assert shift is not None  # the only layer, and it has a shift
            packed.shift = shift.view(1)
    if codes is None and all(m.out_features % COLUMN_ALIGN == 0 for m in layers):
        for m, (off, n) in zip(layers, packed.segments):  # share: each weight is a view of weight_t
            m.weight.data = packed.weight_t[:, off : off + n].t()
        if len(layers) == 1 and layers[0].bias is not None:
            packed.bias = layers[0].bias.detach()  # same length, read as fp32 by the kernel
    return packed


def _group_threshold_sync(layers: list[nn.Linear], packed: PackedGemv) -> None:
    """A group's packed thresholds are one tensor; make each layer's buffer a view of it, so that updating
    a layer's ``act_threshold`` in place (``fill_``/``copy_``) reaches the kernel."""
    for i, m in enumerate(layers):
        packed.threshold[i] = cast(torch.Tensor, m.act_threshold).to(packed.threshold.device)
        m._buffers["act_threshold"] = packed.threshold[i]
        shift = m._buffers.get("act_shift")
        if shift is not None and packed.shift is not None:
            packed.shift[i] = shift.to(packed.shift.device)
            m._buffers["act_shift"] = packed.shift[i]


def _fusable_dense(layers: list[nn.Linear]) -> bool:
    """A group on the dense route that can run as one masked GEMM over shared weights: several layers, no
    int8 codes, every width a multiple of ``COLUMN_ALIGN`` (their weights become views, no copy)."""
    return (
        len(layers) > 1
        and int8_codes(layers[0].weight) is None
        and all(m.out_features % COLUMN_ALIGN == 0 for m in layers)
    )


def enable_kernels(
    model: nn.Module,
    *,
    min_sparsity: float | None = None,
    fuse: bool = True,
    backend: str = "auto",
    tune: bool = False,
) -> list[str]:
    """Pack ``model``'s eligible sparse layers for the sparse GEMV; returns the names of the packed layers.

    See the module docstring for the rules: eligible layers, shared-input groups packed into one launch
    (``fuse=False`` packs every layer alone), and the dense route below ``min_sparsity``. Calling it again
    re-plans every layer (after thresholds or targets changed). Other layers are left as they are (they run
    the torch path); :func:`kernel_routes` reports the decision for every sparse layer.

    ``min_sparsity`` (default: :data:`INT8_MIN_SPARSITY` for int8 codes, :data:`CUDA_MIN_SPARSITY` for
    layers the CUDA C++ kernel runs, else :data:`KERNEL_MIN_SPARSITY`) is the expected sparsity below which a
    layer takes the dense route.
    ``backend``: ``"auto"`` runs the CUDA C++ kernel where it can (:mod:`.cuda_gemv`: compute capability
    ≥ 9.0, nvcc to build it once, fp16/bf16 weights or int8 codes) and the Triton kernel elsewhere; ``"triton"`` always the
    Triton kernel; ``"cuda"`` the CUDA kernel, refusing (before any change) a device or a layer it cannot take.
    ``tune=True``: time the CUDA kernel's tile and cluster choices on each distinct weight shape of this model,
    at its layers' mean expected sparsity (0.5 where unknown), and keep the fastest for that shape on that
    device for the rest of the process (:func:`~actsparse.kernels.cuda_gemv.tune_config`: up to 15 graph-timed
    configurations per shape, cached across processes in :func:`~actsparse.kernels.cuda_gemv.tune_cache_path`);
    without it a measured table and a launch rule choose.
    """
    if not isinstance(tune, bool):
        raise UsageError(f"tune must be True or False, got {tune!r}")
    if min_sparsity is not None and not (isinstance(min_sparsity, (int, float)) and 0.0 <= min_sparsity <= 1.0):
        raise UsageError(f"min_sparsity must be in [0, 1], got {min_sparsity!r}")
    if backend not in BACKENDS:
        raise UsageError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "triton":
        _check_cuda_backend(model, backend)
    disable_kernels(model)
    modules = dict(model.named_modules())
    names: list[str] = []
    to_tune: dict[tuple, list[Any]] = {}  # (K, N_pad, weight bytes, device) -> [a packed unit, dtype, (s, width)s]
    for unit in _units(model, fuse):
        layers: list[Any] = [modules[n] for n in unit]  # sparse Linears; their packed state is plain attributes
        sparsity = _unit_sparsity(layers)
        floor = min_sparsity
        if floor is None:
            int8 = int8_codes(layers[0].weight) is not None  # never dense: see INT8_MIN_SPARSITY
            floor = (
                INT8_MIN_SPARSITY
                if int8
                else CUDA_MIN_SPARSITY
                if _runs_cuda(layers[0], backend)
                else KERNEL_MIN_SPARSITY
            )
        dense = sparsity is not None and sparsity < floor
        if dense and not _fusable_dense(layers):
            route = KernelRoute(
                "dense", unit, sparsity, f"expected sparsity {sparsity:.3f} < {floor:g}: cuBLAS is faster there"
            )
            for m in layers:
                m._kernel_route = route
            continue
        packed = _pack_unit(layers)
        packed.backend = backend
        if len(layers) > 1:
            _group_threshold_sync(layers, packed)
        shared = SharedInput(unit) if len(layers) > 1 else None
        if dense:
            reason = f"expected sparsity {sparsity:.3f} < {floor:g}: cuBLAS is faster there; one masked GEMM"
            route = KernelRoute("dense", unit, sparsity, reason)
        else:
            route = KernelRoute("kernel", unit, sparsity, "fused launch" if shared else "one launch")
        for i, m in enumerate(layers):
            m._packed = packed
            m._packed_from = weight_key(m.weight)
            m._kernel_group = None if shared is None else (shared, i)
            m._kernel_route = route
        if not dense:  # the sparse GEMV's layers; a fused dense group is packed for its GEMM only
            names += unit
            dtype = layers[0].weight.dtype  # (a torchao int8 weight reports its activations' dtype)
            if tune and dtype in _DTYPES and _runs_cuda(layers[0], backend):
                key = (packed.in_features, packed.padded_out, packed.weight_t.element_size(), packed.weight_t.device)
                entry = to_tune.setdefault(key, [packed, dtype, []])
                entry[2].append((0.5 if sparsity is None else sparsity, sum(m.out_features for m in layers)))
    try:
        for packed, dtype, points in to_tune.values():  # one timing per shape, at its layers' mean sparsity
            mean = sum(s * w for s, w in points) / sum(w for _, w in points)
            cuda_gemv.tune_config(packed, packed.weight_t.device, mean, dtype)
    except BaseException:
        disable_kernels(model)  # nothing half-enabled
        raise
    return names


def _runs_cuda(layer: nn.Linear, backend: str) -> bool:
    """Whether ``layer``'s unit will run the CUDA C++ kernel (same conditions as ops.kernel_for at decode)."""
    return backend != "triton" and layer.in_features <= cuda_gemv.MAX_K and cuda_kernel_available(layer.weight.device)


def _check_cuda_backend(model: nn.Module, backend: str) -> None:
    """Build (or find cached) the CUDA kernel for the devices of ``model``'s eligible layers, now rather than in
    the first decode step; with ``backend="cuda"`` refuse a device or a layer it cannot take."""
    layers = {n: m for n, m in model.named_modules() if _kernel_rule(m)}  # the layers a kernel could take
    for dev in sorted({m.weight.device for m in layers.values()}, key=str):
        if backend == "cuda" and not cuda_kernel_available(dev):
            raise UsageError(f"backend='cuda': {cuda_gemv.unavailable_reason(dev)} (backend='auto' uses Triton there)")
        if backend == "auto":
            cuda_kernel_available(dev, warn=True)
    if backend == "cuda":
        for n, m in layers.items():
            if m.in_features > cuda_gemv.MAX_K:
                raise UsageError(
                    f"backend='cuda' takes layers of at most {cuda_gemv.MAX_K} inputs; {n} has {m.in_features}: "
                    "use backend='auto' (Triton for such layers)"
                )


def disable_kernels(model: nn.Module) -> None:
    """Undo :func:`enable_kernels`: contiguous ``[out, in]`` weights again, no packed state."""
    for m in model.modules():
        if not _is_sparse_linear(m):
            continue
        if getattr(m, "_packed", None) is not None:
            if int8_codes(m.weight) is None and not m.weight.is_contiguous():
                m.weight.data = m.weight.data.contiguous()
            for b in ("act_threshold", "act_shift"):  # a group's buffers were views of the packed ones
                t = m._buffers.get(b)
                if t is not None and t._base is not None:
                    m._buffers[b] = t.clone()
        for attr in ("_packed", "_packed_from", "_kernel_group", "_kernel_route"):
            setattr(m, attr, None)


def kernel_routes(model: nn.Module) -> dict[str, KernelRoute | None]:
    """For every sparse layer: its :class:`KernelRoute` from the last :func:`enable_kernels` (None: not planned,
    e.g. not eligible or kernels never enabled)."""
    return {n: getattr(m, "_kernel_route", None) for n, m in model.named_modules() if _is_sparse_linear(m)}


def stale_kernels(model: nn.Module) -> list[str]:
    """Packed layers whose weight was replaced or edited in place since packing (they would compute with
    the old weights in a compiled graph; eagerly they stay dense)."""
    return [
        n
        for n, m in model.named_modules()
        if _is_sparse_linear(m) and getattr(m, "_packed", None) is not None and m._packed_from != weight_key(m.weight)
    ]


def _version(x: torch.Tensor) -> int | None:
    if torch.compiler.is_compiling() or x.is_inference():
        return None
    return x._version


def _takes(layer: Any, x: torch.Tensor) -> bool:
    """Whether this call of a packed ``layer`` with input ``x`` may run the sparse GEMV (else: stay dense)."""
    if (
        layer._packed is None
        or x.numel() != layer.in_features
        or x.dtype != layer.weight.dtype
        or torch.is_grad_enabled()
        and (x.requires_grad or layer.weight.requires_grad)
    ):
        return False
    # eagerly: the weight was not replaced or edited since packing (else stay correct: re-run enable_kernels)
    return torch.compiler.is_compiling() or layer._packed_from == weight_key(layer.weight)


def _residual(layer: Any) -> torch.Tensor | None:
    """The residual a fused decoder layer left in ``layer``'s :class:`ResidualSlot` for this call (taken)."""
    slot = vars(layer).get("_residual_slot")
    return None if slot is None else slot.take()


def kernel_forward(layer: Any, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's output through the sparse GEMV, or ``None`` when this call should stay dense. A residual left
    in the layer's :class:`ResidualSlot` (a lone layer's) is added as the kernel writes the output."""
    if not _takes(layer, x):
        return None
    packed = layer._packed
    group = layer._kernel_group
    if layer._kernel_route.route == "dense":  # a fused group's GEMM
        return cast(SharedInput, group[0]).output(group[1], x, lambda: masked_gemm(x, packed))
    if group is None:
        return sparse_gemv(x, packed, residual=_residual(layer))[0]
    shared, i = group
    return shared.output(i, x, lambda: sparse_gemv(x, packed))


def leave_normed_outputs(members: list[Any], x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> bool:
    """Compute the outputs of the packed group whose layers are ``members`` (in the group's order) for
    ``rms_norm(x)`` (formed by the CUDA kernel as it loads ``x``) and leave them for the members' calls with ``x``
    (:meth:`SharedInput.leave`). False (nothing done) unless they are that group, whole, and every member's call
    with ``x`` would take the packed route."""
    first = members[0]
    group = getattr(first, "_kernel_group", None)
    if (
        group is None
        or len(members) != len(group[0].names)
        or any(getattr(m, "_kernel_group", None) != (group[0], i) for i, m in enumerate(members))
        or not all(_takes(m, x) for m in members)
    ):
        return False
    packed = first._packed
    if first._kernel_route.route == "dense":
        outs = masked_gemm(rms_norm(x, *norm), packed)
    else:
        outs = sparse_gemv(x, packed, norm=norm)
    cast(SharedInput, group[0]).leave(x, outs)
    return True


def glu_kernel_forward(layer: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """``layer(silu(gate) * up)`` through :func:`~actsparse.kernels.ops.sparse_gemv` with ``gate`` (the product
    formed as the CUDA kernel loads its input), or ``None`` when this call should take the layer's own forward: not a
    lone layer on the kernel route, hooks on it (they must see the product), or a call :func:`kernel_forward`
    would keep dense. A residual left in the layer's :class:`ResidualSlot` is added as the kernel writes."""
    if (
        getattr(layer, "_packed", None) is None  # a plain Linear in its place (generation's dense view)
        or not _takes(layer, up)
        or layer._kernel_group is not None
        or layer._kernel_route.route != "kernel"
        or layer._forward_hooks
        or layer._forward_pre_hooks
        or gate.shape != up.shape
        or gate.dtype != up.dtype
        or torch.is_grad_enabled()
        and gate.requires_grad  # (the op has no backward; _takes checked up)
    ):
        return None
    return sparse_gemv(up, layer._packed, gate=gate, residual=_residual(layer))[0]
