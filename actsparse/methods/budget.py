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

``block_budget="search"`` (after WiSparse's and WAS's searched block allocations) does not add single-block
costs up: starting from equal budgets, it proposes moving ``delta`` of sparsity from one random block to
another (the weighted mean kept), sparsifies **all** blocks at once with the proposal, and keeps it when the
next-token loss on the probe tokens goes down; ``delta`` halves after a run of rejected proposals. Same dense
histograms; cost ``search_steps`` forward passes over ``probe_tokens`` tokens; deterministic (seeded).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import UsageError
from ..forward import calibration_tokens, call_model, find_block_stack, input_hooks, leading_batches, next_token_nll
from ..rule import dense_equivalent_input
from ..stats import HistogramQuantile

__all__ = ["block_budgets", "allocate_segments", "MODES"]


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


@contextmanager
def _probe(
    model: nn.Module, batches, targets: dict[str, float], device, probe_tokens: int, progress: bool
) -> Iterator[Callable[[dict[str, float]], float]]:
    """One dense pass for every target layer's |x| histogram, then ``loss(sparsities)``: the mean next-token
    loss on ``probe_tokens`` calibration tokens with those layers' inputs thresholded at their dense quantiles
    (a layer left out stays dense)."""
    modules = dict(model.named_modules())
    layers = {n: modules[n] for n in targets}
    hists = {n: HistogramQuantile(0.5) for n in targets}
    state: dict[str, Any] = {"mask": None, "apply": None}

    def hook(name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        if state["apply"] is None:
            hists[name].update(calibration_tokens(x, state["mask"], name))
            return None
        tau = state["apply"].get(name)
        return None if tau is None else dense_equivalent_input(x, tau)

    probe = batches[: leading_batches(batches, probe_tokens)]

    def loss(sparsities: dict[str, float]) -> float:
        state["apply"] = {n: hists[n].quantile(min(1.0, s)) for n, s in sparsities.items()}
        total, count = next_token_nll(model, probe, device)
        return total / max(count, 1)

    with input_hooks(layers, hook):
        for b in tqdm(batches, desc="block budgets: statistics", disable=not progress):
            state["mask"] = b.token_mask
            call_model(model, b, device)
        yield loss


def _blocks(model: nn.Module, targets: dict[str, float]) -> tuple[dict[str, list[str]], list[float], list[float]]:
    """The target layers by block, each block's number of target weights and weighted mean target."""
    blocks = _block_of(targets, model)
    modules = dict(model.named_modules())
    weights = {n: modules[n].in_features * modules[n].out_features for n in targets}
    size = [float(sum(weights[n] for n in blocks[k])) for k in blocks]
    mean_t = [sum(weights[n] * targets[n] for n in blocks[k]) / s for k, s in zip(blocks, size)]
    return blocks, size, mean_t


def _per_layer(
    blocks: dict[str, list[str]], targets: dict[str, float], mean_t: list[float], budgets: list[float], cap: float
) -> dict[str, float]:
    """Per-layer targets for block budgets, each block's layers keeping their ratios."""
    new = dict(targets)
    for k, t, p in zip(blocks, mean_t, budgets):
        for n in blocks[k]:
            new[n] = min(cap, targets[n] * p / t) if t > 0 else 0.0
    return new


MODES = ("sensitivity", "search", "sensitivity+search")


@torch.no_grad()
def block_budgets(
    model: nn.Module,
    batches,
    targets: dict[str, float],
    device,
    *,
    mode: str,
    probe_tokens: int = 2048,
    max_sparsity: float = 0.95,
    max_raise: float = 1.15,
    steps: int = 200,
    delta: float = 0.05,
    patience: int = 20,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """New per-layer targets by the block budgets of the module docstring: ``mode="sensitivity"``,
    ``"search"`` (``steps`` proposals of ``delta`` sparsity moved between two blocks, ``delta`` halved after
    ``patience`` rejections in a row) or ``"sensitivity+search"`` (the search started from the sensitivity
    budgets, on the same dense statistics pass). ``targets`` unchanged if there is no block stack."""
    if mode not in MODES:
        raise UsageError(f"block budget mode must be one of {', '.join(MODES)}, got {mode!r}")
    blocks, _, mean_t = _blocks(model, targets)
    if len(blocks) < 2 or mode == "search" and sum(t > 0 for t in mean_t) < 2:
        return dict(targets)
    new = dict(targets)
    with _probe(model, batches, targets, device, probe_tokens, progress) as loss:
        if mode.startswith("sensitivity"):
            new = _sensitivity(loss, model, new, max_sparsity, max_raise, progress)
        if mode.endswith("search"):
            new = _search(loss, model, new, max_sparsity, steps, delta, patience, seed, progress)
    return new


def _sensitivity(loss, model, targets, max_sparsity: float, max_raise: float, progress: bool) -> dict[str, float]:
    """Block budgets bought along each block's measured single-block loss curve (``allocate_segments``)."""
    blocks, size, mean_t = _blocks(model, targets)
    base = loss({})
    levels, costs = [], []
    for k, t in tqdm(list(zip(blocks, mean_t)), desc="block budgets: probes", disable=not progress):
        if t == 0:  # a block kept dense stays dense
            levels.append([0.0])
            costs.append([0.0])
            continue
        # a block's budget p gives its layer n the target targets[n]·p/t: the highest keeps p under
        # max_sparsity·t/max(targets), so no layer is clipped and the budgets keep the model-wide mean
        ceiling = max_sparsity * t / max(targets[n] for n in blocks[k])
        lv = sorted({min(ceiling, f * t) for f in (0.5, 1.0, max_raise)})
        levels.append(lv)
        costs.append([loss({n: targets[n] * p / t for n in blocks[k]}) - base for p in lv])
    mean = sum(s * t for s, t in zip(size, mean_t)) / sum(size)
    return _per_layer(blocks, targets, mean_t, allocate_segments(levels, costs, size, mean), max_sparsity)


def _search(
    loss, model, targets, max_sparsity: float, steps: int, delta: float, patience: int, seed: int, progress: bool
) -> dict[str, float]:
    """Block budgets from those of ``targets`` by a seeded search on the joint loss (the module docstring)."""
    blocks, size, mean_t = _blocks(model, targets)
    movable = [b for b, t in enumerate(mean_t) if t > 0]
    if len(movable) < 2:
        return dict(targets)
    top = [max(targets[n] for n in blocks[k]) / t if t > 0 else 1.0 for k, t in zip(blocks, mean_t)]
    g = torch.Generator().manual_seed(seed)
    budgets = list(mean_t)
    best = loss(_per_layer(blocks, targets, mean_t, budgets, max_sparsity))
    rejected = 0
    for _ in tqdm(range(steps), desc="block budgets: search", disable=not progress):
        i, j = (movable[int(v)] for v in torch.randperm(len(movable), generator=g)[:2])
        cand = list(budgets)
        cand[i] += delta
        cand[j] -= delta * size[i] / size[j]
        feasible = cand[j] >= 0 and cand[i] * top[i] <= max_sparsity  # no layer may leave [0, max_sparsity]
        value = loss(_per_layer(blocks, targets, mean_t, cand, max_sparsity)) if feasible else math.inf
        if value < best:
            budgets, best, rejected = cand, value, 0
        else:
            rejected += 1
            if rejected >= patience:
                delta, rejected = delta / 2, 0
    return _per_layer(blocks, targets, mean_t, budgets, max_sparsity)
