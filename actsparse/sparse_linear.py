"""``SparseLinear``: an ``nn.Linear`` whose small input entries are zeroed before the matmul.

The wrapper *shares* the original Linear's ``weight``/``bias`` Parameters (no copy) and holds its
sparsity parameters as fp32 buffers, so they live in ``state_dict()``:

* ``act_threshold`` τ (always);
* ``act_shift`` μ (optional, mode-centering as in SCAP): the test is on ``x - μ``, and ``μ·ΣW`` is added
  to the output so that nothing but the zeroed entries changes;
* ``act_scale`` s (optional, one weight >= 0 per input channel): the test is on the *score*
  ``|x - μ| · s_j`` instead of ``|x - μ|`` (weight-aware scoring: WINA, Sparsing Law column norms);
  with τ = 0, ``s_j ∈ {0, 1}`` is a static channel mask (attribution's calibrated unit masks);
* ``act_topk`` k (optional int): keep the ``k`` highest-scoring entries of every token instead of
  thresholding (exact per-token sparsity; τ is then unused);
* ``act_lr_u`` U ``[out, r]``, ``act_lr_v`` V ``[r, in]`` (optional, R-Sparse): the dropped entries are not lost
  but go through the rank-r approximation ``U·V`` of the weight: ``y = W x' + U V (d - x') + μ·ΣW + b``.

The rule, with ``D`` the activation dtype::

    plain (no shift, scale or top-k):  x' = x where not |x| <= D(τ)          (compared in D, as NNCF)
    otherwise:  d = float32(x) - μ;  score = |d| · s;  keep = not score <= τ' (or score in the top k)
                x' = D(d · keep);     y = x' Wᵀ + μ·ΣW + b

where ``τ' = float32(D(τ))`` without a scale (the kernels' rule) and ``τ`` itself with one. ``τ = -inf``
keeps everything; NaNs are kept. With μ = 0 and no scale the general rule equals the plain one.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import AlreadySparsifiedError, InvalidTypeError
from .kernels.linear import disable_kernels, kernel_forward
from .offload import execution_device, move_hook
from .rule import SparsityParams, drop_mask, lowrank_term, sparsify_tensor
from .weights import dense_weight, weight_key

__all__ = [
    "SparseLinear",
    "SparsityParams",
    "sparsify_tensor",
    "drop_mask",
    "sparse_layers",
    "check_not_sparsified",
    "plain_linear",
]

# a module's hooks on its calls (what a replacement module must keep firing), and all of its hooks
CALL_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)
_HOOK_DICTS = CALL_HOOK_DICTS + ("_state_dict_hooks", "_load_state_dict_pre_hooks")
BUFFERS = ("act_threshold", "act_shift", "act_scale", "act_topk", "act_lr_u", "act_lr_v")
_FLOAT_BUFFERS = ("act_threshold", "act_shift", "act_scale", "act_lr_u", "act_lr_v")


def _share_linear_state(src: nn.Linear, dst: nn.Linear) -> None:
    dst.in_features, dst.out_features = src.in_features, src.out_features
    dst.register_parameter("weight", cast(nn.Parameter, src.weight))
    dst.register_parameter("bias", src.bias)
    dst.train(src.training)
    for d in _HOOK_DICTS:  # keep user hooks attached to the layer
        if hasattr(src, d):
            setattr(dst, d, getattr(src, d))
    move_hook(src, dst)  # a model dispatched by accelerate: same execution device, same offloaded weights


def _own(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """An fp32, contiguous copy of a caller's tensor on ``device`` (safetensors saves contiguous tensors only)."""
    return t.detach().to(device, torch.float32).clone(memory_format=torch.contiguous_format)


def plain_linear(src: nn.Linear) -> nn.Linear:
    """A plain ``nn.Linear`` sharing ``src``'s parameters, hooks and accelerate hook (no copy)."""
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    _share_linear_state(src, lin)
    return lin


class SparseLinear(nn.Linear):
    """Linear layer with static activation sparsity on its input (see the module docstring)."""

    act_threshold: torch.Tensor
    # set by from_linear(): what the layer was calibrated for (kept with the layer for reports)
    target_sparsity: float | None
    method: str | None
    calibration: dict[str, Any]
    # set by actsparse.kernels.enable_kernels(): the packed weights, their identity at packing, the shared-input
    # group (one launch for q/k/v or gate/up) and the route decision
    _packed = _packed_from = _kernel_group = _kernel_route = None
    _wsum: tuple[tuple[int, int], torch.Tensor] | None = None  # (weight identity, ΣW) of a shifted layer

    def __init__(self, *args, **kwargs):  # pragma: no cover - build with from_linear
        raise InvalidTypeError("build a SparseLinear with SparseLinear.from_linear(linear, threshold)")

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        threshold: float | SparsityParams = -math.inf,
        *,
        target_sparsity: float | None = None,
        method: str | None = None,
    ) -> SparseLinear:
        if type(linear) is not nn.Linear:
            raise InvalidTypeError(
                f"SparseLinear wraps plain torch.nn.Linear layers, got {type(linear).__name__}; "
                f"exclude it with an IgnoredScope"
            )
        p = threshold if isinstance(threshold, SparsityParams) else SparsityParams(float(threshold))
        p.validate(linear.in_features, "layer", linear.out_features)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        _share_linear_state(linear, new)
        dev = execution_device(linear) or linear.weight.device  # an offloaded weight rests on meta
        new.register_buffer("act_threshold", torch.tensor(float(p.threshold), dtype=torch.float32, device=dev))
        if p.shift != 0.0:
            new.register_buffer("act_shift", torch.tensor(float(p.shift), dtype=torch.float32, device=dev))
        if p.scale is not None:
            new.register_buffer("act_scale", _own(p.scale, dev))
        if p.topk is not None:
            new.register_buffer("act_topk", torch.tensor(int(p.topk), dtype=torch.int64, device=dev))
        if p.lowrank is not None:
            new.register_buffer("act_lr_u", _own(p.lowrank[0], dev))
            new.register_buffer("act_lr_v", _own(p.lowrank[1], dev))
        new.target_sparsity = target_sparsity
        new.method = method
        new.calibration = dict(p.info)
        return new

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() convert floating buffers too; the sparsity parameters stay fp32
        # (the rule and the kernels read them so), only their device follows
        saved = {b: t for b in _FLOAT_BUFFERS if (t := self._buffers.get(b)) is not None}
        super()._apply(fn, recurse)
        for b, old in saved.items():
            new = self._buffers[b]
            if new is not None and new.dtype != old.dtype:
                self._buffers[b] = old.to(new.device)
        return self

    @property
    def params(self) -> SparsityParams:
        """This layer's :class:`SparsityParams` (copies, on CPU)."""
        g = self._buffers.get
        shift, scale, topk, u, v = g("act_shift"), g("act_scale"), g("act_topk"), g("act_lr_u"), g("act_lr_v")
        return SparsityParams(
            float(self.act_threshold),
            float(shift) if shift is not None else 0.0,
            scale.detach().cpu().clone() if scale is not None else None,
            int(topk) if topk is not None else None,
            dict(getattr(self, "calibration", {})),
            None if u is None or v is None else (u.detach().cpu().clone(), v.detach().cpu().clone()),
        )

    @property
    def is_plain(self) -> bool:
        """Only a threshold (no shift, scale or top-k): what the sparse GEMV kernels run."""
        return all(self._buffers.get(b) is None for b in BUFFERS[1:])

    def to_linear(self) -> nn.Linear:
        """The plain ``nn.Linear`` sharing this layer's parameters (and hooks)."""
        if self._packed is not None:  # weights were laid out for the sparse GEMV: back to [out, in]
            disable_kernels(self)
        return plain_linear(self)

    def sparsify_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x'``: the (shifted) input with its dropped entries zeroed, as the matmul sees it."""
        g = self._buffers.get
        topk = g("act_topk")
        return sparsify_tensor(
            x, self.act_threshold, g("act_shift"), g("act_scale"), None if topk is None else int(topk)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:  # set by actsparse.kernels.enable_kernels
            y = kernel_forward(self, x)
            if y is not None:
                return y
        u = self._buffers.get("act_lr_u")
        if u is None:
            y = F.linear(self.sparsify_input(x), self.weight, self.bias)
        else:  # the kept entries through W, the dropped ones through the low-rank U·V (R-Sparse)
            g = self._buffers.get
            topk = g("act_topk")
            shift = g("act_shift")
            drop = drop_mask(x, self.act_threshold, shift, g("act_scale"), None if topk is None else int(topk))
            d = x.float() - (0.0 if shift is None else shift)
            y = F.linear(d.masked_fill(drop, 0.0).to(x.dtype), self.weight, self.bias)
            y = y + lowrank_term(d, drop, u, cast(torch.Tensor, self._buffers["act_lr_v"])).to(y.dtype)
        shift = self._buffers.get("act_shift")
        if shift is not None:  # μ·ΣW: the centred-away part, exactly as the kernels fold it
            y = y + (shift * self._weight_sums()).to(y.dtype)
        return y

    @property
    def lowrank_share(self) -> float:
        """The fraction of the weight's bytes the low-rank term reads per token (0 without one): what measured
        sparsity subtracts, so that comparisons stay at equal bytes read."""
        v = self._buffers.get("act_lr_v")
        return (
            0.0
            if v is None
            else v.shape[0] * (self.in_features + self.out_features) / (self.in_features * self.out_features)
        )

    def _weight_sums(self) -> torch.Tensor:
        """``ΣW`` per output (fp32, dequantized), read from the weight once and again only after it changed
        (a compiled graph uses the value of its eager warm-up, as the packed kernels do)."""
        cached = self._wsum
        if torch.compiler.is_compiling():
            return cached[1] if cached is not None else dense_weight(self.weight).float().sum(dim=1)
        key = weight_key(self.weight)
        if cached is None or cached[0] != key:
            cached = self._wsum = (key, dense_weight(self.weight).detach().float().sum(dim=1))
        return cached[1]

    def extra_repr(self) -> str:
        p = self.params
        extra = f", act_threshold={p.threshold:.4g}"
        if p.shift:
            extra += f", act_shift={p.shift:.4g}"
        if p.scale is not None:
            extra += ", act_scale=[...]"
        if p.topk is not None:
            extra += f", act_topk={p.topk}"
        if p.lowrank is not None:
            extra += f", low rank {p.lowrank[1].shape[0]}"
        if self.target_sparsity is not None:
            extra += f", target_sparsity={self.target_sparsity}"
        return super().extra_repr() + extra


def check_not_sparsified(model: nn.Module, doing: str = "") -> None:
    """:class:`~actsparse.AlreadySparsifiedError` when ``model`` already has ``SparseLinear`` layers (the one
    message for every entry point that sparsifies; ``doing`` says what the user tried, e.g. "loading thresholds")."""
    existing = sparse_layers(model)
    if existing:
        raise AlreadySparsifiedError(
            f"the model is already sparsified ({len(existing)} SparseLinear layers, e.g. {next(iter(existing))!r}); "
            f"call actsparse.remove_sparsity(model) {'before ' + doing if doing else 'first'}"
        )


def sparse_layers(model: nn.Module) -> dict[str, SparseLinear]:
    """``{name: SparseLinear}`` for every sparsified layer of ``model`` (an ``InvalidTypeError`` for a non-model:
    every entry point looks at this first)."""
    if not isinstance(model, nn.Module):
        hint = " (load it first, e.g. AutoModelForCausalLM.from_pretrained(name))" if isinstance(model, str) else ""
        raise InvalidTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}{hint}")
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
