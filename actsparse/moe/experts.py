"""The per-expert modules: :class:`UnfusedExperts` runs a fused experts module's experts as plain Linears
(:class:`ExpertMLP`) whose weights are views of the fused 3D storage (see :mod:`actsparse.moe`)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import cast

import torch
import torch.nn as nn

from ..sparse_linear import CALL_HOOK_DICTS

__all__ = ["ExpertMLP", "UnfusedExperts", "PROJECTIONS"]

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _expert_views(fused: nn.Module, i: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(gate, up, down)`` weight views of every expert of a fused module (``i``: intermediate size)."""
    gu, dn = cast(torch.Tensor, fused.gate_up_proj).data, cast(torch.Tensor, fused.down_proj).data
    return [(gu[e, :i], gu[e, i:], dn[e]) for e in range(gu.shape[0])]


def _view_linear(weight: torch.Tensor, requires_grad: bool) -> nn.Linear:
    """A bias-free ``nn.Linear`` whose weight Parameter aliases ``weight`` (no copy, no allocation)."""
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.out_features, lin.in_features = weight.shape
    lin.register_parameter("weight", nn.Parameter(weight, requires_grad=requires_grad))
    lin.register_parameter("bias", None)
    return lin


class ExpertMLP(nn.Module):
    """One expert's ``gate_proj``, ``up_proj`` and ``down_proj`` Linears (run by :class:`UnfusedExperts`)."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj


def _drop_expert_weights(module: UnfusedExperts, state_dict, prefix: str, local_metadata) -> None:
    """State-dict post-hook: the per-expert weights are saved as the fused tensors instead."""
    for e in range(module.num_experts):
        for proj in PROJECTIONS:
            state_dict.pop(f"{prefix}{e}.{proj}.weight", None)


class UnfusedExperts(nn.Module):
    """A fused experts module seen as one :class:`ExpertMLP` of plain Linears per expert.

    Build it with :func:`unfuse_experts`. The original module is kept (not as a submodule) and its
    Parameters hold the weights: every expert Linear's weight is a view of them while they are *tied*
    (the normal state). If an expert's weight is replaced or re-laid-out (``enable_kernels``), the
    per-expert weights are the truth and the fused tensors are rebuilt from them when needed.
    """

    _fused: nn.Module

    def __init__(self, fused: nn.Module):
        super().__init__()
        object.__setattr__(self, "_fused", fused)  # restored by fuse(); not a submodule
        gu, dn = cast(torch.Tensor, fused.gate_up_proj), cast(torch.Tensor, fused.down_proj)
        self.num_experts, two_i, self.hidden_dim = gu.shape
        self.intermediate_dim = two_i // 2
        for e, (g, u, d) in enumerate(self._views()):
            self.add_module(
                str(e),
                ExpertMLP(
                    _view_linear(g, gu.requires_grad),
                    _view_linear(u, gu.requires_grad),
                    _view_linear(d, dn.requires_grad),
                ),
            )
        self.act_fn = cast("Callable[[torch.Tensor], torch.Tensor]", fused.act_fn)
        self.train(fused.training)
        for hooks in CALL_HOOK_DICTS:  # hooks on the experts module keep firing
            if hasattr(fused, hooks):
                setattr(self, hooks, getattr(fused, hooks))
        self.register_state_dict_post_hook(_drop_expert_weights)

    def __len__(self) -> int:
        return self.num_experts

    def __getitem__(self, e: int) -> ExpertMLP:
        return cast(ExpertMLP, self._modules[str(int(e))])

    def __iter__(self) -> Iterator[ExpertMLP]:
        return (self[e] for e in range(self.num_experts))

    # --- weights: views of the fused storage -------------------------------------------------------
    def _views(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return _expert_views(self._fused, self.intermediate_dim)

    def _weights(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return [(ex.gate_proj.weight, ex.up_proj.weight, ex.down_proj.weight) for ex in self]

    def is_tied(self) -> bool:
        """Is every expert weight still a view of the fused storage?"""
        for ws, vs in zip(self._weights(), self._views()):
            for w, v in zip(ws, vs):
                if (
                    w.device != v.device
                    or w.dtype != v.dtype
                    or w.shape != v.shape
                    or w.stride() != v.stride()
                    or w.data_ptr() != v.data_ptr()
                    or w.device.type == "meta"
                ):
                    return False
        return True

    def fused_weights(self, keep_vars: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate_up_proj, down_proj)`` as 3D tensors holding the current expert weights (no copy when tied)."""
        if self.is_tied():
            gu, dn = cast(torch.Tensor, self._fused.gate_up_proj), cast(torch.Tensor, self._fused.down_proj)
            return (gu, dn) if keep_vars else (gu.detach(), dn.detach())
        ws = self._weights()
        return (
            torch.stack([torch.cat([g.detach(), u.detach()]) for g, u, _ in ws]),
            torch.stack([d.detach() for _, _, d in ws]),
        )

    def _tie(self) -> None:
        for ws, vs in zip(self._weights(), self._views()):
            for w, v in zip(ws, vs):
                if not (
                    w.data_ptr() == v.data_ptr()
                    and w.dtype == v.dtype
                    and w.device == v.device
                    and w.stride() == v.stride()
                ):
                    w.data = v

    def _sync(self) -> None:
        """Make the fused Parameters hold the current expert weights, and every expert weight a view of them."""
        if not self.is_tied():
            gu, dn = self.fused_weights()
            self._fused.gate_up_proj.data, self._fused.down_proj.data = gu, dn
            self._tie()

    def fuse(self) -> nn.Module:
        """The original experts module, holding the current weights (its Parameters are the same objects)."""
        self._sync()
        self._fused.train(self.training)
        return self._fused

    # --- nn.Module plumbing: conversion, state dict, copies ------------------------------------------
    def _apply(self, fn, recurse=True):
        self._sync()
        self._fused._apply(fn)  # convert the fused storage once, as the original module would
        self._tie()  # so fn is a no-op on the expert weights below
        super()._apply(fn, recurse)
        self._tie()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "gate_up_proj"], destination[prefix + "down_proj"] = self.fused_weights(keep_vars)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        i = self.intermediate_dim
        for name, shape in (
            ("gate_up_proj", (self.num_experts, 2 * i, self.hidden_dim)),
            ("down_proj", (self.num_experts, self.hidden_dim, i)),
        ):
            key = prefix + name
            if key not in state_dict:
                continue  # the experts then report their weights missing
            value = state_dict.pop(key)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                error_msgs.append(
                    f"size mismatch for {key}: copying a param with shape {got} from checkpoint, "
                    f"the shape in current model is {shape}."
                )
                continue
            for e in range(self.num_experts):
                if name == "gate_up_proj":
                    state_dict[f"{prefix}{e}.gate_proj.weight"] = value[e, :i]
                    state_dict[f"{prefix}{e}.up_proj.weight"] = value[e, i:]
                else:
                    state_dict[f"{prefix}{e}.down_proj.weight"] = value[e]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        if self.is_tied():  # the copy's expert weights are views of the copied fused storage, as here
            views = _expert_views(copy.deepcopy(self._fused, memo), self.intermediate_dim)
            for ws, vs in zip(self._weights(), views):
                for w, v in zip(ws, vs):
                    memo.setdefault(id(w), nn.Parameter(v, requires_grad=w.requires_grad))
        for k, v in self.__dict__.items():
            object.__setattr__(new, k, copy.deepcopy(v, memo))
        new._sync()
        return new

    # --- forward ------------------------------------------------------------------------------------
    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """transformers' eager expert loop (Mixtral, Qwen-MoE), each expert's matmuls through its Linears."""
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
            expert_mask = expert_mask.permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in expert_hit[:, 0].tolist():
            if e == self.num_experts:  # expert-parallel sentinel
                continue
            expert = self[e]
            top_k_pos, token_idx = torch.where(expert_mask[e])
            current_state = hidden_states[token_idx]
            current = self.act_fn(expert.gate_proj(current_state)) * expert.up_proj(current_state)
            current = expert.down_proj(current)
            current = current * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current.to(final_hidden_states.dtype))
        return final_hidden_states

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
            f"intermediate_dim={self.intermediate_dim}, fused={type(self._fused).__name__}"
        )
