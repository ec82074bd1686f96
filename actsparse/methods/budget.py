"""Block budgets: how much of a model-wide sparsity target each decoder block takes.

TEAL gives every block the same target. On small models a few blocks (typically the first and the
last) hurt far more than the rest when sparsified, so ``block_budget="sensitivity"`` spends the budget
where it is cheap:

1. one dense pass collects each target layer's |x| histogram (thresholds at any sparsity);
2. for every block ``b`` and two probe sparsities (the block's target ``t`` and ``t/2``), only that block is
   sparsified and the next-token loss on ``probe_tokens`` calibration tokens is measured: the loss
   increase ``c_b(p)`` is fitted as ``a_b · p^γ_b`` (γ clamped to [1.2, 4]);
3. block targets ``p_b`` minimise ``Σ_b c_b(p_b)`` subject to the weighted mean of ``p_b`` equalling the
   original mean (each block's weight = its number of target weights), by bisection on the Lagrange
   multiplier (equal marginal loss per skipped weight), capped to ``[0, max_sparsity]``.

Per-layer targets inside a block keep their ratios (a block-wise greedy allocation then re-distributes
them between the block's layers). Cost: ``2 × blocks`` forward passes over ``probe_tokens`` tokens.
"""

from __future__ import annotations

import math
from collections import defaultdict
from functools import partial

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..sparse_linear import drop_mask
from ..stats import HistogramQuantile

__all__ = ["sensitivity_block_budgets", "allocate_power_law"]


def _block_of(names, model) -> dict[str, list[str]]:
    from ..calibrate import _find_block_stack

    stack = _find_block_stack(model, list(names))
    if stack is None:
        return {}
    prefix = stack[0] + "."
    blocks: dict[str, list[str]] = defaultdict(list)
    for n in names:
        blocks[prefix + n[len(prefix):].split(".", 1)[0]].append(n)
    return dict(blocks)


def allocate_power_law(a: list[float], gamma: list[float], size: list[float], mean: float,
                       cap: float) -> list[float]:
    """``p_b`` minimising ``Σ a_b p_b^γ_b`` with ``Σ size_b p_b = mean · Σ size_b`` and ``0 <= p_b <= cap``."""
    total = sum(size)

    def p_at(lam: float) -> list[float]:  # d/dp (a p^γ) = size·λ  →  p = (size·λ / (a γ))^(1/(γ-1))
        return [min(cap, (s * lam / (ai * g)) ** (1.0 / (g - 1.0))) for ai, g, s in zip(a, gamma, size)]

    def used(lam):
        return sum(s * p for s, p in zip(size, p_at(lam))) / total

    lo, hi = 0.0, 1.0
    while used(hi) < mean and hi < 1e30:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if used(mid) < mean else (lo, mid)
    return p_at(hi)


@torch.no_grad()
def sensitivity_block_budgets(model: nn.Module, batches, targets: dict[str, float], device, *,
                              probe_tokens: int = 2048, max_sparsity: float = 0.95,
                              progress: bool = True) -> dict[str, float]:
    """New per-layer targets (see the module docstring); ``targets`` unchanged if there is no block stack."""
    from ..calibrate import _call_model

    blocks = _block_of(targets, model)
    if len(blocks) < 2:
        return dict(targets)
    modules = dict(model.named_modules())
    layers = {n: modules[n] for n in targets}
    hists = {n: HistogramQuantile(0.5) for n in targets}
    state = {"mask": None, "apply": {}}

    def hook(name, module, args):
        x = args[0]
        if state["apply"] is None:
            m = state["mask"]
            tokens = x[m.to(x.device)] if m is not None and x.shape[:-1] == m.shape else x
            hists[name].update(tokens)
            return None
        tau = state["apply"].get(name)
        if tau is None:
            return None
        return (x.masked_fill(drop_mask(x, tau), 0),) + tuple(args[1:])

    handles = [m.register_forward_pre_hook(partial(hook, n)) for n, m in layers.items()]
    n_probe, seen = 0, 0
    for b in batches:
        n_probe += 1
        seen += b.n_tokens
        if seen >= probe_tokens:
            break
    probe = batches[:n_probe]

    def loss() -> float:
        total, count = 0.0, 0
        for b in probe:
            logits = _call_model(model, b, device).logits.float()
            ids = b.inputs["input_ids"].to(logits.device)
            valid = (b.token_mask[:, 1:] & b.token_mask[:, :-1]).to(logits.device)
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
            total += float(nll[valid].double().sum())
            count += int(valid.sum())
        return total / max(count, 1)

    try:
        state["apply"] = None
        for b in tqdm(batches, desc="block budgets: statistics", disable=not progress):
            state["mask"] = b.token_mask
            _call_model(model, b, device)
        state["apply"] = {}
        base = loss()
        names = list(blocks)
        size = [sum(layers[n].in_features * layers[n].out_features for n in blocks[k]) for k in names]
        mean_t = [sum(layers[n].in_features * layers[n].out_features * targets[n] for n in blocks[k]) / s
                  for k, s in zip(names, size)]
        a, gamma = [], []
        for k, t in tqdm(list(zip(names, mean_t)), desc="block budgets: probes", disable=not progress):
            costs = []
            for p in (t, t / 2):
                state["apply"] = {n: hists[n].quantile(min(1.0, targets[n] * p / t)) for n in blocks[k]} if t else {}
                costs.append(max(loss() - base, 1e-6 * max(abs(base), 1e-6)))
            g = min(4.0, max(1.2, math.log(costs[0] / costs[1]) / math.log(2))) if t else 2.0
            gamma.append(g)
            a.append(costs[0] / max(t, 1e-6) ** g)
    finally:
        for h in handles:
            h.remove()
    mean = sum(s * t for s, t in zip(size, mean_t)) / sum(size)
    budgets = allocate_power_law(a, gamma, size, mean, max_sparsity)
    new = dict(targets)
    for k, t, p in zip(names, mean_t, budgets):
        for n in blocks[k]:
            new[n] = min(max_sparsity, targets[n] * p / t) if t > 0 else 0.0
    return new
