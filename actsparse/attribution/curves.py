"""Accuracy–sparsity trade-off curves of attribution-based unit deactivation (seed 004's experiment).

Two modes:

* ``per-input`` (the seed's curves): every evaluation example is scored by its own backward pass — on the
  dense model's own greedy predictions by default (``target="dense"``, the seed's generated labels), or on the
  true next tokens (``target="labels"``, an oracle) — and the lowest-scoring units of each layer are deactivated
  for that example only. Needs gradients at inference: an analysis, not a deployment.
* ``calibrated`` (deployable): scores are averaged over a calibration set into one ranking per layer; the same
  units are deactivated for every input (a static mask, savable as thresholds: ``--method attribution``).

Each point deactivates the same fraction of units in every unit layer of the chosen set (``heads``,
``neurons`` or ``both``) and reports next-token accuracy and perplexity on the evaluation tokens, and
multiple-choice accuracy when MC items are given.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import UsageError
from ..eval.mc import MCExample, mc_scores
from ..eval.plots import plot_tradeoff
from ..fileio import atomic_write
from ..schema import json_safe
from .scores import (
    ScoreBatch,
    UnitStats,
    calibrated_scores,
    check_metrics,
    collect_stats,
    gradient_drift,
    keep_masks,
    masked_nll,
    masked_row_nll,
    row_nll,
    unit_scores,
    unit_statistics,
)
from .units import UnitLayer

__all__ = ["CurvePoint", "tradeoff_curves", "write_curves", "check_options", "UNIT_SETS", "MODES", "TARGETS"]

UNIT_SETS = ("heads", "neurons", "both")
MODES = ("per-input", "calibrated")
TARGETS = ("dense", "labels")


@dataclass
class CurvePoint:
    mode: str
    units: str
    metric: str
    sparsity: float
    perplexity: float
    accuracy: float
    tokens: int
    mc_accuracy: float | None = None
    mc_accuracy_norm: float | None = None
    mc_items: int = 0


# ---------------------------------------------------------------------------------------- eval items
def _attribution_target(model, batch: ScoreBatch, target: str) -> ScoreBatch:
    """``batch`` labelled with the dense model's greedy predictions (``target="dense"``) or as it is."""
    if target == "labels":
        return batch
    with torch.no_grad():
        _, pred = row_nll(model, batch)
    return batch.with_labels(pred.cpu())


class _CorpusItem:
    def __init__(self, batch: ScoreBatch):
        self.batch = batch

    def attribution_batch(self, model, target: str) -> ScoreBatch:
        return _attribution_target(model, self.batch, target)

    def evaluate(self, model, layers, keep) -> Counter:
        nll, n, correct = masked_nll(model, layers, self.batch, keep)
        # typeshed types a Counter's values as int; this one also sums the (float) NLL
        return Counter(nll=nll, tokens=n, correct=correct)  # type: ignore[call-overload]


class _MCItem:
    def __init__(self, ex: MCExample):
        self.ex = ex
        self.rows = ScoreBatch(ex.rows, ex.attention, ex.rows[:, 1:].clone(), ex.choice_mask)

    def attribution_batch(self, model, target: str) -> ScoreBatch:
        return _attribution_target(model, ScoreBatch.from_ids(self.ex.prompt), target)

    def evaluate(self, model, layers, keep) -> Counter:
        c = self.rows.ids.shape[0]  # per-input masks come from the one prompt row: same for every choice
        keep = {n: (k.expand(c, -1) if k.dim() == 2 else k) for n, k in (keep or {}).items()}
        nll, _ = masked_row_nll(model, layers, self.rows, keep)
        loglik = -(nll.double() * self.rows.label_mask.to(nll.device)).sum(1).cpu()
        ok, ok_norm = mc_scores(loglik, self.ex)
        return Counter(mc_correct=int(ok), mc_norm=int(ok_norm), mc_total=1)


def _subset(layers: list[UnitLayer], units: str) -> list[str]:
    return [la.name for la in layers if units == "both" or la.kind == units]


# ------------------------------------------------------------------------------------------ scoring
def _scores(stats: dict[str, UnitStats], names, metric, rho) -> dict[str, torch.Tensor]:
    return {n: unit_scores(stats[n], metric, rho) for n in names}


# ------------------------------------------------------------------------------------------- curves
def tradeoff_curves(
    model: nn.Module,
    layers: list[UnitLayer],
    *,
    eval_batches: Sequence[ScoreBatch] = (),
    mc_examples: Sequence[MCExample] = (),
    calibration: Sequence[ScoreBatch] = (),
    metrics: Sequence[str] = ("magnitude", "gxo", "cor_gxo"),
    sparsities: Sequence[float] = (0.5,),
    units: Sequence[str] = UNIT_SETS,
    modes: Sequence[str] = MODES,
    n_steps: int = 8,
    ig_chunk: int = 4,
    rho: float | str = 0.5,
    target: str = "dense",
    progress: bool = True,
    on_point: Callable[[CurvePoint], None] | None = None,
) -> list[CurvePoint]:
    """Evaluate every (mode, unit set, metric, sparsity); the 0-sparsity point (dense) is shared by all."""
    metrics = check_metrics(metrics)
    check_options(sparsities, units, modes, n_steps, rho, target)
    if "calibrated" in modes and not calibration:
        raise UsageError("calibrated mode needs calibration batches")
    items = [_CorpusItem(b) for b in eval_batches] + [_MCItem(e) for e in mc_examples]
    if not items:
        raise UsageError("nothing to evaluate: give evaluation batches and/or multiple-choice examples")
    steps = n_steps if "ig" in metrics else 0
    auto = "cor_gxo" in metrics and rho == "auto"
    levels = [s for s in sparsities if s > 0]
    acc: dict[tuple, Counter] = {}

    def add(key, c):
        acc[key] = acc.get(key, Counter()) + c

    dense: Counter[str] = Counter()
    for item in tqdm(items, desc="dense", disable=not progress):
        dense += item.evaluate(model, layers, None)
    if "per-input" in modes:
        per_item = len(levels) * len(units) * len(metrics)
        with tqdm(total=len(items) * per_item, desc="per-input", disable=not progress) as bar:
            for item in items:
                attr = item.attribution_batch(model, target)
                stats, grads = unit_statistics(model, layers, attr, n_steps=steps, ig_chunk=ig_chunk, keep_grads=auto)
                for s in levels:
                    for u in units:
                        names = _subset(layers, u)
                        for metric in metrics:
                            if metric == "cor_gxo" and auto:
                                drift = gradient_drift(
                                    model, layers, attr, grads, keep_masks(_scores(stats, names, "gxo", rho), s)
                                )
                                for n in names:
                                    stats[n].drift = drift[n]
                            keep = keep_masks(_scores(stats, names, metric, rho), s)
                            add(("per-input", u, metric, s), item.evaluate(model, layers, keep))
                            bar.update(1)
    if "calibrated" in modes:
        cal_stats = collect_stats(model, layers, list(calibration), steps, ig_chunk, progress)
        with tqdm(total=len(levels) * len(units) * len(metrics), desc="calibrated", disable=not progress) as bar:
            for s in levels:
                for u in units:
                    sub = [la for la in layers if la.name in set(_subset(layers, u))]
                    for metric in metrics:
                        copies = [{n: _copy(st[n]) for n in st} for st in cal_stats]
                        scores = calibrated_scores(
                            model, sub, list(calibration), metric, rho=rho, sparsity=s, stats=copies, progress=False
                        )
                        keep = keep_masks(scores, s)
                        total: Counter[str] = Counter()
                        for item in items:
                            total += item.evaluate(model, layers, keep)
                        add(("calibrated", u, metric, s), total)
                        bar.update(1)
    points = []
    for mode in modes:
        for u in units:
            for metric in metrics:
                for s in sparsities:
                    c = dense if s == 0 else acc[(mode, u, metric, s)]
                    p = _point(mode, u, metric, s, c)
                    points.append(p)
                    if on_point is not None:
                        on_point(p)
    return points


def _copy(s: UnitStats) -> UnitStats:
    return UnitStats(s.a2, s.g2, s.ga, s.tokens, s.ig, s.drift)  # drift is per (sparsity, unit set)


def _point(mode, units, metric, s, c: Counter) -> CurvePoint:
    tokens = int(c.get("tokens", 0))
    ppl = math.exp(c["nll"] / tokens) if tokens else math.nan
    acc = c["correct"] / tokens if tokens else math.nan
    mc = int(c.get("mc_total", 0))
    return CurvePoint(
        mode,
        units,
        metric,
        float(s),
        ppl,
        acc,
        tokens,
        c["mc_correct"] / mc if mc else None,
        c["mc_norm"] / mc if mc else None,
        mc,
    )


def check_options(sparsities, units, modes, n_steps, rho, target) -> None:
    for s in sparsities:
        if not 0.0 <= s < 1.0:
            raise UsageError(f"sparsity must be in [0, 1), got {s}")
    bad = [u for u in units if u not in UNIT_SETS] + [m for m in modes if m not in MODES]
    if bad or not units or not modes:
        raise UsageError(f"unknown unit set / mode {bad}; unit sets: {', '.join(UNIT_SETS)}; modes: {', '.join(MODES)}")
    if n_steps <= 0:
        raise UsageError(f"n_steps must be a positive number of IG interpolations, got {n_steps}")
    if target not in TARGETS:
        raise UsageError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if rho != "auto" and not (isinstance(rho, (int, float)) and rho >= 0 and math.isfinite(rho)):
        raise UsageError(f"rho must be a number >= 0 or 'auto', got {rho!r}")


# --------------------------------------------------------------------------------------------- output
def write_curves(folder: str, points: Sequence[CurvePoint], meta: dict) -> dict[str, str]:
    """``curves.csv``, ``curves.json`` and one PNG per unit set (``curves_heads.png`` …)."""
    os.makedirs(folder, exist_ok=True)
    paths = {"csv": os.path.join(folder, "curves.csv"), "json": os.path.join(folder, "curves.json")}
    fields = list(CurvePoint.__dataclass_fields__)

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for p in points:
                w.writerow(asdict(p))

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(json_safe({**meta, "points": [asdict(p) for p in points]}), f, indent=2, allow_nan=False)

    atomic_write(paths["csv"], write_csv)
    atomic_write(paths["json"], write_json)
    for u in dict.fromkeys(p.units for p in points):
        path = plot_tradeoff(
            os.path.join(folder, f"curves_{u}.png"),
            [p for p in points if p.units == u],
            title=f"{meta.get('title', '')} — {u}",
        )
        if path:
            paths[u] = path
    return paths
