"""SCAP (seed 003): mode-centering before magnitude thresholding.

Per layer, a mode μ of the input distribution is found first (``zero``: μ = 0, plain thresholding;
``median``: the median of x; ``kde``: the peak of a kernel density estimate), then τ is the quantile of
``|x - μ|`` at the target sparsity. Entries with ``|x - μ| <= τ`` are replaced by μ, i.e. the layer
computes ``W·mask(x - μ) + μ·ΣW + b``: the shift is folded into the output bias, so a sparse kernel still
skips the weight rows of dropped entries and nothing else changes.

Two calibration passes over the same data (mode, then τ); ``kde`` adds one more when its candidate
peaks disagree: like SCAP, the candidate whose thresholded input gives the smallest output error
``‖W(x_eff - x)‖₂`` wins.

Config strings as in SCAP's scripts: ``"up,zero,0.35,gate,zero,0.35,down,median,0.55"`` (layer type, mode,
target sparsity), parsed by :func:`parse_scap_config`; calibrated values export to / import from SCAP's
``calibrated_thresholds.json`` (:func:`export_scap_json`, :func:`import_scap_json`).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ThresholdFileError, UsageError
from ..fileio import atomic_write
from ..offload import layer_weight
from ..rule import SparsityParams
from ..schema import Fields, read_json_file
from ..scope import TargetScope
from ..sparse_linear import sparse_layers
from ..stats import Collector, HistogramQuantile, Reservoir, SignedQuantile
from .base import MethodConfig, register_method

__all__ = ["ScapMethod", "parse_scap_config", "export_scap_json", "read_scap_json", "MODES", "kde_peaks"]

MODES = ("zero", "median", "kde")


def layer_kind(name: str) -> str:
    """``model.layers.3.mlp.up_proj`` → ``up`` (the last name component without ``_proj``)."""
    last = name.rsplit(".", 1)[-1]
    return last[:-5] if last.endswith("_proj") else last


def kde_peaks(samples: torch.Tensor, bw_adjust: float = 0.5, gridsize: int = 2000) -> list[float]:
    """Peaks of a Gaussian KDE (Scott's bandwidth × ``bw_adjust``, evaluated on ``gridsize`` points over
    [min, max] as seaborn's ``cut=0``) of three nested sub-samples (1/3, 2/3, all), as SCAP's candidates.

    The density is computed exactly by binning the samples on a grid 4× finer than the output grid and
    convolving with the Gaussian kernel (error < one fine bin in the peak position).
    """
    x = samples.double().reshape(-1)
    x = x[torch.isfinite(x)]
    if x.numel() < 2:
        raise UsageError("the KDE needs at least 2 finite samples")
    peaks = []
    for part in (x.numel() // 3, 2 * x.numel() // 3, x.numel()):
        v = x[: max(part, 2)]
        lo, hi = v.min().item(), v.max().item()
        if hi <= lo:
            peaks.append(lo)
            continue
        bw = bw_adjust * v.std().item() * v.numel() ** (-1 / 5)
        if bw <= 0:
            bw = (hi - lo) / gridsize
        nfine = 4 * gridsize
        step = (hi - lo) / (nfine - 1)
        counts = torch.bincount(((v - lo) / step).round().long().clamp(0, nfine - 1), minlength=nfine).double()
        half = min(nfine, int(math.ceil(4 * bw / step)))
        offs = torch.arange(-half, half + 1, dtype=torch.float64) * step
        kernel = torch.exp(-0.5 * (offs / bw) ** 2)
        dens = torch.nn.functional.conv1d(counts.view(1, 1, -1), kernel.view(1, 1, -1), padding=half).view(-1)
        grid = torch.linspace(lo, hi, gridsize, dtype=torch.float64)
        at = dens[((grid - lo) / step).round().long().clamp(0, nfine - 1)]
        peaks.append(float(grid[int(at.argmax())]))
    return peaks


class _ScapCollector(Collector):
    """Pass 1: the mode (median histogram or KDE reservoir); pass 2: τ = quantile of |x - μ| per candidate;
    pass 3 (only with several candidates): output error of each candidate."""

    def __init__(self, mode: str, q: float, weight: torch.Tensor, cfg: ScapMethod):
        self.mode, self.q, self.weight, self.cfg = mode, q, weight, cfg
        self.stage = "mode"
        self.candidates: list[float] = [0.0]
        self.stat: Any = None
        if mode == "zero":
            self.stage = "tau"
        elif mode == "median":
            self.stat = SignedQuantile(0.5, cfg.bins_per_octave)
        else:
            self.stat = Reservoir(cfg.kde_samples, seed=0)
        if self.stage == "tau":
            self._start_tau()

    def _start_tau(self):
        self.stage = "tau"
        self.hists = [HistogramQuantile(self.q, self.cfg.bins_per_octave) for _ in self.candidates]

    def update(self, x: torch.Tensor) -> None:
        if self.stage == "mode":
            self.stat.update(x)
        elif self.stage == "tau":
            for c, h in zip(self.candidates, self.hists):
                h.update(x if c == 0.0 else x.float() - c)
        else:  # "error": ‖W(x_eff - x)‖² = ‖W·(dropped entries' (μ - x))‖²
            w = self.weight.float()
            xf = x.float()
            for i, (c, t) in enumerate(zip(self.candidates, self.taus)):
                delta = torch.where((xf - c).abs() <= t, c - xf, torch.zeros_like(xf))
                self.errors[i] += float((delta @ w.t()).pow(2).sum())

    def next_pass(self) -> bool:
        if self.stage == "mode":
            if self.mode == "median":
                self.candidates = [self.stat.result()]
            else:
                self.candidates = sorted(set(kde_peaks(self.stat.values, self.cfg.kde_bw_adjust)))
            self._start_tau()
            return True
        if self.stage == "tau" and len(self.candidates) > 1:
            self.taus = [h.result() for h in self.hists]
            self.errors = [0.0] * len(self.candidates)
            self.stage = "error"
            return True
        return False

    def result(self) -> SparsityParams:
        if self.stage == "error":
            i = min(range(len(self.candidates)), key=lambda j: self.errors[j])
            mu, tau = self.candidates[i], self.taus[i]
        else:
            mu, tau = self.candidates[0], self.hists[0].result()
        mu = float(torch.tensor(mu, dtype=torch.float32))  # stored as an fp32 buffer
        info = {"demode_method": self.mode, "mode": mu}
        if len(self.candidates) > 1:
            info["candidate_modes"] = self.candidates
        return SparsityParams(tau, shift=mu, info=info)


@register_method("scap")
@dataclass(frozen=True)
class ScapMethod(MethodConfig):
    """Mode-centering (SCAP). ``mode`` applies to every layer unless ``modes`` names its type
    (``{"down": "kde", "up": "zero"}``; the type is the module name's last part without ``_proj``)."""

    mode: str = "zero"
    modes: dict[str, str] = field(default_factory=dict)
    kde_samples: int = 300_000
    kde_bw_adjust: float = 0.5
    bins_per_octave: int = 1024

    def __post_init__(self):
        super().__post_init__()
        for m in [self.mode, *self.modes.values()]:
            if m not in MODES:
                raise UsageError(f"unknown SCAP mode {m!r}; choose one of {', '.join(MODES)}")
        if self.kde_samples < 100:
            raise UsageError(f"kde_samples must be >= 100, got {self.kde_samples}")
        if not self.kde_bw_adjust > 0:
            raise UsageError(f"kde_bw_adjust must be > 0, got {self.kde_bw_adjust}")

    def __hash__(self):
        return hash((self.mode, tuple(sorted(self.modes.items())), self.kde_samples, self.kde_bw_adjust))

    def mode_for(self, layer_name: str) -> str:
        return self.modes.get(layer_kind(layer_name), self.mode)

    def make_collector(self, layer_name, module, target_sparsity):
        return _ScapCollector(self.mode_for(layer_name), target_sparsity, layer_weight(module), self)


# --------------------------------------------------------------------------------- config strings
_CONFIG_HELP = "expected 'TYPE,MODE,SPARSITY' triplets, e.g. 'up,zero,0.35,gate,zero,0.35,down,median,0.55'"


def parse_scap_config(text: str) -> tuple[dict[TargetScope, float], ScapMethod]:
    """``"up,zero,0.35,gate,zero,0.35,down,zero,0.55"`` → (target sparsity by scope, ``ScapMethod``).

    A layer type ``T`` matches modules whose name ends in ``.T_proj`` or ``.T`` (``up`` → ``mlp.up_proj``).
    """
    fields = text.replace(" ", "").split(",")
    if not text.strip() or len(fields) % 3 or any(not f for f in fields):
        raise UsageError(f"bad SCAP config {text!r}: {_CONFIG_HELP}")
    scopes: dict[TargetScope, float] = {}
    modes: dict[str, str] = {}
    for kind, mode, value in zip(fields[0::3], fields[1::3], fields[2::3]):
        if not re.fullmatch(r"[A-Za-z0-9_]+", kind):
            raise UsageError(f"bad SCAP config {text!r}: layer type {kind!r} is not a name; {_CONFIG_HELP}")
        if kind in modes:
            raise UsageError(f"bad SCAP config {text!r}: layer type {kind!r} appears twice")
        if mode not in MODES:
            raise UsageError(f"bad SCAP config {text!r}: unknown mode {mode!r} (choose {', '.join(MODES)})")
        try:
            sparsity = float(value)
        except ValueError:
            raise UsageError(f"bad SCAP config {text!r}: sparsity {value!r} is not a number; {_CONFIG_HELP}") from None
        if not 0.0 <= sparsity < 1.0:
            raise UsageError(f"bad SCAP config {text!r}: sparsity {sparsity} must be in [0, 1)")
        modes[kind] = mode
        scopes[TargetScope(patterns=[rf".*\.{kind}(_proj)?$"])] = sparsity
    return scopes, ScapMethod(mode="zero", modes=modes)


# ------------------------------------------------------------------------------------- JSON files
def export_scap_json(model: torch.nn.Module, path: str) -> str:
    """Write SCAP's ``calibrated_thresholds.json`` for every sparsified layer (atomically)."""
    layers = sparse_layers(model)
    if not layers:
        raise UsageError("the model has no SparseLinear layers; sparsify it before exporting")
    out = {}
    for name, m in layers.items():
        p = m.params
        if p.scale is not None or p.topk is not None:
            raise UsageError(f"layer {name!r} uses a per-channel scale or top-k, which SCAP's format cannot hold")
        info = getattr(m, "calibration", None) or {}
        out[name] = {
            "module_name": name,
            "demode_method": info.get("demode_method", "zero" if not p.shift else "median"),
            "mode": p.shift,
            "threshold": p.threshold,
            "target_sparsity": m.target_sparsity,
            "hook_type": "pre_hook",
        }
    text = json.dumps(out, indent=2)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)
    return path


_SCAP_KEYS = {"module_name", "demode_method", "mode", "threshold", "target_sparsity", "hook_type"}


def read_scap_json(path: str) -> tuple[dict[str, SparsityParams], dict[str, float | None]]:
    """``(params, target sparsities)`` per layer of a SCAP ``calibrated_thresholds.json`` (validated);
    :func:`actsparse.import_scap_json` applies them to a model."""
    data = read_json_file(path, "SCAP thresholds file", ThresholdFileError)
    f = Fields(f"SCAP thresholds file {os.fspath(path)!r}", ThresholdFileError)
    data = f.obj(data, "the file (expected {module name: {mode, threshold, ...}})", non_empty=True)
    params: dict[str, SparsityParams] = {}
    targets: dict[str, float | None] = {}
    for name, raw in data.items():
        entry = f.obj(raw, repr(name), allowed=_SCAP_KEYS, required=("threshold", "mode"))
        f.string(entry.get("hook_type", "pre_hook"), f"{name!r}.hook_type", choices=("pre_hook",))
        f.string(entry.get("module_name", name), f"{name!r}.module_name")
        tau = f.number(entry["threshold"], f"{name!r}.threshold", finite=False)
        mu = f.number(entry["mode"], f"{name!r}.mode")
        targets[name] = f.number(entry.get("target_sparsity"), f"{name!r}.target_sparsity", lo=0.0, hi=1.0, none=True)
        demode = f.string(entry.get("demode_method", "zero"), f"{name!r}.demode_method")
        assert tau is not None and mu is not None
        params[name] = SparsityParams(tau, shift=mu, info={"demode_method": demode, "mode": mu})
    return params, targets
