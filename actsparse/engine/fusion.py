"""Dense projections that read one input, run as one GEMM: q/k/v and gate/up of plain ``nn.Linear`` layers.

Hugging Face attention calls ``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)`` one by one; a batch-1 decode step then
launches three small GEMVs where one over the concatenated weight streams the same bytes with fewer launches
and better bandwidth (gpt-fast and vLLM fuse them the same way). :func:`fuse_projections` gives each such group
(:data:`~actsparse.kernels.SHARED_INPUT_GROUPS`) one ``[Σ out, in]`` weight and makes every member's weight a
row-slice *view* of it (one copy of the weights, as before; none at all when they are adjacent already, as
the transposed views of weights packed by :func:`actsparse.kernels.enable_kernels` are; other non-contiguous
weights, and layers marked ``_fuse_no_copy`` (the dense view of a sparse model shares its weights with the
sparse layers), are fused only where no copy is needed),
then the first member called with an input computes all outputs and leaves the others' for them, the
mechanism :func:`actsparse.kernels.enable_kernels` uses for packed sparse layers.

Only plain dense layers take part: ``type(m) is nn.Linear``, dense fp16/bf16/fp32 weights (no tensor
subclass such as torchao's int8), same ``in_features``, dtype and device, all or none with a bias, no hooks
and no accelerate dispatch. Sparse layers (``SparseLinear``) are the kernels' business. The result equals
the layers' own ``F.linear`` up to the GEMM's summation order; with gradients enabled (training) or after a
member's weight was replaced, the member runs alone. :func:`unfuse_projections` restores the plain forwards and separate weights.
"""

from __future__ import annotations

import types
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.linear import SharedInput, shared_input_group
from ..weights import weight_key

__all__ = ["fuse_projections", "unfuse_projections", "fused_groups"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class _Group(SharedInput):
    """One fused group: the concatenated weight (and bias), the output sizes, the outputs not yet taken."""

    def __init__(self, names: tuple[str, ...], weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int]):
        super().__init__(names)
        self.weight, self.bias, self.sizes = weight, bias, sizes


def _eligible(m: nn.Module | None) -> bool:
    return (
        type(m) is nn.Linear
        and type(m.weight.data) is torch.Tensor
        and m.weight.dtype in _DTYPES
        and m.weight.device.type != "meta"
        and not (m._forward_hooks or m._forward_pre_hooks)
        and getattr(m, "_hf_hook", None) is None
    )


def _adjacent_rows(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The ``[Σ rows, cols]`` view that the 2-D ``tensors`` already form as consecutive row blocks of one tensor
    (same storage and strides: separate contiguous weights laid end to end, or the layers' transposed views
    of a packed ``weight_t``), else None."""
    first = tensors[0]
    storage, stride, size = first.untyped_storage().data_ptr(), first.stride(), first.element_size()
    expect = first.data_ptr()
    for t in tensors:
        if t.untyped_storage().data_ptr() != storage or t.stride() != stride or t.data_ptr() != expect:
            return None
        expect += t.shape[0] * stride[0] * size
    return first.as_strided((sum(t.shape[0] for t in tensors), *first.shape[1:]), stride)


def _fused_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    group, i = self._fused
    if (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)) or (
        not torch.compiler.is_compiling() and self._fused_from != weight_key(self.weight)
    ):
        return F.linear(x, self.weight, self.bias)  # training, or a weight replaced since fusing: alone
    return group.output(i, x, lambda: F.linear(x, group.weight, group.bias).split(group.sizes, dim=-1))


def _candidates(model: nn.Module) -> list[tuple[tuple[str, ...], list[nn.Linear]]]:
    """Eligible groups: all members present, plain, with the same input size, dtype, device and bias use."""
    modules = dict(model.named_modules())
    out = []
    for name in modules:
        group = shared_input_group(modules, name)
        if group is None or not all(_eligible(m) for m in group[1]):
            continue
        members = cast("list[nn.Linear]", group[1])
        if len({(m.in_features, m.weight.dtype, m.weight.device, m.bias is None) for m in members}) == 1:
            out.append((group[0], members))
    return out


def _intact(members: list[nn.Linear]) -> bool:
    """Already one fused group, in this order, with every weight still the view it was given."""
    entries = [_entry(m) for m in members]
    return (
        all(e is not None for e in entries)
        and len({id(e[0]) for e in entries}) == 1
        and [e[1] for e in entries] == list(range(len(members)))
        and len(entries[0][0].sizes) == len(members)
        and all(vars(m)["_fused_from"] == weight_key(m.weight) for m in members)
    )


def fuse_projections(model: nn.Module) -> list[tuple[str, ...]]:
    """Fuse ``model``'s eligible shared-input groups (module docstring); returns the fused groups' names.

    Idempotent: calling it again keeps the groups that are still intact (same objects: a compiled step
    that traced them stays valid), re-plans the others (e.g. after some members were sparsified or a weight
    was replaced) and copies no weight that is fused already.
    """
    plan = _candidates(model)
    keep = {id(_entry(members[0])[0]) for _, members in plan if _intact(members)}
    for m in model.modules():  # members of groups that are not whole any more run alone again
        entry = _entry(m)
        if entry is not None and id(entry[0]) not in keep:
            _unfuse(m)
    fused: list[tuple[str, ...]] = []
    for full, members in plan:
        if _entry(members[0]) is not None:
            fused.append(full)
            continue  # intact, kept
        weights = [m.weight.detach() for m in members]
        biases = None if members[0].bias is None else [cast(torch.Tensor, m.bias).detach() for m in members]
        weight = _adjacent_rows(weights)
        bias = None if biases is None else _adjacent_rows(biases)
        if weight is None or (biases is not None and bias is None):
            if not all(w.is_contiguous() for w in weights) or any(vars(m).get("_fuse_no_copy") for m in members):
                continue  # views of something else, or weights another module uses (a dense view): never move
            with torch.no_grad():  # one copy, then every weight a view into it (the old ones are freed)
                weight = torch.cat(weights)
                bias = None if biases is None else torch.cat(biases)
            off = 0
            for m in members:
                n = m.out_features
                m.weight.data = weight[off : off + n]
                if bias is not None and m.bias is not None:
                    m.bias.data = bias[off : off + n]
                off += n
        group = _Group(full, weight, bias, [m.out_features for m in members])
        for i, m in enumerate(members):
            vars(m).update(_fused=(group, i), _fused_from=weight_key(m.weight))
            vars(m)["forward"] = types.MethodType(_fused_forward, m)  # an instance attribute: nn.Module calls it
        fused.append(full)
    return fused


def _entry(m: nn.Module) -> Any:
    return vars(m).get("_fused")


def _unfuse(m: nn.Module) -> None:
    for attr in ("forward", "_fused", "_fused_from"):
        vars(m).pop(attr, None)


def unfuse_projections(model: nn.Module) -> None:
    """Undo :func:`fuse_projections`: every member runs its own ``F.linear`` again, with a weight (and bias) of
    its own storage (a group at a time, so memory peaks at one group's extra copy), as before fusing.
    Weights shared with sparse layers (a dense view's) stay where they are."""
    for m in model.modules():
        entry = _entry(m)
        if entry is None:
            continue
        _unfuse(m)
        if not vars(m).get("_fuse_no_copy"):
            lin = cast(nn.Linear, m)
            for p in (lin.weight, lin.bias):
                if p is not None and p.untyped_storage().nbytes() > p.numel() * p.element_size():
                    p.data = p.data.clone()


def fused_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """The names of the groups fused now, in model order."""
    seen: dict[int, tuple[str, ...]] = {}
    for m in model.modules():
        entry = _entry(m)
        if entry is not None:
            seen.setdefault(id(entry[0]), entry[0].names)
    return list(seen.values())
