"""Sparsity-vs-quality sweeps: every method at every target sparsity, on one model, with a table and a plot.

Each point: remove the previous sparsity, calibrate the method on the calibration batches, evaluate
perplexity on the evaluation tokens while counting the zeros every layer actually receives. *Measured
sparsity* is reported two ways: ``weighted`` (each layer's measured sparsity weighted by its weight count
= the fraction of weight columns a sparse kernel skips; what decode speed follows, and the x axis of the
plot) and ``mean`` (plain mean over layers).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from ..api import SparsifyConfig, remove_sparsity, sparsify_
from ..errors import InvalidTypeError, UsageError
from ..fileio import atomic_write
from ..input_rotation import input_rotation_weights
from ..methods import MethodConfig, method_from_spec, method_to_dict, parse_method_spec
from ..rotation import adapter_weights
from ..schema import json_safe
from ..scope import IgnoredScope, TargetScope
from ..sparse_linear import check_not_sparsified
from .perplexity import perplexity
from .plots import plot_sweep
from .sparsity import SparsityMonitor

__all__ = [
    "SweepPoint",
    "run_sweep",
    "sweep_methods",
    "parse_range",
    "weighted_sparsity",
    "write_sweep",
    "plot_sweep",
    "format_table",
    "method_meta",
]

ALL_PROJECTIONS = r".*\.(q|k|v|o|gate|up|down)_proj$"


@dataclass
class SweepPoint:
    method: str
    target: float
    measured: float  # weight-count-weighted measured sparsity
    measured_mean: float
    token_perplexity: float
    delta_percent: float  # perplexity increase over dense
    calibration_seconds: float
    per_layer: dict[str, float] | None = None
    allocated: dict[str, float | None] | None = None  # per-layer targets after allocation (greedy)
    mean_acc: float | None = None  # zero-shot mean accuracy (run_sweep's `accuracy`), and its standard error
    mean_acc_stderr: float | None = None


def parse_range(text: str) -> list[float]:
    """``"0.2:0.7:0.1"`` → [0.2, 0.3, ..., 0.7] (stop included); ``"0.3,0.5"`` → [0.3, 0.5]; ``"0.5"``."""
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) != 3 or parts[2] <= 0 or parts[1] < parts[0]:
                raise ValueError
            start, stop, step = parts
            n = int(math.floor((stop - start) / step + 1e-9)) + 1
            values = [round(start + i * step, 10) for i in range(n)]
        else:
            values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UsageError(
            f"bad sparsity list {text!r}; use START:STOP:STEP (e.g. 0.2:0.7:0.1) or a comma list"
        ) from None
    if not values:
        raise UsageError(f"bad sparsity list {text!r}: no values")
    bad = [v for v in values if not 0.0 <= v < 1.0]
    if bad:
        raise UsageError(f"sparsities must be in [0, 1), got {bad}")
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise UsageError(f"sparsity {', '.join(f'{v:g}' for v in twice)} is given twice in {text!r}; give each once")
    return values


def sweep_methods(specs: Sequence[str]) -> dict[str, MethodConfig]:
    """``{label: method}`` for method specs ``NAME[:KEY=VALUE[:KEY=VALUE...]]`` (e.g.
    ``teal-greedy:step=0.025:greedy_tokens=null``; values as ``actsparse calibrate --option`` reads them). The
    label is the spec, spaces around ``:`` removed. Checks every spec (name, option keys and values) and refuses
    a spec given twice, so a bad list fails before any model work."""
    if isinstance(specs, str):
        raise InvalidTypeError(
            f"sweep methods are a list of specs, e.g. ['quantile', 'teal-greedy:step=0.025'], got {specs!r}"
        )
    methods: dict[str, MethodConfig] = {}
    for spec in specs:
        if not isinstance(spec, str):
            raise InvalidTypeError(f"sweep methods are spec strings NAME[:KEY=VALUE...], got {type(spec).__name__}")
        label = ":".join(p.strip() for p in spec.split(":"))
        if label in methods:
            raise UsageError(
                f"sweep method {label!r} is given twice; drop one, or give the two different "
                f"options (NAME:KEY=VALUE) to compare variants"
            )
        try:
            name, options = parse_method_spec(label)
            methods[label] = method_from_spec(name, **options)
        except ValueError as e:
            raise UsageError(f"sweep method {label!r}: {e}") from None
    if not methods:
        raise UsageError("no methods to sweep")
    return methods


def weighted_sparsity(model: nn.Module, measured: Mapping[str, float]) -> float:
    """Measured sparsity weighted by each layer's weight count: the fraction of the sparse layers' weights
    skipped, less the weights a rotated model's residual adapters (``actsparse.rotation``) and input rotations
    (``actsparse.input_rotation``) read per token."""
    layers = dict(model.named_modules())
    sizes = {n: layers[n].in_features * layers[n].out_features for n in measured}
    total = sum(sizes.values())
    skipped = sum(measured[n] * sizes[n] for n in measured) - adapter_weights(model) - input_rotation_weights(model)
    return skipped / total if total else 0.0


def run_sweep(
    model: nn.Module,
    calibration: Sequence[Any],
    eval_ids: torch.Tensor,
    methods: Sequence[str],
    sparsities: Sequence[float],
    *,
    scope: str = ALL_PROJECTIONS,
    ignored: Sequence[str] = (),
    context: int = 1024,
    stride: int | None = None,
    progress: bool = True,
    per_layer: bool = False,
    on_point: Callable[[SweepPoint], None] | None = None,
    accuracy: Callable[[nn.Module], tuple[float, float] | None] | None = None,
    on_dense: Callable[[float], None] | None = None,
) -> tuple[float, list[SweepPoint]]:
    """Dense perplexity and one :class:`SweepPoint` per (method, sparsity). The model ends dense.

    ``methods``: specs ``NAME[:KEY=VALUE...]`` (see :func:`sweep_methods`); each point's ``method`` is its spec.
    ``accuracy(model)``: a second quality axis, e.g. zero-shot mean accuracy ``(mean, stderr)`` through lm-eval
    (the CLI's ``--tasks``), measured for every point (the dense model's is the caller's to take).
    ``on_dense(ppl)`` gets the dense perplexity as soon as it is known, ``on_point(point)`` each point as it is
    done: what a caller needs to keep partial results of a sweep that fails or is interrupted."""
    specs = sweep_methods(methods).items()  # check every spec before the long work
    check_not_sparsified(model, "sweeping")
    dense = perplexity(model, eval_ids, context=context, stride=stride, progress=progress).token_perplexity
    if on_dense is not None:
        on_dense(dense)
    points = []
    ignored_scope = IgnoredScope(patterns=list(ignored)) if ignored else None
    try:
        for name, method in specs:
            for s in sparsities:
                config = SparsifyConfig({TargetScope(patterns=[scope]): s}, ignored_scope, method)
                t = time.perf_counter()
                sparsify_(model, config, calibration, progress=progress)
                seconds = time.perf_counter() - t
                with SparsityMonitor(model) as mon:
                    ppl = perplexity(model, eval_ids, context=context, stride=stride, progress=progress)
                measured = mon.sparsity()
                allocated = dict(mon.targets())
                acc = accuracy(model) if accuracy is not None else None
                point = SweepPoint(
                    name,
                    s,
                    weighted_sparsity(model, measured),
                    sum(measured.values()) / len(measured),
                    ppl.token_perplexity,
                    100.0 * (ppl.token_perplexity / dense - 1.0),
                    seconds,
                    measured if per_layer else None,
                    allocated if per_layer else None,
                    None if acc is None else acc[0],
                    None if acc is None else acc[1],
                )
                points.append(point)
                if on_point is not None:
                    on_point(point)
                remove_sparsity(model)
    finally:
        remove_sparsity(model)
    return dense, points


def format_table(dense: float, points: Sequence[SweepPoint], dense_acc: float | None = None) -> list[str]:
    w = max([18] + [len(p.method) + 2 for p in points])
    accs = any(p.mean_acc is not None for p in points)
    acc_head = f"{'mean acc':>10}" if accs else ""
    lines = [
        f"{'method':<{w}}{'target':>8}{'measured':>10}{'(mean)':>8}{'token ppl':>11}{'Δ ppl':>11}{acc_head}{'calib s':>9}",
        f"{'dense':<{w}}{'':>8}{'':>10}{'':>8}{dense:>11.3f}{'':>11}"
        + (f"{dense_acc:>10.4f}" if accs and dense_acc is not None else f"{'':>10}" if accs else "")
        + f"{'':>9}",
    ]
    for p in points:
        acc = (f"{p.mean_acc:>10.4f}" if p.mean_acc is not None else f"{'-':>10}") if accs else ""
        lines.append(
            f"{p.method:<{w}}{p.target:>8.2f}{p.measured:>10.3f}{p.measured_mean:>8.3f}"
            f"{p.token_perplexity:>11.3f}{p.delta_percent:>+10.2f}%{acc}{p.calibration_seconds:>9.1f}"
        )
    return lines


def write_sweep(
    folder: str, dense: float, points: Sequence[SweepPoint], meta: dict[str, Any], *, plot: bool = True
) -> dict[str, str]:
    """Write ``sweep.csv``, ``sweep.json`` and (``plot``, when matplotlib is installed) ``sweep.png`` into
    ``folder``, each atomically. Without ``plot`` an older ``sweep.png`` there is removed (it would not match)."""

    os.makedirs(folder, exist_ok=True)
    paths = {"csv": os.path.join(folder, "sweep.csv"), "json": os.path.join(folder, "sweep.json")}
    fields = [
        "method",
        "target",
        "measured",
        "measured_mean",
        "token_perplexity",
        "delta_percent",
        "calibration_seconds",
        "mean_acc",
        "mean_acc_stderr",
    ]

    def write_csv(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(fields)
            w.writerow(
                ["dense", 0.0, 0.0, 0.0, dense, 0.0, 0.0, meta.get("dense_mean_acc"), meta.get("dense_mean_acc_stderr")]
            )
            for p in points:
                w.writerow([getattr(p, k) for k in fields])

    def write_json(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            data = {**meta, "dense_token_perplexity": dense, "points": [asdict(p) for p in points]}
            json.dump(json_safe(data), f, indent=2, allow_nan=False)

    atomic_write(paths["csv"], write_csv)
    atomic_write(paths["json"], write_json)
    if not plot:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, "sweep.png"))
        return paths
    png = plot_sweep(
        os.path.join(folder, "sweep.png"), dense, points, title=meta.get("title"), dense_acc=meta.get("dense_mean_acc")
    )
    if png:
        paths["png"] = png
    return paths


def method_meta(methods: Sequence[str]) -> dict[str, Any]:
    """``{spec: the method's config as a dict}`` for the sweep's method specs."""
    return {label: method_to_dict(m) for label, m in sweep_methods(methods).items()}
