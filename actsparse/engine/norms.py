"""Pre-norm decoder layers whose RMSNorms and residual adds run inside the sparse GEMVs.

A Llama-style decoder layer computes ``h1 = h + attn(norm1(h))`` and ``h2 = h1 + mlp(norm2(h1))``. At batch-1
decode each RMSNorm (with the residual add before it, which inductor fuses into it) is a kernel of its own
between two sparse GEMVs: 64 launches per Llama-2-7B step. :func:`fuse_norms` gives such layers a forward in
which

* the q/k/v GEMV forms ``norm1(h)`` as it loads ``h`` and the gate/up GEMV ``norm2(h1)``
  (:func:`~actsparse.kernels.linear.leave_normed_outputs`: the group's outputs are computed first and left for
  the projections, which the attention and the MLP then call with the layer's ``h`` / ``h1``);
* o_proj and down_proj add the residual as they write their output (a
  :class:`~actsparse.kernels.linear.ResidualSlot`), so no add kernel is left either.

The arithmetic is transformers' (:func:`~actsparse.kernels.reference.rms_norm`, ``residual + y`` rounded as
torch rounds it); only the RMSNorm's mean square is summed in another order by the CUDA kernel. Every other call
(prefill, batches, gradients, hooks added since, a projection whose call stays dense) runs the layer's class
forward, or adds the residual in torch where a projection could not.

A layer takes part when its class forward is, instruction for instruction, Llama's (transformers 5.x, with the
cache argument named ``cache`` or ``past_key_values``; Llama, Qwen2, Mistral and other copies of it), its two
norms are Llama's RMSNorm (same forward, a weight of the hidden size and dtype), its q/k/v and gate/up
projections are packed groups (:func:`~actsparse.kernels.enable_kernels`) that the CUDA kernel runs
(``require_cuda=False``: any backend, for tests on the CPU), it has no hooks (but transformers' output-capturing
ones on the layer, or on its attention recording the weights: :func:`_hooked`), and the fused forward gives the
class forward's output on a one-token probe (bit for bit where the norm is formed in torch; to 1% where the CUDA
kernel sums the mean square). An attention that calls its projections with anything but the layer's input is
refused at the call (:class:`~actsparse.errors.UsageError`). :func:`unfuse_norms` undoes it;
:func:`fuse_norms` called again unfuses the layers that no longer qualify.
"""

from __future__ import annotations

import inspect
import types
from typing import Any, cast

import torch
import torch.nn as nn

from ..errors import UsageError
from ..kernels.linear import ResidualSlot, SharedInput, leave_normed_outputs
from ..kernels.ops import kernel_for
from .hf import bind_call, compile_form, forward_key, has_hooks

__all__ = ["fuse_norms", "unfuse_norms", "norms_fused"]


# The class forwards the fused one replaces (compared as bytecode, parameter names and defaults: forward_key), with
# the cache argument named as transformers 5.2x names it (`cache`) or as before (`past_key_values`): written out
# once, compiled for each name
_FORM = """
def forward(
    self, hidden_states, attention_mask=None, position_ids=None, {cache}=None, use_cache=False,
    position_embeddings=None, **kwargs,
):
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(
        hidden_states=hidden_states,
        attention_mask=attention_mask,
        position_ids=position_ids,
        {cache}={cache},
        use_cache=use_cache,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    hidden_states = residual + hidden_states
    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    hidden_states = residual + hidden_states
    return hidden_states
"""


def _form(cache: str) -> Any:
    return compile_form(_FORM.format(cache=cache), f"decoder layer, {cache}")


def _rms_norm(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)


_LAYER_CODES = {forward_key(_form("cache")), forward_key(_form("past_key_values"))}
_RMS_CODE = forward_key(_rms_norm)


class _Plan:
    """A fused layer's parts: its class forward's parameters, the norms, the groups, the residual slots."""

    def __init__(self, layer: nn.Module):
        fn = inspect.unwrap(type(layer).forward)
        code = fn.__code__
        self.names = code.co_varnames[1 : code.co_argcount]  # hidden_states, attention_mask, ...
        self.defaults = dict(zip(self.names[len(self.names) - len(fn.__defaults__ or ()) :], fn.__defaults__ or ()))
        attn, mlp = cast(Any, layer).self_attn, cast(Any, layer).mlp
        self.attn, self.mlp = attn, mlp
        self.norm1, self.norm2 = cast(Any, layer).input_layernorm, cast(Any, layer).post_attention_layernorm
        self.qkv, self.gate_up = _members(attn, attn.q_proj), _members(mlp, mlp.gate_proj)
        self.o_slot, self.down_slot = _slot(attn.o_proj), _slot(mlp.down_proj)
        # (owner, attribute, module) of every part the fused forward relies on: checked at each call
        self.parts = [
            (layer, "self_attn", attn),
            (layer, "mlp", mlp),
            (layer, "input_layernorm", self.norm1),
            (layer, "post_attention_layernorm", self.norm2),
            *((attn, n.rpartition(".")[2], m) for n, m in zip(_group_names(attn.q_proj), self.qkv)),
            *((mlp, n.rpartition(".")[2], m) for n, m in zip(_group_names(mlp.gate_proj), self.gate_up)),
        ]

    def current(self) -> bool:
        """Whether every part is still the module it was at fusing (none swapped since, e.g. by dense_view)."""
        return all(getattr(owner, name, None) is m for owner, name, m in self.parts)

    def key(self) -> tuple:
        return (self.names, self.o_slot, self.down_slot, *(id(m) for _, _, m in self.parts))

    def bind(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict] | None:
        """``(hidden_states, what the class forward passes to self_attn besides it)``, or None for a call it
        binds otherwise (let the class forward take it, and raise if it is wrong)."""
        bound = bind_call(self.names, args, kwargs)
        if bound is None:
            return None
        named, extra = bound
        h = named.pop("hidden_states", None)
        if not isinstance(h, torch.Tensor):
            return None
        for k, d in self.defaults.items():
            named.setdefault(k, d)
        return h, {**named, **extra}


def _group_names(lead: Any) -> tuple[str, ...]:
    return cast(SharedInput, lead._kernel_group[0]).names


def _members(owner: nn.Module, lead: Any) -> list[Any]:
    """The modules of ``lead``'s packed group, siblings under ``owner`` (None where one is missing)."""
    return [getattr(owner, n.rpartition(".")[2], None) for n in _group_names(lead)]


def _slot(proj: nn.Module) -> ResidualSlot | None:
    """The projection's residual slot, installed where its decode call adds a residual in the kernel: a lone
    packed layer on the kernel route whose output is not padded."""
    if (
        getattr(proj, "_packed", None) is None
        or getattr(proj, "_kernel_group", None) is not None
        or getattr(getattr(proj, "_kernel_route", None), "route", None) != "kernel"
        or cast(Any, proj)._packed.padded_out != cast(nn.Linear, proj).out_features
    ):
        return None
    slot = vars(proj).get("_residual_slot")
    if slot is None:
        slot = vars(proj)["_residual_slot"] = ResidualSlot()
    return slot


def _norm_of(norm: Any) -> tuple[torch.Tensor, float]:
    return norm.weight, float(norm.variance_epsilon)


def _run_fused(members: list[Any], slot: ResidualSlot | None, residual: torch.Tensor, run: Any) -> torch.Tensor:
    """``residual + run()``, where ``run`` (the attention or the MLP) takes the outputs left for the group of
    ``members`` and the projection owning ``slot`` adds the residual in its kernel if it takes it.
    Whatever happens, nothing is left behind; outputs not taken raise :class:`UsageError`."""
    shared = cast(SharedInput, members[0]._kernel_group[0])
    if slot is not None:
        slot.tensor = residual
    try:
        out = run()
    finally:
        left = residual if slot is None else slot.take()  # still there: the call stayed dense, add it here
        unclaimed = shared.unclaimed()
    if unclaimed:
        raise UsageError(
            f"{', '.join(shared.names)} were not all called with the decoder layer's input (its attention or MLP "
            "does not project it as Llama's do); call actsparse.engine.unfuse_norms(model)"
        )
    return out if left is None else residual + out


def _fused_forward(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    plan: _Plan | None = vars(self).get("_norm_plan")  # (None: unfused since, by a wrapper still calling this)
    bound = None if plan is None else plan.bind(args, kwargs)
    if (
        plan is None
        or bound is None
        or not plan.current()
        or (not torch.compiler.is_compiling() and _hooked(self))  # (compiled: fuse_norms checked them)
    ):
        return type(self).forward(self, *args, **kwargs)
    h, attn_kwargs = bound
    if (
        h.numel() != h.shape[-1]
        or (torch.is_grad_enabled() and any(t.requires_grad for t in (h, plan.norm1.weight, plan.norm2.weight)))
        or not leave_normed_outputs(plan.qkv, h, _norm_of(plan.norm1))
    ):
        return type(self).forward(self, *args, **kwargs)  # prefill, batches, a call that stays dense
    h1 = _run_fused(plan.qkv, plan.o_slot, h, lambda: plan.attn(hidden_states=h, **attn_kwargs)[0])
    if not leave_normed_outputs(plan.gate_up, h1, _norm_of(plan.norm2)):
        return h1 + plan.mlp(plan.norm2(h1))
    return _run_fused(plan.gate_up, plan.down_slot, h1, lambda: plan.mlp(h1))


def _hooked(layer: nn.Module) -> bool:
    """Hooks in ``layer`` (or accelerate's dispatch) that the fused forward would change what they see: all but
    transformers' output-capturing hooks (installed for good by a call with ``output_hidden_states`` or
    ``output_attentions``, inert in other calls) on the layer itself, whose output is the class forward's, or on
    its attention recording the weights (its output[0] carries the residual when o_proj adds it)."""
    attn = getattr(layer, "self_attn", None)
    return has_hooks(layer, lambda m, index: m is layer or (m is attn and index >= 1))


def _rms(norm: Any, hidden: int, dtype: torch.dtype) -> bool:
    w = getattr(norm, "weight", None)
    return (
        forward_key(type(norm).forward) == _RMS_CODE
        and isinstance(w, torch.Tensor)
        and tuple(w.shape) == (hidden,)
        and w.dtype == dtype
        and isinstance(getattr(norm, "variance_epsilon", None), (int, float))
    )


def _grouped(owner: Any, proj: Any, require_cuda: bool) -> bool:
    """``proj`` leads a packed group whose members are all ``owner``'s children and whose decode call the kernels
    run (the CUDA kernel with ``require_cuda``)."""
    packed, group = getattr(proj, "_packed", None), getattr(proj, "_kernel_group", None)
    if packed is None or group is None or group[1] != 0:
        return False
    members = _members(owner, proj)
    if any(getattr(m, "_kernel_group", None) != (group[0], i) for i, m in enumerate(members)):
        return False
    row = torch.empty(proj.in_features, dtype=proj.weight.dtype, device=proj.weight.device)
    return not require_cuda or kernel_for(row, packed) == "cuda"


def _candidate(layer: nn.Module, require_cuda: bool) -> bool:
    """The static conditions of the module docstring (the probe is :func:`_same_function`)."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    q, gate = getattr(attn, "q_proj", None), getattr(mlp, "gate_proj", None)
    if (
        forward_key(type(layer).forward) not in _LAYER_CODES
        or not isinstance(q, nn.Linear)
        or not isinstance(gate, nn.Linear)
        or not all(isinstance(getattr(p, n, None), nn.Module) for p, n in ((attn, "o_proj"), (mlp, "down_proj")))
        or _hooked(layer)
    ):
        return False
    hidden, dtype = q.in_features, q.weight.dtype
    return (
        gate.in_features == hidden
        and all(_rms(getattr(layer, n, None), hidden, dtype) for n in ("input_layernorm", "post_attention_layernorm"))
        and _grouped(attn, q, require_cuda)
        and _grouped(mlp, gate, require_cuda)
    )


@torch.no_grad()
def _same_function(layer: Any, fused: Any) -> bool:
    """Whether the fused forward gives the class forward's output on a seeded one-token probe (no cache): bit
    for bit where the norms are formed in torch, to 1% (relative norm) where the CUDA kernel forms them."""
    q = layer.self_attn.q_proj
    head_dim = getattr(layer.self_attn, "head_dim", None)
    if not isinstance(head_dim, int):
        return False
    gen = torch.Generator(device=q.weight.device).manual_seed(0)
    shape = (1, 1, q.in_features)
    x = torch.randn(shape, generator=gen, device=q.weight.device).to(q.weight.dtype)
    angles = torch.randn(1, 1, head_dim, generator=gen, device=q.weight.device)
    rotary = (angles.cos().to(x.dtype), angles.sin().to(x.dtype))
    try:
        own = type(layer).forward(layer, x, position_embeddings=rotary)
        got = fused(x, position_embeddings=rotary)
    except Exception:  # a layer that takes more than this (or rejects a probe): not ours to change
        return False
    if not (isinstance(own, torch.Tensor) and isinstance(got, torch.Tensor) and own.shape == got.shape):
        return False
    if kernel_for(x, q._packed) != "cuda":
        return bool(torch.equal(own, got))
    added, want = got.float() - x.float(), own.float() - x.float()  # (what attention + MLP add: x dominates)
    return bool((added - want).norm() <= 0.01 * want.norm().clamp_min(1e-30))


def fuse_norms(model: nn.Module, *, require_cuda: bool = True) -> list[str]:
    """Give ``model``'s eligible decoder layers the fused forward (module docstring); returns their names.

    Call it after :func:`~actsparse.kernels.enable_kernels` (and :func:`~actsparse.engine.fuse_glu`, whose MLP
    forward the fused layer calls). Idempotent: layers fused already and still eligible stay as they are (a
    compiled step that traced them stays valid); those no longer eligible are unfused."""
    names = []
    for name, m in model.named_modules():
        old = vars(m).get("_norm_plan")
        if old is not None:
            if _candidate(m, require_cuda):
                plan = _Plan(m)  # (parts re-read: modules swapped or kernels re-planned since)
                if plan.key() != old.key():
                    vars(m)["_norm_plan"] = plan
                names.append(name)
            else:
                _unfuse(m)
        elif _candidate(m, require_cuda):
            vars(m)["_norm_plan"] = _Plan(m)
            fused = types.MethodType(_fused_forward, m)
            if _same_function(m, fused):
                vars(m)["forward"] = fused
                names.append(name)
            else:
                _unfuse(m)
    return names


def unfuse_norms(model: nn.Module) -> None:
    """Undo :func:`fuse_norms`: every decoder layer runs its class forward again."""
    for m in model.modules():
        _unfuse(m)


def _unfuse(m: nn.Module) -> None:
    plan = vars(m).pop("_norm_plan", None)
    if plan is not None:
        if getattr(vars(m).get("forward"), "__func__", None) is _fused_forward:
            vars(m).pop("forward")  # (a forward someone wrapped around ours since, e.g. accelerate's, stays)
        for proj in (plan.attn.o_proj, plan.mlp.down_proj):
            vars(proj).pop("_residual_slot", None)


def norms_fused(model: nn.Module) -> list[str]:
    """The names of the decoder layers fused now, in model order."""
    return [n for n, m in model.named_modules() if vars(m).get("_norm_plan") is not None]
