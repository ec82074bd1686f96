"""Model-forward helpers shared by the calibration engine and the methods that run the model themselves.

Running a batch through a model (inputs on its device, no KV cache), selecting the real (unpadded) tokens
of an activation, the summed next-token NLL of a model on calibration batches, and finding the stack of
decoder blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from .data import Batch
from .errors import CalibrationError

__all__ = [
    "eval_mode",
    "call_model",
    "real_tokens",
    "calibration_tokens",
    "leading_batches",
    "next_token_nll",
    "find_block_stack",
    "input_hooks",
]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside; after, every submodule's own train/eval flag as it was (``model.train(flag)``
    would set the root's flag on all of them)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def _to(obj: Any, device: torch.device) -> Any:
    return obj.to(device) if isinstance(obj, torch.Tensor) else obj


def call_model(model: nn.Module, batch: Batch, device: torch.device):
    """``model(**batch.inputs)`` on ``device`` (without a KV cache for HF models)."""
    inputs = {k: _to(v, device) for k, v in batch.inputs.items()}
    if hasattr(model, "config") and "use_cache" not in inputs:
        inputs["use_cache"] = False
    return model(**inputs)


def real_tokens(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """``x[..., features]`` as ``[tokens, features]`` without padding (when ``token_mask`` fits ``x``)."""
    m = token_mask
    if m is not None and x.dim() == m.dim() + 1 and x.shape[:-1] == m.shape:
        return x[m.to(x.device)]
    return x.reshape(-1, x.shape[-1])


def calibration_tokens(
    x: torch.Tensor, token_mask: torch.Tensor | None, name: str, batch_index: int | None = None
) -> torch.Tensor:
    """:func:`real_tokens` of a layer's input, refused with a ``CalibrationError`` naming the layer when any is
    NaN or infinite (statistics of them would be meaningless, or fail far from the cause)."""
    tokens = real_tokens(x, token_mask)
    if not torch.isfinite(tokens).all():
        on = "" if batch_index is None else f" on calibration batch {batch_index}"
        raise CalibrationError(
            f"non-finite (NaN/inf) input activations in {name!r}{on}; the model overflows in its current dtype "
            f"({x.dtype}). Calibrate in float32 or bfloat16, or check the model and data."
        )
    return tokens


def leading_batches(batches: list[Batch], tokens: int | None) -> int:
    """How many leading batches hold at least ``tokens`` real tokens (all of them when None or too few)."""
    if tokens is None:
        return len(batches)
    total = 0
    for i, b in enumerate(batches):
        total += b.n_tokens
        if total >= tokens:
            return i + 1
    return len(batches)


@torch.no_grad()
def next_token_nll(model: nn.Module, batches: list[Batch], device: torch.device) -> tuple[float, int]:
    """(summed next-token NLL, number of scored tokens) of ``model`` on ``batches``; pairs touching padding
    are skipped."""
    total, count = 0.0, 0
    for b in batches:
        logits = call_model(model, b, device).logits.float()
        ids = b.inputs["input_ids"].to(logits.device)
        valid = (b.token_mask[:, 1:] & b.token_mask[:, :-1]).to(logits.device)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        total += float(nll[valid].double().sum())
        count += int(valid.sum())
    return total, count


def find_block_stack(model: nn.Module, names: Sequence[str]) -> tuple[str, nn.ModuleList] | None:
    """The outermost ``nn.ModuleList`` (name, module) that holds every layer in ``names``: the decoder blocks."""
    for prefix, m in model.named_modules():  # outermost first
        if isinstance(m, nn.ModuleList) and len(m) > 0 and prefix and all(n.startswith(prefix + ".") for n in names):
            return prefix, m
    return None


InputHook = Callable[[str, nn.Module, torch.Tensor], "torch.Tensor | None"]


def _call(fn: InputHook, name: str, module: nn.Module, args: tuple) -> tuple | None:
    x = fn(name, module, args[0])
    return None if x is None else (x, *args[1:])


@contextmanager
def input_hooks(layers: Mapping[str, nn.Module], fn: InputHook) -> Iterator[None]:
    """Inside, every call of a layer in ``layers`` first runs ``fn(name, module, x)`` on its input ``x``; a
    tensor it returns replaces the input. The hooks are removed on exit, also on error."""
    handles = []
    try:
        for name, m in layers.items():
            handles.append(m.register_forward_pre_hook(partial(_call, fn, name)))
        yield
    finally:
        for h in handles:
            h.remove()
