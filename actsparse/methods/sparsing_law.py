"""Sparsing Law (seed 001) sparsity metrics: ``topk``, ``fat`` (FAT-ε) and ``pplp`` (PPL-p%).

All three act on the layers in scope; the seed applies them to the FFN intermediate activation
``act(gate(x)) * up(x)``, i.e. the input of ``down_proj`` (scope ``.*down_proj``). With
``column_norms=True`` (the default for ``pplp``, as in the seed's evaluation code) an entry's score is
``|x_j| · ‖W[:, j]‖₂`` (its contribution to the output norm), i.e. the thresholds are divided by the
column norms of the layer's weight.

* ``topk``: every token keeps ``k = round((1 - s) · width)`` entries (``s`` = the scope's target; the seed's
  ``prune_arg`` is the activation ratio ``1 - s``).
* ``fat``: one fixed threshold ``epsilon`` for every layer (the scope's target sparsity is not used).
* ``pplp``: per-layer adaptive thresholds such that perplexity on the calibration data rises by ``p``
  (``prune_arg = 1 + p``). Each layer's threshold is set where its *CETT* (cumulative error of tail
  truncation: ``‖W·(x ⊙ dropped)‖ / ‖W·x‖`` per token, averaged over tokens) equals one shared value c,
  and c is found by bisection on the measured perplexity ratio (to ``ppl_tolerance``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import CalibrationError, UsageError
from ..forward import calibration_tokens, call_model, input_hooks, next_token_nll
from ..offload import layer_weight
from ..rule import SparsityParams, dense_equivalent_input, drop_mask
from ..stats import Collector, HistogramQuantile
from .base import MethodConfig, register_method
from .wina import column_norms

__all__ = ["SparsingLawMethod", "METRICS", "calibration_perplexity"]

METRICS = ("topk", "fat", "pplp")


class _Fixed(Collector):
    """Collector that needs no statistics (its result is known up front), but checks the layer is reached."""

    def __init__(self, params: SparsityParams):
        self.params, self.n = params, 0

    def update(self, x: torch.Tensor) -> None:
        self.n += x.shape[0]

    def result(self) -> SparsityParams:
        if self.n == 0:
            raise UsageError("no values were collected")
        return self.params


def calibration_perplexity(model: nn.Module, batches, device) -> float:
    """Token perplexity of ``model`` on the calibration batches (next-token NLL over non-pad tokens)."""

    nll, n = next_token_nll(model, batches, device)
    if n == 0:
        raise UsageError("the calibration batches have no next-token pairs to score")
    return math.exp(nll / n)


@register_method("sparsing-law")
@dataclass(frozen=True)
class SparsingLawMethod(MethodConfig):
    """Sparsing Law metrics (see the module docstring). ``p`` is the PPL increase for ``pplp`` (0.01 = PPL-1%,
    the seed's ``prune_arg`` 1.01); ``epsilon`` the FAT threshold; ``column_norms`` None = True for pplp only."""

    metric: str = "pplp"
    p: float = 0.01
    epsilon: float = 0.01
    column_norms: bool | None = None
    grid: int = 32  # sparsity levels of each layer's CETT curve
    cett_tokens: int = 2048  # calibration tokens used for the CETT curves
    ppl_tolerance: float = 0.001  # stop when |PPL ratio - (1 + p)| <= this (0.1 percentage point)
    max_iterations: int = 30

    def __post_init__(self):
        super().__post_init__()
        if self.metric not in METRICS:
            raise UsageError(f"unknown Sparsing Law metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        if self.metric == "pplp" and not self.p > 0:
            raise UsageError(f"pplp needs p > 0 (the PPL increase, e.g. 0.01 for PPL-1%), got {self.p}")
        if self.metric == "fat" and not self.epsilon >= 0:
            raise UsageError(f"fat needs epsilon >= 0, got {self.epsilon}")
        if self.grid < 4 or self.cett_tokens < 1 or self.max_iterations < 1 or not self.ppl_tolerance > 0:
            raise UsageError("grid must be >= 4, cett_tokens and max_iterations >= 1, ppl_tolerance > 0")

    @property
    def uses_norms(self) -> bool:
        return self.metric == "pplp" if self.column_norms is None else self.column_norms

    def make_collector(self, layer_name, module, target_sparsity):
        scale = column_norms(layer_weight(module)) if self.uses_norms else None
        if self.metric == "topk":
            k = module.in_features
            return _Fixed(SparsityParams(-math.inf, scale=scale, topk=k - round(target_sparsity * k)))
        return _Fixed(SparsityParams(self.epsilon, scale=scale))  # fat (pplp is a search: see searches())

    # ----------------------------------------------------------------------------------- PPL-p%
    def searches(self) -> bool:
        return self.metric == "pplp"  # topk and fat are per-layer collectors

    def calibrate_model(
        self, model: nn.Module, batches, targets: dict[str, float], device, *, progress: bool = True
    ) -> dict[str, SparsityParams]:
        """PPL-p%: one shared CETT level, bisected until the calibration perplexity rises by ``p``."""
        modules = dict(model.named_modules())
        layers = {n: modules[n] for n in targets}
        scales = {n: column_norms(layer_weight(m)) if self.uses_norms else None for n, m in layers.items()}
        curves = _cett_curves(model, batches, layers, scales, self.grid, self.cett_tokens, device, progress)
        dense = calibration_perplexity(model, batches, device)
        goal = 1.0 + self.p
        lo, hi = 0.0, max(float(c[-1]) for _, c in curves.values())  # CETT at the largest grid sparsity
        best = None
        bar = tqdm(range(self.max_iterations), desc="pplp search", disable=not progress)
        for _ in bar:
            c = 0.5 * (lo + hi)
            params = {n: SparsityParams(_tau_at(curves[n], c), scale=scales[n]) for n in layers}
            ratio = _perplexity_with(model, batches, layers, params, device) / dense
            bar.set_postfix_str(f"CETT {c:.4f} → PPL ratio {ratio:.4f}")
            if best is None or abs(ratio - goal) < abs(best[0] - goal):
                best = (ratio, c, params)
            if abs(ratio - goal) <= self.ppl_tolerance:
                break
            lo, hi = (c, hi) if ratio < goal else (lo, c)
        assert best is not None  # max_iterations >= 1 (checked in __post_init__)
        ratio, c, params = best
        if abs(ratio - goal) > 0.005:
            raise CalibrationError(
                f"pplp could not reach PPL ratio {goal:.4f} on the calibration data (closest: {ratio:.4f} at CETT "
                f"{c:.4g}); the layers in scope {'cannot move' if ratio < goal else 'move'} perplexity that much "
                f"{'even at 99.5% sparsity' if ratio < goal else 'at the finest step'}: choose another p or scope"
            )
        for p in params.values():
            p.info = {
                "metric": "pplp",
                "cett": c,
                "ppl_ratio": ratio,
                "dense_calibration_ppl": dense,
                "score_threshold": p.threshold,
            }
        return params


@torch.no_grad()
def _cett_curves(model, batches, layers, scales, grid, max_tokens, device, progress):
    """Per layer: (thresholds at ``grid`` sparsity levels, mean CETT at each), from dense activations."""

    hists = {n: HistogramQuantile(0.5) for n in layers}
    kept: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    budget = dict.fromkeys(layers, max_tokens)
    state = {"mask": None}

    def collect(name: str, module: nn.Module, x: torch.Tensor) -> None:
        x = calibration_tokens(x, state["mask"], name)
        s = x.float().abs() * (scales[name].to(x.device) if scales[name] is not None else 1.0)
        hists[name].update(s)
        if budget[name] > 0:
            kept[name].append(x[: budget[name]].detach().float().cpu())
            budget[name] -= kept[name][-1].shape[0]

    with input_hooks(layers, collect):
        for b in tqdm(batches, desc="pplp statistics", disable=not progress):
            state["mask"] = b.token_mask
            call_model(model, b, device)
    levels = torch.linspace(0.0, 0.995, grid).tolist()
    curves = {}
    for n, lin in layers.items():
        if hists[n].n == 0:
            raise CalibrationError(f"layer {n!r} saw no calibration tokens; is it reached by the forward pass?")
        x = torch.cat(kept[n])
        w = layer_weight(lin).float().cpu()
        full = (x @ w.t()).norm(dim=-1).clamp_min(1e-30)
        taus, cett = [], []
        for q in levels:
            tau = hists[n].quantile(q) if q > 0 else -math.inf
            drop = drop_mask(x, tau, scale=scales[n].cpu() if scales[n] is not None else None)
            err = ((x * drop) @ w.t()).norm(dim=-1) / full
            taus.append(tau)
            cett.append(float(err.mean()))
        curves[n] = (taus, torch.tensor(cett).cummax(0).values.tolist())  # monotone in the threshold
    return curves


def _tau_at(curve, c: float) -> float:
    """The threshold where a layer's CETT curve reaches ``c`` (linear interpolation between grid points;
    the first grid point is "keep everything": τ = -inf, CETT 0, interpolated from τ = 0)."""
    taus, cett = curve
    if c <= 0.0:
        return -math.inf
    for i in range(1, len(taus)):
        if cett[i] >= c:
            lo_tau = taus[i - 1] if math.isfinite(taus[i - 1]) else 0.0
            if cett[i] == cett[i - 1]:
                return taus[i]
            f = (c - cett[i - 1]) / (cett[i] - cett[i - 1])
            return lo_tau + f * (taus[i] - lo_tau)
    return taus[-1]


@torch.no_grad()
def _perplexity_with(model, batches, layers, params, device) -> float:
    def apply(name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        p = params[name]
        scale = p.scale.to(x.device) if p.scale is not None else None
        return dense_equivalent_input(x, p.threshold, None, scale, p.topk)

    with input_hooks(layers, apply):
        return calibration_perplexity(model, batches, device)
