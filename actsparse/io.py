"""Save/load thresholds: safetensors tensors + a JSON header in the safetensors metadata.

Files are written atomically (temp file in the same folder, then ``os.replace``) and read with
``safetensors`` only: no pickle is ever loaded. Loading validates the whole file against the model
before the model is changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, cast

import torch.nn as nn

from ._version import __version__
from .api import apply_thresholds, sparse_layers
from .errors import ThresholdFileError
from .fileio import atomic_write
from .methods.scap import read_scap_json
from .models import describe_model
from .moe import linear_shapes, unfuses_experts
from .sparse_linear import BUFFERS, SparsityParams, check_not_sparsified

__all__ = [
    "save_thresholds",
    "load_thresholds",
    "read_thresholds",
    "save_pretrained",
    "from_pretrained",
    "import_scap_json",
    "model_fingerprint",
    "THRESHOLDS_FILENAME",
]

THRESHOLDS_FILENAME = "actsparse_thresholds.safetensors"
FORMAT = "actsparse.thresholds"
FORMAT_VERSION = 2  # 2: optional act_shift / act_scale / act_topk tensors per layer (version 1 files still load)
_SUFFIXES = tuple("." + b for b in BUFFERS)
_SAVE_HINT = "in Python: actsparse.save_thresholds(model, path) after sparsifying"


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the names and shapes of all Linear layers (dense or sparse): the architecture.

    Fused MoE experts count as their per-expert Linears, so the hash is the same fused or unfused.
    """
    h = hashlib.sha256()
    for n, fan_in, fan_out in linear_shapes(model):
        h.update(f"{n}:{fan_in}x{fan_out};".encode())
    return h.hexdigest()[:16]


def _model_identity(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "name_or_path": getattr(cfg, "_name_or_path", None) or None,
        "model_type": getattr(cfg, "model_type", None),
        "fingerprint": model_fingerprint(model),
    }


def save_thresholds(model: nn.Module, path: str, *, extra: dict[str, Any] | None = None) -> str:
    """Write the thresholds of every ``SparseLinear`` in ``model`` to ``path`` (atomically)."""
    from safetensors.torch import save_file

    layers = sparse_layers(model)
    if not layers:
        raise ValueError("the model has no SparseLinear layers; sparsify it before saving thresholds")
    if os.path.isdir(path):
        path = os.path.join(path, THRESHOLDS_FILENAME)
    tensors = {
        f"{n}.{b}": t.detach().cpu().clone()
        for n, m in layers.items()
        for b in BUFFERS
        if (t := m._buffers.get(b)) is not None
    }
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "model": _model_identity(model),
        "layers": {
            n: {
                "in_features": m.in_features,
                "out_features": m.out_features,
                "target_sparsity": m.target_sparsity,
                "method": m.method,
                "calibration": getattr(m, "calibration", {}),
            }
            for n, m in layers.items()
        },
        "extra": extra or {},
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"actsparse": json.dumps(header)}))
    return path


def read_thresholds(path: str) -> tuple[dict[str, SparsityParams], dict[str, Any]]:
    """Read ``({layer: SparsityParams}, header)`` from a thresholds file, with clear errors for bad files."""
    from safetensors import safe_open

    folder = path if os.path.isdir(path) else None
    if folder is not None:
        path = os.path.join(folder, THRESHOLDS_FILENAME)
    if not os.path.isfile(path):
        where = (
            f"folder {folder!r} holds no {THRESHOLDS_FILENAME} (a folder from actsparse.save_pretrained has one)"
            if folder is not None
            else f"thresholds file {path!r} does not exist"
        )
        raise ThresholdFileError(f"{where}; create it with `actsparse calibrate --out {path}` ({_SAVE_HINT})")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open, not a dict)
    except Exception as e:  # safetensors raises several types for corrupt input
        raise ThresholdFileError(
            f"{path!r} is not a valid safetensors file (truncated, or another format "
            f"such as a pickle): {e}. Re-create it with `actsparse calibrate --out {path}` ({_SAVE_HINT})"
        ) from None
    if "actsparse" not in meta:
        raise ThresholdFileError(
            f"{path!r} is a safetensors file but not an actsparse thresholds file "
            f"(no 'actsparse' header); re-create it with `actsparse calibrate --out {path}` ({_SAVE_HINT})"
        )
    try:
        header = json.loads(meta["actsparse"])
    except json.JSONDecodeError as e:
        raise ThresholdFileError(f"{path!r}: corrupted actsparse header ({e})") from None
    if header.get("format") != FORMAT or not isinstance(header.get("layers"), dict):
        raise ThresholdFileError(f"{path!r}: unknown header format {header.get('format')!r}")
    if int(header.get("format_version", 0)) > FORMAT_VERSION:
        raise ThresholdFileError(
            f"{path!r} uses format version {header['format_version']}, newer than this "
            f"actsparse ({__version__}) reads; upgrade actsparse"
        )
    thresholds = {}
    for name, info in header["layers"].items():
        t = tensors.get(name + ".act_threshold")
        if t is None or t.numel() != 1:
            raise ThresholdFileError(f"{path!r}: missing or malformed threshold tensor for layer {name!r}")
        shift, scale, topk = (tensors.get(f"{name}.{b}") for b in BUFFERS[1:])
        try:
            if (shift is not None and shift.numel() != 1) or (topk is not None and topk.numel() != 1):
                raise ValueError("shift/topk must hold one value")
            p = SparsityParams(
                float(t.item()),
                float(shift.item()) if shift is not None else 0.0,
                scale.float() if scale is not None else None,
                int(topk.item()) if topk is not None else None,
                dict(info.get("calibration") or {}),
            )
            p.validate(int(info["in_features"]), name)
        except (ValueError, KeyError, TypeError) as e:
            raise ThresholdFileError(f"{path!r}: malformed sparsity parameters for layer {name!r}: {e}") from None
        thresholds[name] = p
    return thresholds, header


@unfuses_experts
def load_thresholds(model: nn.Module, path: str, *, strict: bool = True) -> nn.Module:
    """Sparsify ``model`` in place with the thresholds saved at ``path`` (a file or a folder).

    The file must match the model: every layer must exist as an ``nn.Linear`` of the same shape, and
    with ``strict=True`` the architecture fingerprint must match too. Nothing changes on error.
    Fused MoE experts are split into their per-expert Linears first (``actsparse.moe``).
    """
    thresholds, header = read_thresholds(path)
    check_not_sparsified(model, "loading thresholds")
    made_for = header.get("model", {})
    desc = f"{describe_model(made_for.get('name_or_path')) if made_for.get('name_or_path') else made_for.get('class')} "
    desc += f"({made_for.get('model_type')})"
    modules = dict(model.named_modules())
    problems = []
    for name, info in header["layers"].items():
        m = modules.get(name)
        if not isinstance(m, nn.Linear):
            problems.append(f"{name}: missing" if m is None else f"{name}: is {type(m).__name__}, not Linear")
        elif (m.in_features, m.out_features) != (info.get("in_features"), info.get("out_features")):
            problems.append(
                f"{name}: shape {m.in_features}x{m.out_features} != saved "
                f"{info.get('in_features')}x{info.get('out_features')}"
            )
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems) - 5} more)" if len(problems) > 5 else "")
        raise ThresholdFileError(
            f"thresholds in {path!r} were made for another model, {desc}: {shown}. "
            f"Calibrate thresholds for this model instead"
        )
    if strict and made_for.get("fingerprint") != model_fingerprint(model):
        raise ThresholdFileError(
            f"thresholds in {path!r} were made for another architecture, {desc} (fingerprint "
            f"{made_for.get('fingerprint')} != {model_fingerprint(model)}); calibrate for this "
            f"model, or pass strict=False if you know the layers correspond"
        )
    targets = {n: info.get("target_sparsity") for n, info in header["layers"].items()}
    methods = {info.get("method") for info in header["layers"].values()}
    method = methods.pop() if len(methods) == 1 else None
    return apply_thresholds(model, thresholds, target_sparsity=targets, method=method)


def save_pretrained(model: nn.Module, folder: str, tokenizer=None, **kwargs) -> None:
    """HF ``save_pretrained`` of the dense weights plus ``actsparse_thresholds.safetensors``.

    The HF checkpoint holds no actsparse keys, so any transformers install can load it; use
    ``actsparse.from_pretrained(folder)`` to get the sparsified model back.
    """
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(_SUFFIXES)}
    cast(Any, model).save_pretrained(folder, state_dict=state, **kwargs)  # a HF PreTrainedModel
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    save_thresholds(model, os.path.join(folder, THRESHOLDS_FILENAME))


def from_pretrained(folder: str, **kwargs) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(folder, **kwargs)`` with its saved thresholds applied."""
    from transformers import AutoModelForCausalLM

    path = os.path.join(folder, THRESHOLDS_FILENAME)
    read_thresholds(path)  # fail on a bad thresholds file before the (slow) model load
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    return load_thresholds(model, path)


def import_scap_json(model: nn.Module, path: str) -> nn.Module:
    """Sparsify ``model`` in place with a SCAP ``calibrated_thresholds.json`` (validated first)."""
    params, targets = read_scap_json(path)
    try:
        return apply_thresholds(model, params, target_sparsity=targets, method="scap")
    except ValueError as e:
        raise ThresholdFileError(f"{path!r} does not fit this model: {e}") from None
