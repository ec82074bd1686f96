"""Block budgets: how much of a model-wide sparsity target each decoder block takes.

TEAL gives every block the same target. On small models a few blocks (typically the first and the
last) hurt far more than the rest when sparsified, so ``block_budget="sensitivity"`` spends the budget
where it is cheap:

1. one dense pass collects each target layer's |x| histogram (thresholds at any sparsity);
2. for every block ``b`` and three probe sparsities (its target ``t`` times 0.5, 1 and ``max_raise``), only
   that block is sparsified and the next-token loss increase on ``probe_tokens`` calibration tokens is
   measured;
3. every block starts at ``t/2``; the two segments of its piecewise-linear cost curve (``t/2 → t``,
   ``t → max_raise·t``, made convex) are bought in order of loss increase per skipped weight until the
   weighted mean sparsity equals the original mean (each block's weight = its number of target weights).
   Budgets stay inside the measured range (and ``max_sparsity``): nothing is extrapolated.

Why the upper end is only ``1.15 t``: single-block costs do not add up. On SmolLM2 at 50% (uniform
quantile thresholds otherwise), a range up to ``1.5 t`` made perplexity *worse* than uniform budgets
(+74.8% vs +59.7%: many "cheap" blocks at 75% compound), while ``1.15 t`` improves it (+54.6%); the
sensitive blocks there are the first and the last (5× and 4× the median single-block cost).

Per-layer targets inside a block keep their ratios (a block-wise greedy allocation then re-distributes
them between the block's layers). Cost: ``3 × blocks`` forward passes over ``probe_tokens`` tokens.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..forward import call_model, find_block_stack, input_hooks, leading_batches, next_token_nll, real_tokens
from ..rule import dense_equivalent_input
from ..stats import HistogramQuantile

__all__ = ["sensitivity_block_budgets", "allocate_segments"]


def _block_of(names, model) -> dict[str, list[str]]:

    stack = find_block_stack(model, list(names))
    if stack is None:
        return {}
    prefix = stack[0] + "."
    blocks: dict[str, list[str]] = defaultdict(list)
    for n in names:
        blocks[prefix + n[len(prefix) :].split(".", 1)[0]].append(n)
    return dict(blocks)


def allocate_segments(
    levels: list[list[float]], costs: list[list[float]], size: list[float], mean: float
) -> list[float]:
    """Block sparsities from piecewise-linear cost curves: start each block at its first level and buy
    segments (made convex per block) by increasing cost per skipped weight until the weighted mean is
    ``mean``. ``levels[b]``/``costs[b]`` are a block's probe sparsities (increasing) and loss increases."""
    total = sum(size)
    p = [lv[0] for lv in levels]
    budget = mean * total - sum(s * x for s, x in zip(size, p))
    segments = []  # (cost per skipped weight, block, from, to)
    for b, (lv, c) in enumerate(zip(levels, costs)):
        pts = [(lv[0], c[0])]
        for x, y in zip(lv[1:], c[1:]):  # lower convex hull: merge a segment cheaper than its predecessor
            pts.append((x, y))
            while len(pts) >= 3 and (
                (pts[-1][1] - pts[-2][1]) / (pts[-1][0] - pts[-2][0])
                <= (pts[-2][1] - pts[-3][1]) / (pts[-2][0] - pts[-3][0])
            ):
                del pts[-2]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            segments.append(((y1 - y0) / ((x1 - x0) * size[b]), b, x0, x1))
    for _, b, x0, x1 in sorted(segments):
        if budget <= 0:
            break
        take = min(x1 - x0, budget / size[b])
        p[b] = x0 + take
        budget -= take * size[b]
    return p


@torch.no_grad()
def sensitivity_block_budgets(
    model: nn.Module,
    batches,
    targets: dict[str, float],
    device,
    *,
    probe_tokens: int = 2048,
    max_sparsity: float = 0.95,
    max_raise: float = 1.15,
    progress: bool = True,
) -> dict[str, float]:
    """New per-layer targets (see the module docstring); ``targets`` unchanged if there is no block stack."""

    blocks = _block_of(targets, model)
    if len(blocks) < 2:
        return dict(targets)
    modules = dict(model.named_modules())
    layers = {n: modules[n] for n in targets}
    hists = {n: HistogramQuantile(0.5) for n in targets}
    state: dict[str, Any] = {"mask": None, "apply": {}}

    def hook(name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        if state["apply"] is None:
            hists[name].update(real_tokens(x, state["mask"]))
            return None
        tau = state["apply"].get(name)
        return None if tau is None else dense_equivalent_input(x, tau)

    probe = batches[: leading_batches(batches, probe_tokens)]

    def loss() -> float:
        total, count = next_token_nll(model, probe, device)
        return total / max(count, 1)

    with input_hooks(layers, hook):
        state["apply"] = None
        for b in tqdm(batches, desc="block budgets: statistics", disable=not progress):
            state["mask"] = b.token_mask
            call_model(model, b, device)
        state["apply"] = {}
        base = loss()
        names = list(blocks)
        size = [sum(layers[n].in_features * layers[n].out_features for n in blocks[k]) for k in names]
        mean_t = [
            sum(layers[n].in_features * layers[n].out_features * targets[n] for n in blocks[k]) / s
            for k, s in zip(names, size)
        ]
        levels, costs = [], []
        for k, t in tqdm(list(zip(names, mean_t)), desc="block budgets: probes", disable=not progress):
            lv = sorted({min(max_sparsity, f * t) for f in (0.5, 1.0, max_raise)}) if t > 0 else [0.0]
            c = []
            for p in lv:
                state["apply"] = {n: hists[n].quantile(min(1.0, targets[n] * p / t)) for n in blocks[k]}
                c.append(loss() - base)
            levels.append(lv)
            costs.append(c)
    mean = sum(s * t for s, t in zip(size, mean_t)) / sum(size)
    budgets = allocate_segments(levels, costs, size, mean)
    new = dict(targets)
    for k, t, p in zip(names, mean_t, budgets):
        for n in blocks[k]:
            new[n] = min(max_sparsity, targets[n] * p / t) if t > 0 else 0.0
    return new
