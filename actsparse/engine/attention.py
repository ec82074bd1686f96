"""Decode attention for Hugging Face models: one query token on CUDA runs actsparse's split-KV kernel
(:mod:`actsparse.kernels.decode_attention`: it reads only the static cache's positions the mask lets
through), everything else runs transformers' own SDPA path, unchanged.

It is registered with transformers as the attention implementation :data:`ATTENTION` (its masks are SDPA's),
so the model's forward stays the model's own; :func:`use_decode_attention` switches a model to it and
:func:`restore_attention` back, :func:`decode_attention_scope` for the length of a ``with`` block (what
``Decoder(model, ..., attention="auto")`` does around each of its runs on CUDA: the model is left as it was).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..errors import DecoderError
from ..kernels.decode_attention import decode_attention, decode_attention_supported

__all__ = [
    "ATTENTION",
    "decode_attention_forward",
    "use_decode_attention",
    "restore_attention",
    "decode_attention_scope",
    "attention_of",
    "check_decode_attention",
]

ATTENTION = "actsparse_decode"
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")


def decode_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: ``[B, q_len, H, D]`` output, no attention weights."""
    if (
        query.shape[2] == 1
        and kernel_call(dropout, kwargs)
        and decode_attention_supported(query, key, value, attention_mask) is None
    ):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = decode_attention(query, key, value, attention_mask, scale)  # [B, H, 1, D]
        return out.transpose(1, 2), None  # [B, 1, H, D]: contiguous as it is (one query position)
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def kernel_call(dropout: float, kwargs: dict[str, Any]) -> bool:
    """Whether an attention call with these arguments is one the kernel computes (no dropout, no attention
    weights asked for, none of the arguments it does not implement)."""
    return (
        dropout == 0.0
        and not kwargs.get("output_attentions", False)
        and all(kwargs.get(k) is None for k in _UNSUPPORTED_KWARGS)
    )


AttentionInterface.register(ATTENTION, decode_attention_forward)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def attention_of(model: nn.Module) -> str | None:
    """The attention implementation ``model`` runs (``config._attn_implementation``), e.g. ``"sdpa"``."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def use_decode_attention(model: nn.Module) -> str | None:
    """Switch an SDPA ``model`` to :data:`ATTENTION`; returns the implementation it had (for
    :func:`restore_attention`). Other implementations (eager, flash, flex) are refused: their numerics or
    features differ from SDPA's, which is what the fallback runs."""
    before = check_decode_attention(model)
    if before != ATTENTION:
        _set(model, ATTENTION)
    return before


def check_decode_attention(model: nn.Module) -> str | None:
    """The attention ``model`` runs, when :func:`use_decode_attention` can switch it (SDPA, or switched
    already); else a :class:`~actsparse.DecoderError` naming the fix. Changes nothing."""
    before = attention_of(model)
    if before not in ("sdpa", ATTENTION):
        raise DecoderError(
            f"actsparse's decode attention replaces SDPA; {type(model).__name__} runs {before!r} attention "
            "(load it with attn_implementation='sdpa', or pass attention='model')"
        )
    return before


def restore_attention(model: nn.Module, implementation: str | None) -> None:
    """Undo :func:`use_decode_attention` (``implementation`` is what it returned)."""
    if implementation is not None and attention_of(model) != implementation:
        _set(model, implementation)


@contextmanager
def decode_attention_scope(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """``model`` runs :data:`ATTENTION` inside the block (when ``enabled``) and what it ran before after it,
    also when the block raises."""
    before = use_decode_attention(model) if enabled else None
    try:
        yield
    finally:
        restore_attention(model, before)


def _set(model: nn.Module, implementation: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        setter(implementation)
    else:  # pragma: no cover - transformers without set_attn_implementation
        model.config._attn_implementation = implementation  # type: ignore[union-attr]
