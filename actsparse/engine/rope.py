"""Llama-style attentions whose decode steps rotate, write the cache and attend in one kernel.

In a compiled decode step transformers' attention forward leaves, between the q/k/v projection and the attention
kernel, the rotary embedding of q and k and the two cache writes: three small kernels per layer (96 launches per
Llama-2-7B step). :func:`fuse_rope` gives eligible attention modules a forward whose one-token steps hand the
*unrotated* projections to :func:`~actsparse.kernels.decode_attention.decode_attention_rope`, which rotates them,
writes the new key and value at the cache's position and attends, in one launch.

The arithmetic is transformers': the rotation rounds each product and the sum as torch does (``rotate_half``
convention, bit for bit), the cache holds the same keys and values, and the attention is the decode-attention
kernel's. A module takes part when its class forward is, instruction for instruction, Llama's, Qwen2's or
Mistral's (transformers 5.x, with the cache argument named ``cache`` or ``past_key_values``; copies of them in
other models too) and the ``apply_rotary_pos_emb`` it calls gives
:func:`~actsparse.kernels.decode_attention.rotary_reference`'s result on a probe. At a call, the fused path runs
only for one token, with the model switched to actsparse's decode attention (the Decoder does it for each run),
a cache layer that is the Decoder's :class:`~actsparse.engine.hf.OneCounterLayer` (the write position is its
counter), no gradients, no hooks on the module and inputs the kernel takes; every other call runs the class
forward (also a partial rotary embedding, an offloading cache, hooks but transformers' recording the attention
weights). :func:`unfuse_rope` undoes it.
"""

from __future__ import annotations

import inspect
import types
from typing import Any, cast

import torch
import torch.nn as nn

from ..kernels.decode_attention import decode_attention_rope, decode_attention_rope_supported, rotary_reference
from .attention import ATTENTION, decode_attention_forward, kernel_call
from .hf import OneCounterLayer, bind_call, compile_form, forward_key, has_hooks

__all__ = ["fuse_rope", "unfuse_rope", "rope_fused"]


# The class forwards the fused one replaces, compared as bytecode, parameter names and defaults: transformers 5.x's
# Llama attention (and its copies), and Qwen2's and Mistral's, which also pass a sliding window to the attention
# function (the decode attention takes the window from the mask), each with the cache argument named as 5.2x names
# it (`cache`, its `update` given the kwargs) or as before (`past_key_values`). Written out once and compiled here
# where the names the forward looks up are imported as in transformers' modules (Python compiles a method call
# on an imported name differently).
_FORM = """
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward


def forward(self, hidden_states, position_embeddings{default}, attention_mask{default}, {cache}=None, **kwargs):
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)

    query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

    cos, sin = position_embeddings
    query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

    if {cache} is not None:
        key_states, value_states = {cache}.update(key_states, value_states, self.layer_idx{update})

    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, eager_attention_forward
    )

    attn_output, attn_weights = attention_interface(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,{window}
        **kwargs,
    )

    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    attn_output = self.o_proj(attn_output)
    return attn_output, attn_weights
"""
_STYLES = {  # (default of position_embeddings and attention_mask, the sliding window passed on)
    "llama": ("=None", ""),
    "qwen2": ("", "\n        sliding_window=self.sliding_window,"),
    "mistral": ("", '\n        sliding_window=getattr(self.config, "sliding_window", None),'),
}
_CACHES = {"cache": ", kwargs=kwargs", "past_key_values": ""}


def _form(style: str, cache: str) -> Any:
    default, window = _STYLES[style]
    source = _FORM.format(default=default, cache=cache, update=_CACHES[cache], window=window)
    return compile_form(source, f"{style} attention, {cache}")


_CODES = {forward_key(_form(style, cache)) for style in _STYLES for cache in _CACHES}
_NAMES = ("hidden_states", "position_embeddings", "attention_mask", "cache")  # the attention forward's parameters


def _bind(args: tuple, kwargs: dict) -> tuple[Any, ...] | None:
    """``(hidden_states, position_embeddings, attention_mask, cache, other kwargs)`` of a call, or None for one
    bound otherwise (the class forward takes it, and raises if it is wrong)."""
    bound = bind_call(_NAMES, args, kwargs)
    if bound is None:
        return None
    named, extra = bound
    return (*(named.get(n) for n in _NAMES), extra)


def _fused_forward(self: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    bound = _bind(args, kwargs) if "_rope_fused" in vars(self) else None
    if bound is None:
        return type(self).forward(self, *args, **kwargs)
    h, rotary, mask, cache, extra = bound
    layer = _cache_layer(cache, getattr(self, "layer_idx", None))
    if (
        layer is None
        or not isinstance(h, torch.Tensor)
        or h.dim() != 3
        or h.shape[1] != 1
        or not isinstance(rotary, tuple)
        or len(rotary) != 2
        or not isinstance(rotary[0], torch.Tensor)
        or rotary[0].shape[-1] != self.head_dim  # (a partial rotary embedding: the class forward's own rotation)
        or self.training
        or self.config._attn_implementation != ATTENTION
        or not kernel_call(0.0, extra)
        or (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()))
        or (not torch.compiler.is_compiling() and _hooked(self))
    ):
        return type(self).forward(self, *args, **kwargs)
    input_shape = h.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q = self.q_proj(h).view(hidden_shape).transpose(1, 2)
    k = self.k_proj(h).view(hidden_shape).transpose(1, 2)
    v = self.v_proj(h).view(hidden_shape).transpose(1, 2)
    cos, sin = rotary
    keys, values = cast(torch.Tensor, layer.keys), cast(torch.Tensor, layer.values)
    position = layer.write_start(1)
    if decode_attention_rope_supported(q, k, v, cos, sin, keys, values, position, mask) is None:
        out = decode_attention_rope(q, k, v, cos, sin, keys, values, position, mask, self.scaling)
        out = out.transpose(1, 2)
    else:  # the class forward's arithmetic (its rotation is the reference's, checked at fusing; its attention ours)
        q, k = rotary_reference(q, cos, sin), rotary_reference(k, cos, sin)
        keys.index_copy_(2, position.reshape(1), k)
        values.index_copy_(2, position.reshape(1), v)
        out, _ = decode_attention_forward(self, q, keys, values, mask, dropout=0.0, scaling=self.scaling, **extra)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), None


def _hooked(module: nn.Module) -> bool:
    """Hooks on the module (or accelerate's dispatch) that the fused forward would change what they see: all but
    transformers' output-capturing hooks recording the attention weights (None from both forwards under the decode
    attention)."""
    return has_hooks(module, lambda m, index: index >= 1, deep=False)


def _cache_layer(cache: Any, idx: Any) -> OneCounterLayer | None:
    """The Decoder's cache layer ``idx`` when the kernel may write it (not an offloading cache)."""
    layers = getattr(cache, "layers", None)
    if getattr(cache, "offloading", False):
        return None
    if not isinstance(idx, int) or not isinstance(layers, list) or not 0 <= idx < len(layers):
        return None
    layer = layers[idx]
    if type(layer) is not OneCounterLayer or not layer.is_initialized or layer.keys is None:
        return None
    return layer


def _candidate(module: nn.Module) -> bool:
    """The static conditions of the module docstring (and no forward of its own already, e.g. accelerate's)."""
    if "forward" in vars(module) or getattr(module, "_hf_hook", None) is not None:
        return False
    fn = inspect.unwrap(type(module).forward)
    if forward_key(fn) not in _CODES or not all(
        isinstance(getattr(module, n, None), nn.Module) for n in ("q_proj", "k_proj", "v_proj", "o_proj")
    ):
        return False
    head_dim = getattr(module, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim % 2 or not isinstance(getattr(module, "layer_idx", None), int):
        return False
    device = cast(Any, module).q_proj.weight.device
    return _same_rotation(fn.__globals__.get("apply_rotary_pos_emb"), head_dim, device)


@torch.no_grad()
def _same_rotation(apply: Any, head_dim: int, device: torch.device) -> bool:
    """Whether the module's ``apply_rotary_pos_emb`` gives :func:`rotary_reference`'s result bit for bit (bf16)."""
    if not callable(apply):
        return False
    gen = torch.Generator(device=device).manual_seed(0)
    q, k = (torch.randn(1, h, 1, head_dim, generator=gen, device=device).bfloat16() for h in (3, 2))
    angles = torch.randn(1, 1, head_dim, generator=gen, device=device) * 20
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    try:
        got = apply(q, k, cos, sin)
    except Exception:
        return False
    want = (rotary_reference(q, cos, sin), rotary_reference(k, cos, sin))
    return isinstance(got, tuple) and len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, want))


def fuse_rope(model: nn.Module) -> list[str]:
    """Give ``model``'s eligible attention modules the fused forward (module docstring); returns their names.
    Idempotent."""
    names = []
    for name, m in model.named_modules():
        if "_rope_fused" in vars(m):
            names.append(name)
        elif _candidate(m):
            vars(m)["_rope_fused"] = True
            vars(m)["forward"] = types.MethodType(_fused_forward, m)
            names.append(name)
    return names


def unfuse_rope(model: nn.Module) -> None:
    """Undo :func:`fuse_rope`: every attention module runs its class forward again."""
    for m in model.modules():
        if vars(m).pop("_rope_fused", None):
            f = vars(m).get("forward")
            if getattr(f, "__func__", None) is _fused_forward:
                del vars(m)["forward"]


def rope_fused(model: nn.Module) -> list[str]:
    """Names of the modules that have the fused forward."""
    return [name for name, m in model.named_modules() if "_rope_fused" in vars(m)]
