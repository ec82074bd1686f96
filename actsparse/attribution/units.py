"""Units of attribution-based sparsity: MLP neurons and attention heads, found by module name.

A *unit layer* is the module whose **input channels** are the units: for MLP neurons the down projection
(its input is ``act(gate) * up``, one channel per neuron), for attention heads the attention output
projection (its input is the concatenation of the heads' outputs, ``head_dim`` channels per head).
Deactivating a unit zeroes its channels of that input, which is exactly what activation sparsity on that
layer does, so the same ``SparseLinear`` machinery serves the deployable (calibrated) masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..errors import UsageError

__all__ = ["UnitLayer", "find_unit_layers", "unit_layers_for", "KINDS", "NEURON_SUFFIXES", "HEAD_SUFFIXES"]

KINDS = ("heads", "neurons")
# module-name endings per architecture family (the unit layer of each block)
NEURON_SUFFIXES = (
    "mlp.down_proj",  # Llama, Mistral, Qwen2/3, Gemma, Phi-3, SmolLM
    "fc2",  # OPT, Phi-1/2 (mlp.fc2)
    "mlp.dense_4h_to_h",  # GPT-NeoX / Pythia, Falcon
    "mlp.c_proj",  # GPT-2 (Conv1D)
)
HEAD_SUFFIXES = (
    "self_attn.o_proj",  # Llama, Mistral, Qwen, Gemma, Phi-3
    "self_attn.dense",  # Phi-1/2
    "self_attn.out_proj",  # OPT
    "attention.dense",  # GPT-NeoX / Pythia
    "self_attention.dense",  # Falcon
    "attn.c_proj",  # GPT-2 (Conv1D)
)


@dataclass
class UnitLayer:
    """One unit layer: ``n_units`` units of ``group`` consecutive input channels of module ``name``."""

    name: str
    kind: str  # "heads" | "neurons"
    n_units: int
    group: int  # channels per unit: head_dim for heads, 1 for neurons
    module: nn.Module

    @property
    def in_features(self) -> int:
        return self.n_units * self.group


def _in_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.in_features
    w = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and w is not None and w.dim() == 2:  # transformers' GPT-2 Conv1D
        return int(w.shape[0])
    return None


def _num_heads(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for key in ("num_attention_heads", "n_head", "num_heads"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _kind_of(name: str) -> str | None:
    if any(name == s or name.endswith("." + s) for s in HEAD_SUFFIXES):
        return "heads"
    if any(name == s or name.endswith("." + s) for s in NEURON_SUFFIXES):
        return "neurons"
    return None


def _make(model: nn.Module, name: str, module: nn.Module, kind: str) -> UnitLayer:
    width = _in_features(module)
    if width is None:
        raise UsageError(f"unit layer {name!r} is a {type(module).__name__}, not a Linear/Conv1D layer")
    if kind == "neurons":
        return UnitLayer(name, kind, width, 1, module)
    heads = _num_heads(model)
    if heads is None or width % heads:
        raise UsageError(
            f"cannot split {name!r} ({width} input channels) into attention heads: the model config "
            f"gives {heads} heads; score it as neurons instead"
        )
    return UnitLayer(name, kind, heads, width // heads, module)


def find_unit_layers(model: nn.Module, kinds: tuple[str, ...] | list[str] = KINDS) -> list[UnitLayer]:
    """Every block's unit layers of the given kinds, in forward (module) order."""
    bad = sorted(set(kinds) - set(KINDS))
    if bad or not kinds:
        raise UsageError(f"unknown unit kind(s) {bad or list(kinds)}; choose from {', '.join(KINDS)}")
    found = []
    for name, module in model.named_modules():
        kind = _kind_of(name)
        if kind is not None and kind in kinds and _in_features(module) is not None:
            found.append(_make(model, name, module, kind))
    if not found:
        ends = ", ".join(HEAD_SUFFIXES * ("heads" in kinds) + NEURON_SUFFIXES * ("neurons" in kinds))
        raise UsageError(
            f"no {'/'.join(kinds)} unit layers found in {type(model).__name__}: looked for module "
            f"names ending in {ends}; name the layers explicitly (unit_layers_for)"
        )
    return found


def unit_layers_for(model: nn.Module, names: list[str]) -> list[UnitLayer]:
    """Unit layers for explicit module names: attention output projections are split into heads, any other
    Linear is scored per input channel (neurons)."""
    modules = dict(model.named_modules())
    out = []
    for name in names:
        if name not in modules:
            raise UsageError(f"no module named {name!r} in the model")
        out.append(_make(model, name, modules[name], _kind_of(name) or "neurons"))
    return out
