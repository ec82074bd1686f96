"""Save/load thresholds: safetensors tensors + a JSON header in the safetensors metadata.

Files are written atomically (temp file in the same folder, then ``os.replace``) and read with
``safetensors`` only: no pickle is ever loaded. Loading validates the whole file against the model
before the model is changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from ._version import __version__
from .api import apply_thresholds, sparse_layers
from .errors import InvalidTypeError, ThresholdFileError, UsageError
from .fileio import atomic_write, check_output_path, keep_file_modes, names_folder, written_last
from .input_rotation import (
    check_factors,
    factors_fingerprint,
    input_rotation_factors,
    input_rotation_of,
    rotate_inputs,
)
from .methods.scap import read_scap_json
from .models import describe_model
from .moe import linear_shapes, unfuses_experts
from .rotation import adapter_weights, basis_fingerprint, check_basis, rotate_residual, rotation_basis, rotation_of
from .schema import Fields, check_input_file, parse_json
from .sparse_linear import BUFFERS, SparsityParams, check_not_sparsified

__all__ = [
    "save_thresholds",
    "load_thresholds",
    "read_thresholds",
    "save_pretrained",
    "from_pretrained",
    "import_scap_json",
    "read_rotation",
    "read_input_rotation",
    "model_fingerprint",
    "THRESHOLDS_FILENAME",
]

THRESHOLDS_FILENAME = "actsparse_thresholds.safetensors"
FORMAT = "actsparse.thresholds"
# 2: optional act_shift / act_scale / act_topk tensors per layer; 3: optional act_lr_u / act_lr_v (low rank);
# 4: model.rotation, the fingerprint of a folded residual rotation (written only then); 5: the rotation's bases
# as tensors rotation.bases [U, D, D] + rotation.index [L] (layer -> basis), so that load_thresholds(...,
# rotate=True) rotates the original checkpoint; older files still load
# 6: model.input_rotation + tensors input_rotation.reflectors [N, D, r] / input_rotation.factors [N, r, r]
# (actsparse.rotate_inputs' compact-WY factors, written only then)
FORMAT_VERSION = 6
ROTATION_TENSORS = ("rotation.bases", "rotation.index")
INPUT_ROTATION_TENSORS = ("input_rotation.reflectors", "input_rotation.factors")
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
    """Write the thresholds of every ``SparseLinear`` in ``model`` to ``path`` (atomically).

    ``path``: a file, or a folder (an existing one, or one written with a trailing ``/``) that gets
    ``actsparse_thresholds.safetensors``. Returns the file's path.
    """
    if isinstance(path, (str, os.PathLike)) and (os.path.isdir(path) or names_folder(path)):
        path = os.path.join(path, THRESHOLDS_FILENAME)
    check_output_path(path, "thresholds file")
    write = _thresholds_writer(model, extra)
    atomic_write(path, write)
    return os.fspath(path)


def _thresholds_writer(model: nn.Module, extra: dict[str, Any] | None) -> Callable[[str], None]:
    """Everything a thresholds file holds, checked as its reader checks it: a function that writes it to a path.

    Raises ``UsageError`` (``InvalidTypeError`` for an ``extra`` that is no dict) before anything is written
    when the model has nothing to save or holds a value the reader would refuse (a file saved is a file that
    loads)."""
    layers = sparse_layers(model)
    if not layers:
        raise UsageError("the model has no SparseLinear layers; sparsify it before saving thresholds")
    if adapter_weights(model) and rotation_basis(model) is None:
        raise UsageError(
            "this model has residual adapters but no rotation basis of this process (rotate_residual keeps it on "
            "the model object): save thresholds from the model object rotate_residual returned"
        )
    if extra is not None and not isinstance(extra, dict):
        raise InvalidTypeError(f"extra must be a dict of JSON values or None, got {type(extra).__name__}")
    tensors = {
        f"{n}.{b}": t.detach().cpu().clone(memory_format=torch.contiguous_format)
        for n, m in layers.items()
        for b in BUFFERS
        if (t := m._buffers.get(b)) is not None
    }
    identity = _model_identity(model)
    if rotation_of(model) is not None:
        identity["rotation"] = rotation_of(model)
        basis = rotation_basis(model)
        if basis is not None:  # (a reloaded rotated checkpoint has only its fingerprint)
            tensors.update(zip(ROTATION_TENSORS, _unique_bases(basis)))
    factors = input_rotation_factors(model)
    if input_rotation_of(model) is not None:
        if factors is None:
            raise UsageError(
                "this model's config names input rotations but its norms hold none: save from the rotated model"
            )
        identity["input_rotation"] = input_rotation_of(model)
        tensors.update(zip(INPUT_ROTATION_TENSORS, factors))
    if "input_rotation" in identity:
        version = FORMAT_VERSION
    elif "rotation" in identity:
        version = 5 if "rotation.bases" in tensors else 4
    else:
        version = 3
    header = {
        "format": FORMAT,
        "format_version": version,
        "library_version": __version__,
        "model": identity,
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
    try:
        text = json.dumps(header)
        _check_header(parse_json(text, "header", ThresholdFileError), "the thresholds header")
    except (TypeError, ValueError) as e:  # ThresholdFileError is a ValueError
        raise UsageError(f"cannot save these thresholds: {e} (nothing was written)") from None
    return lambda tmp: save_file(tensors, tmp, metadata={"actsparse": text})


def _unique_bases(basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[L, D, D]`` bases as ``(distinct bases [U, D, D], index [L])``: layers sharing a basis store it once."""
    uniques: list[torch.Tensor] = []
    index = []
    for q in basis:
        hit = next((i for i, u in enumerate(uniques) if torch.equal(u, q)), None)
        if hit is None:
            uniques.append(q)
            hit = len(uniques) - 1
        index.append(hit)
    return torch.stack(uniques).float().contiguous(), torch.tensor(index, dtype=torch.int64)


def _input_rotation_tensors(
    f: Fields, tensors: dict[str, Any], header: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The saved ``(Y, T)`` of an input-rotated model's thresholds file (checked), or None."""
    y, t = (tensors.pop(k, None) for k in INPUT_ROTATION_TENSORS)
    fingerprint = header.get("model", {}).get("input_rotation")
    if y is None and t is None:
        if fingerprint is not None:
            f.fail("tensors input_rotation.reflectors/factors", "the header names input rotations but they are missing")
        return None
    if y is None or t is None:
        f.fail("tensors input_rotation.reflectors/factors", "input rotations need both tensors")
    if fingerprint is None:
        f.fail("tensors input_rotation.reflectors", "the header names no input rotation (model.input_rotation)")
    if header.get("model", {}).get("rotation") is not None:
        f.fail("model.input_rotation", "a file holds one rotation: rotate_residual's or rotate_inputs'")
    if (problem := check_factors(y, t)) is not None:
        f.fail("tensors input_rotation.reflectors/factors", problem)
    if factors_fingerprint(y, t) != fingerprint:
        f.fail(
            "tensors input_rotation.*", f"do not match the header's input rotation {fingerprint} (edited or corrupt)"
        )
    return y.float(), t.float()


def _rotation_tensors(f: Fields, tensors: dict[str, Any], header: dict[str, Any]) -> torch.Tensor | None:
    """The saved bases ``[L, D, D]`` of a rotated model's thresholds file (checked), or None."""
    bases, index = (tensors.pop(k, None) for k in ROTATION_TENSORS)
    if bases is None and index is None:
        return None
    if bases is None or index is None:
        f.fail("tensors rotation.bases/rotation.index", "a rotation needs both tensors")
    fingerprint = header.get("model", {}).get("rotation")
    if fingerprint is None:
        f.fail("tensors rotation.bases", "the header names no rotation (model.rotation) for these bases")
    if not isinstance(bases, torch.Tensor) or bases.dim() != 3 or not bases.is_floating_point():
        f.fail("tensor rotation.bases", f"expected float [U, D, D], got {tuple(getattr(bases, 'shape', ()))}")
    if index.dim() != 1 or index.dtype != torch.int64 or not ((index >= 0) & (index < bases.shape[0])).all():
        f.fail("tensor rotation.index", f"expected int64 [layers] indices into {bases.shape[0]} bases")
    for i, q in enumerate(bases):
        if (problem := check_basis(q.double())) is not None:
            f.fail(f"tensor rotation.bases[{i}]", problem)
    full = bases.float()[index].contiguous()
    if basis_fingerprint(full) != fingerprint:
        f.fail("tensor rotation.bases", f"does not match the header's rotation {fingerprint} (edited or corrupt)")
    return full


_HEADER_KEYS = {"format", "format_version", "library_version", "model", "layers", "extra"}
_MODEL_KEYS = {"class", "name_or_path", "model_type", "fingerprint", "rotation", "input_rotation"}
_LAYER_KEYS = {"in_features", "out_features", "target_sparsity", "method", "calibration"}


def _check_header(raw: Any, where: str) -> dict[str, Any]:
    """The thresholds header, checked field by field (see ``save_thresholds`` for what it holds)."""
    f = Fields(where, ThresholdFileError)
    header = f.obj(raw, "header", allowed=_HEADER_KEYS, required=("format", "format_version", "layers"))
    if header["format"] != FORMAT:
        f.fail("format", f"expected {FORMAT!r}, got {header['format']!r}: not an actsparse thresholds file")
    version = f.integer(header["format_version"], "format_version", lo=1)
    if version > FORMAT_VERSION:
        f.fail(
            "format_version",
            f"{version} is newer than this actsparse ({__version__}) reads (up to {FORMAT_VERSION}); upgrade actsparse",
        )
    f.string(header.get("library_version"), "library_version", none=True)
    model = f.obj(header.get("model", {}), "model", allowed=_MODEL_KEYS)
    for key in _MODEL_KEYS:
        f.string(model.get(key), f"model.{key}", none=True)
    layers = f.obj(header["layers"], "layers", non_empty=True)
    for name, info in layers.items():
        where_layer = f"layers[{name!r}]"
        info = f.obj(info, where_layer, allowed=_LAYER_KEYS, required=("in_features", "out_features"))
        f.integer(info["in_features"], f"{where_layer}.in_features", lo=1)
        f.integer(info["out_features"], f"{where_layer}.out_features", lo=1)
        f.number(info.get("target_sparsity"), f"{where_layer}.target_sparsity", lo=0.0, hi=1.0, none=True)
        f.string(info.get("method"), f"{where_layer}.method", none=True)
        f.obj(info.get("calibration") or {}, f"{where_layer}.calibration")
    f.obj(header.get("extra") or {}, "extra")
    return header


def _scalar(f: Fields, t: Any, field: str, *, integral: bool = False) -> float:
    if not isinstance(t, torch.Tensor) or t.numel() != 1:
        f.fail(field, f"expected one value, got a tensor of shape {tuple(getattr(t, 'shape', ()))}")
    if integral and (t.dtype.is_floating_point or t.dtype == torch.bool):
        f.fail(field, f"expected an integer tensor, got {t.dtype}")
    if not integral and not t.dtype.is_floating_point:
        f.fail(field, f"expected a float tensor, got {t.dtype}")
    return float(t.item()) if not integral else int(t.item())


def _layer_params(f: Fields, name: str, info: dict[str, Any], tensors: dict[str, Any]) -> SparsityParams:
    k = info["in_features"]
    tau = _scalar(f, tensors.get(f"{name}.act_threshold"), f"tensor {name}.act_threshold")
    if math.isnan(tau):
        f.fail(f"tensor {name}.act_threshold", "is NaN")
    shift = tensors.get(f"{name}.act_shift")
    mu = 0.0 if shift is None else _scalar(f, shift, f"tensor {name}.act_shift")
    if not math.isfinite(mu):
        f.fail(f"tensor {name}.act_shift", f"expected a finite shift, got {mu}")
    scale = tensors.get(f"{name}.act_scale")
    if scale is not None and (scale.dim() != 1 or scale.numel() != k or not scale.is_floating_point()):
        f.fail(f"tensor {name}.act_scale", f"expected {k} floats (in_features), got {scale.dtype} {tuple(scale.shape)}")
    if scale is not None and not (torch.isfinite(scale).all() and (scale >= 0).all()):
        f.fail(f"tensor {name}.act_scale", "expected finite values >= 0")
    topk_t = tensors.get(f"{name}.act_topk")
    topk = None if topk_t is None else int(_scalar(f, topk_t, f"tensor {name}.act_topk", integral=True))
    if topk is not None and not 0 <= topk <= k:
        f.fail(f"tensor {name}.act_topk", f"{topk} is outside [0, {k}] (in_features)")
    u, v = tensors.get(f"{name}.act_lr_u"), tensors.get(f"{name}.act_lr_v")
    lowrank = None
    if (u is None) != (v is None):
        f.fail(f"tensors {name}.act_lr_u/act_lr_v", "a low-rank term needs both factors")
    if u is not None and v is not None:
        n = info["out_features"]
        ok = u.dim() == 2 and v.dim() == 2 and u.shape[0] == n and v.shape[1] == k and u.shape[1] == v.shape[0] >= 1
        if not ok or not (u.is_floating_point() and v.is_floating_point()):
            f.fail(
                f"tensors {name}.act_lr_u/act_lr_v",
                f"expected float [{n}, r] and [r, {k}], got {u.dtype} {tuple(u.shape)} and {v.dtype} {tuple(v.shape)}",
            )
        if not (torch.isfinite(u).all() and torch.isfinite(v).all()):
            f.fail(f"tensors {name}.act_lr_u/act_lr_v", "expected finite values")
        lowrank = (u.float(), v.float())
    return SparsityParams(
        tau, mu, None if scale is None else scale.float(), topk, dict(info.get("calibration") or {}), lowrank
    )


def read_thresholds(path: str) -> tuple[dict[str, SparsityParams], dict[str, Any]]:
    """Read ``({layer: SparsityParams}, header)`` from a thresholds file (a file, or a folder holding
    ``actsparse_thresholds.safetensors``), every field checked; any problem is one ``ThresholdFileError``."""
    thresholds, header, _, _ = _read(path)
    return thresholds, header


def read_rotation(path: str) -> torch.Tensor | None:
    """The residual rotation's bases ``[L, D, D]`` saved with the thresholds at ``path``
    (``rotate_residual(model, basis=...)`` folds them), or None when the file holds none."""
    return _read(path)[2]


def read_input_rotation(path: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The input rotations' factors ``(Y [N, D, r], T [N, r, r])`` saved with the thresholds at ``path``
    (``rotate_inputs(model, factors=...)`` folds them), or None when the file holds none."""
    return _read(path)[3]


def _read(
    path: str,
) -> tuple[dict[str, SparsityParams], dict[str, Any], torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
    if isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
        folder = os.fspath(path)
        path = os.path.join(folder, THRESHOLDS_FILENAME)
        if not os.path.lexists(path):
            raise ThresholdFileError(
                f"folder {folder!r} holds no {THRESHOLDS_FILENAME} (a folder from actsparse.save_pretrained has one); "
                f"create it with `actsparse calibrate --out {path}` ({_SAVE_HINT})"
            )
    if isinstance(path, (str, os.PathLike)) and not os.path.lexists(path):
        raise ThresholdFileError(
            f"thresholds file {os.fspath(path)!r} does not exist; create it with "
            f"`actsparse calibrate --out {os.fspath(path)}` ({_SAVE_HINT})"
        )
    path = check_input_file(path, "thresholds file", ThresholdFileError)
    try:
        with safe_open(path, framework="pt") as st:
            meta = st.metadata() or {}
            tensors = {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118 (safe_open, not a dict)
    except Exception as e:  # safetensors raises several types for corrupt input
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ThresholdFileError(
            f"{path!r} is not a valid safetensors file (truncated, or another format such as a pickle: {first}); "
            f"re-create it with `actsparse calibrate --out {path}` ({_SAVE_HINT})"
        ) from None
    if "actsparse" not in meta:
        raise ThresholdFileError(
            f"{path!r} is a safetensors file but not an actsparse thresholds file "
            f"(no 'actsparse' header); re-create it with `actsparse calibrate --out {path}` ({_SAVE_HINT})"
        )
    header = _check_header(parse_json(meta["actsparse"], f"{path!r}: header", ThresholdFileError), repr(path))
    f = Fields(repr(path), ThresholdFileError)
    basis = _rotation_tensors(f, tensors, header)
    factors = _input_rotation_tensors(f, tensors, header)
    layers = header["layers"]
    for key in tensors:
        layer, _, buffer = key.rpartition(".")
        if layer not in layers or buffer not in BUFFERS:
            f.fail(f"tensor {key}", "belongs to no layer of the header")
    thresholds = {name: _layer_params(f, name, info, tensors) for name, info in layers.items()}
    return thresholds, header, basis, factors


@unfuses_experts
def load_thresholds(model: nn.Module, path: str, *, strict: bool = True, rotate: bool | str = False) -> nn.Module:
    """Sparsify ``model`` in place with the thresholds saved at ``path`` (a file or a folder).

    The file must match the model: every layer must exist as an ``nn.Linear`` of the same shape, and
    with ``strict=True`` the architecture fingerprint must match too. Nothing changes on error.
    Fused MoE experts are split into their per-expert Linears first (``actsparse.moe``).

    Thresholds calibrated on a rotated model (:func:`~actsparse.rotate_residual`) hold only on that rotation:
    ``rotate=True`` first folds the bases the file keeps into ``model`` (the original, unrotated checkpoint),
    then loads the thresholds; without it such a file loads only on the rotated model object or checkpoint.
    ``rotate="auto"`` (the CLI's): rotate exactly when the file keeps bases and ``model`` is not rotated.
    The same holds for thresholds calibrated on :func:`~actsparse.rotate_inputs`' rotated inputs: the file
    keeps their factors, and ``rotate=True``/``"auto"`` folds them into an unrotated model first.
    """
    if rotate not in (True, False, "auto"):
        raise UsageError(f"rotate must be True, False or 'auto', got {rotate!r}")
    thresholds, header, basis, factors = _read(path)
    check_not_sparsified(model, "loading thresholds")
    made_for = header.get("model", {})
    desc = f"{describe_model(made_for.get('name_or_path')) if made_for.get('name_or_path') else made_for.get('class')} "
    desc += f"({made_for.get('model_type')})"
    modules = dict(model.named_modules())
    problems = []
    for name, info in header["layers"].items():
        m = modules.get(name)
        if isinstance(m, nn.Linear) and type(m) is not nn.Linear:  # as apply_thresholds refuses it, but now:
            raise UsageError(  # before a rotation would fold (rotate=True)
                f"cannot sparsify {name!r}: expected a torch.nn.Linear, got {type(m).__name__}"
            )
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
    made_in, this_in = made_for.get("input_rotation"), input_rotation_of(model)
    if made_in is not None and this_in is not None and rotate is True:
        raise UsageError(
            f"rotate=True rotates an unrotated model; this one's inputs are rotated already ({this_in})"
            + (": load without rotate=True" if this_in == made_in else "")
        )
    if made_in is not None and this_in is None and rotate and factors is not None and rotation_of(model) is None:
        rotate_inputs(model, factors=factors, progress=False)  # checks everything before the first change
        this_in, rotate = input_rotation_of(model), False
    if made_in != this_in:
        raise _mismatch(
            path,
            f"rotated inputs (input rotation {made_in})" if made_in else "unrotated inputs",
            f"this model's inputs are rotated ({this_in})" if this_in else "this model's inputs are not rotated",
            " (pass rotate=True to rotate it with the file's factors first)" if made_in and not this_in else "",
        )
    made_on, this = made_for.get("rotation"), rotation_of(model)
    if rotate == "auto":
        rotate = basis is not None and this is None
    if rotate:
        if made_on is None:
            raise UsageError(f"rotate=True: the thresholds in {path!r} were calibrated on the unrotated model")
        if this is not None:
            raise UsageError(
                f"rotate=True rotates an unrotated model; this one is rotated already (basis {this})"
                + (": load without rotate=True" if this == made_on else "")
            )
        if basis is None:
            raise ThresholdFileError(
                f"{path!r} names its rotation ({made_on}) but holds no bases (an older actsparse, or saved from a "
                "reloaded checkpoint): load it on the rotated checkpoint, without rotate=True"
            )
        rotate_residual(model, basis=basis, progress=False)  # checks everything before the first change
        this = rotation_of(model)
    if made_on != this:
        raise _mismatch(
            path,
            f"a model whose residual stream is rotated (basis {made_on})" if made_on else "the unrotated model",
            f"this model is rotated with basis {this}" if this else "this model is not rotated",
            " (pass rotate=True to rotate it with the file's bases first)" if basis is not None and not this else "",
        )
    targets = {n: info.get("target_sparsity") for n, info in header["layers"].items()}
    methods = {info.get("method") for info in header["layers"].values()}
    method = methods.pop() if len(methods) == 1 else None
    return apply_thresholds(model, thresholds, target_sparsity=targets, method=method)


def _mismatch(path: str, made_on: str, this: str, hint: str) -> ThresholdFileError:
    return ThresholdFileError(
        f"thresholds in {path!r} were calibrated on {made_on}, {this}: load them on the checkpoint they were "
        f"calibrated on{hint}, or calibrate for this model"
    )


def save_pretrained(model: nn.Module, folder: str, tokenizer=None, **kwargs) -> None:
    """HF ``save_pretrained`` of the dense weights plus ``actsparse_thresholds.safetensors``.

    The HF checkpoint holds no actsparse keys, so any transformers install can load it; use
    ``actsparse.from_pretrained(folder)`` to get the sparsified model back. Everything is checked before the
    first write; the thresholds file is written last, and a save that fails part way leaves the folder as it
    was or without a thresholds file (never new weights beside the old thresholds).
    """
    check_output_path(folder, "checkpoint folder", folder=True)
    if input_rotation_of(model) is not None:
        raise UsageError(
            "save_pretrained cannot keep rotate_inputs' rotations (forward hooks, no Hugging Face modules): save the "
            "thresholds, which keep them (actsparse.save_thresholds), and load them on the original checkpoint with "
            "actsparse.load_thresholds(model, path, rotate=True)"
        )
    if adapter_weights(model):
        raise UsageError(
            "save_pretrained cannot keep the residual adapters of a per-layer rotation (they are no Hugging Face "
            "modules): save the thresholds, which keep the bases (actsparse.save_thresholds), and load them on the "
            "original checkpoint with actsparse.load_thresholds(model, path, rotate=True)"
        )
    if not callable(getattr(model, "save_pretrained", None)):
        raise InvalidTypeError(
            f"save_pretrained saves a Hugging Face model (PreTrainedModel), got {type(model).__name__}: save its "
            "thresholds with actsparse.save_thresholds(model, path)"
        )
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise InvalidTypeError(
            f"tokenizer must be a Hugging Face tokenizer or processor (it has save_pretrained), got {tokenizer!r}: "
            "load it with transformers.AutoTokenizer.from_pretrained(name)"
        )
    write_thresholds = _thresholds_writer(model, None)  # every check before the first write
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(_SUFFIXES)}
    path = os.path.join(folder, THRESHOLDS_FILENAME)
    with written_last(path):  # a save failing part way leaves no old thresholds beside new weights
        with keep_file_modes(folder):  # transformers writes its weights 0600; files keep the mode they had
            cast(Any, model).save_pretrained(folder, state_dict=state, **kwargs)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
        atomic_write(path, write_thresholds)


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
