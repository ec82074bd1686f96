"""Models dispatched by accelerate (``load_model(..., device_map="auto")``): devices, offloaded weights, hooks.

accelerate attaches an ``AlignDevicesHook`` to the modules of a dispatched model. It moves a module's inputs
to its *execution device* and, where the weights were offloaded (map entries ``"cpu"`` next to GPUs, or
``"disk"``), loads them from ``hook.weights_map`` before each forward and puts them back on the ``meta``
device after. So a parameter's device is not where a module computes, an offloaded weight can only be
read through its hook, and a module that replaces another must take over its hook.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch.nn as nn

from .weights import dense_weight

__all__ = ["execution_device", "model_device", "loaded_weights", "layer_weight", "move_hook"]


def _align_hook(module: nn.Module):
    """The module's own accelerate ``AlignDevicesHook`` (also inside a ``SequentialHook``), or None."""
    hook = getattr(module, "_hf_hook", None)
    return next((h for h in getattr(hook, "hooks", (hook,)) if hasattr(h, "execution_device")), None)


def execution_device(module: nn.Module) -> torch.device | None:
    """Where ``module`` computes: its accelerate hook's execution device, else the device of its first
    parameter or buffer that is not on ``meta`` (None when there is none)."""
    hook = _align_hook(module)
    if hook is not None and hook.execution_device is not None:
        return torch.device(hook.execution_device)
    t = next((t for t in itertools.chain(module.parameters(), module.buffers()) if t.device.type != "meta"), None)
    return None if t is None else t.device


def model_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: the execution device of its input embedding (for a model dispatched by
    accelerate, not where its weights rest), else of the model; CPU for a parameterless model."""
    try:
        emb = cast(Any, model).get_input_embeddings()  # HF models have it, other modules may not
    except (AttributeError, NotImplementedError):
        emb = None
    for m in (emb, model):
        dev = execution_device(m) if isinstance(m, nn.Module) else None
        if dev is not None:
            return dev
    return torch.device("cpu")


@contextmanager
def loaded_weights(module: nn.Module) -> Iterator[nn.Module]:
    """Inside, the module's own offloaded parameters are real tensors on its execution device (they go back
    to ``meta`` on exit, as after a forward); a module without offloaded weights is left as it is."""
    hook = _align_hook(module)
    if hook is None or not hook.offload:
        yield module
        return
    hook.pre_forward(module)
    try:
        yield module
    finally:
        hook.post_forward(module, None)


def layer_weight(module: nn.Module) -> torch.Tensor:
    """A Linear's weight as a plain dense tensor (dequantized if int8), loaded from the offload if needed."""
    with loaded_weights(module):
        return dense_weight(cast(torch.Tensor, module.weight).detach())


def move_hook(src: nn.Module, dst: nn.Module) -> None:
    """Attach ``src``'s accelerate hook to ``dst``, the module that replaces it: ``dst`` then computes on the
    same device and loads the same offloaded weights (its parameters have the same names)."""
    hook = getattr(src, "_hf_hook", None)
    if hook is not None:
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(dst, hook)
