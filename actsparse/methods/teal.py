"""TEAL (seed 002): magnitude thresholds on the inputs of all seven projections, with a model-wide target
reached either uniformly or by **block-wise greedy allocation**.

Greedy allocation (TEAL §4.2; its repository never shipped it): inside each block, start every target
layer at sparsity 0 and repeatedly raise the sparsity of the layer whose step costs the least block-output
error per weight skipped, until the parameter-weighted mean sparsity of the block reaches the block's
target (the parameter-weighted mean of the requested targets). The error of a configuration is
``Σ‖Y - Y_dense‖² / Σ‖Y_dense‖²`` over the block outputs on (a subset of) the calibration batches, with
thresholds taken from the block's dense input histograms. The allocated per-layer sparsities are then
calibrated like ``quantile`` (sequentially), so measured sparsity on the calibration data equals the
allocation. Because every block meets the target in parameter-weighted mean, so does the model: the
fraction of weight columns skipped, which is what decode speed follows.

The greedy search is *lazy*: each candidate keeps its last measured cost and only the cheapest is
re-measured before it is taken (costs grow as a layer gets sparser, so stale costs are lower bounds
in practice); ``lazy=False`` re-measures every candidate at every step (TEAL's plain greedy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UsageError
from ..offload import layer_weight
from ..rule import SparsityParams
from .base import MethodConfig, register_method
from .budget import MODES as BUDGET_MODES
from .budget import block_budgets
from .wina import ScoreQuantile, column_norms

__all__ = ["TealMethod", "greedy_allocation"]

ALLOCATIONS = ("uniform", "greedy")
SCORES = ("magnitude", "wina")  # |x_j|, or WINA's |x_j|·‖W[:, j]‖₂ (the column norms become act_scale)
BLOCK_BUDGETS = ("uniform", *BUDGET_MODES)


def _relative_error(outs: list[torch.Tensor], dense: list[torch.Tensor]) -> float:
    num = sum(float((o - d).pow(2).sum()) for o, d in zip(outs, dense))
    den = sum(float(d.pow(2).sum()) for d in dense)
    return num / max(den, 1e-30)


def greedy_allocation(
    ctx,
    *,
    step: float = 0.05,
    max_sparsity: float = 0.95,
    tokens: int | None = None,
    lazy: bool = True,
    bins_per_octave: int = 1024,
    scales: dict[str, torch.Tensor | None] | None = None,
) -> dict[str, float]:
    """Per-layer sparsities for one stage (see the module docstring). ``ctx`` is a
    :class:`actsparse.calibrate.StageContext`; ``scales``: per-layer score weights (the thresholds then apply to
    ``|x_j|·s_j``, e.g. WINA's column norms), None for plain magnitudes."""
    scales = scales or {}
    names = ctx.names
    size = {n: ctx.modules[n].in_features * ctx.modules[n].out_features for n in names}
    total = sum(size.values())
    goal = sum(size[n] * ctx.targets[n] for n in names)  # skipped weights wanted
    if goal <= 0:
        return dict.fromkeys(names, 0.0)
    if goal > max_sparsity * total + 1e-9:
        raise UsageError(
            f"a block-wise target of {goal / total:.3f} exceeds max_sparsity={max_sparsity}; "
            f"raise max_sparsity or lower the target"
        )
    batches = ctx.batches_for(tokens)
    hists = {n: ScoreQuantile(0.5, scales.get(n), bins_per_octave) for n in names}
    ctx.collect(hists, batches=batches)
    # a layer no token of the subset reached (an MoE expert nobody routed to) has no measurable cost: it keeps
    # its target, the others share the rest of the block's budget
    unseen = {n: ctx.targets[n] for n in names if hists[n].hist.n == 0}
    if unseen:
        names = [n for n in names if n not in unseen]
        total = sum(size[n] for n in names)
        goal = min(goal - sum(size[n] * t for n, t in unseen.items()), max_sparsity * total)
        if not names or goal <= 0:
            return {**dict.fromkeys(names, 0.0), **unseen}
    dense = ctx.outputs({}, batches=batches)

    def error(s: dict[str, float]) -> float:
        params = {n: SparsityParams(hists[n].hist.quantile(v), scale=scales.get(n)) for n, v in s.items() if v > 0}
        return _relative_error(ctx.outputs(params, batches=batches), dense)

    s = dict.fromkeys(names, 0.0)
    current = 0.0
    done = 0.0  # skipped weights so far

    def increment(n: str) -> float:
        return min(step, max_sparsity - s[n], (goal - done) / size[n])

    def cost(n: str) -> float:
        inc = increment(n)
        return (error({**s, n: s[n] + inc}) - current) / (inc * size[n])

    stale = {n: cost(n) for n in names}
    while goal - done > 1e-9 * total:
        eligible = [n for n in names if max_sparsity - s[n] > 1e-9]
        best = min(eligible, key=stale.__getitem__)
        if lazy:
            stale[best] = cost(best)
            if any(stale[n] < stale[best] for n in eligible if n != best):
                continue  # another layer is now cheaper: re-measure that one first
        else:
            for n in eligible:
                stale[n] = cost(n)
            best = min(eligible, key=stale.__getitem__)
        inc = increment(best)
        s[best] += inc
        done += inc * size[best]
        current = error(s)
    return {**s, **unseen}


@register_method("teal")
@dataclass(frozen=True)
class TealMethod(MethodConfig):
    """TEAL thresholds: ``allocation="uniform"`` (every layer at its scope's target; same as ``quantile``) or
    ``"greedy"`` (block-wise greedy per-layer allocation, see the module docstring). ``score``: what the
    thresholds test, ``"magnitude"`` ``|x_j|`` (TEAL) or ``"wina"`` ``|x_j|·‖W[:, j]‖₂`` (WINA's weight-aware
    score with TEAL's allocation; the column norms are stored as the layers' ``act_scale``).
    ``block_budget="sensitivity"`` first moves budget between blocks by their measured loss sensitivity,
    ``"search"`` by a seeded search on the whole model's loss (``search_steps`` proposals of ``search_delta``),
    ``"sensitivity+search"`` that search started from the sensitivity budgets (:mod:`actsparse.methods.budget`;
    beyond TEAL, which keeps every block at the model-wide target).

    ``step``: sparsity added to one layer per greedy step; ``greedy_tokens``: calibration tokens (whole
    leading batches) on which block-output error is measured (None: all); ``max_sparsity``: cap per layer.
    Cost: a few block forwards on ``greedy_tokens`` tokens per greedy step (lazy: usually one or two),
    about ``target / step / (share of the block's weights in its largest layers)`` steps per block.
    """

    allocation: str = "greedy"
    block_budget: str = "uniform"
    step: float = 0.05
    max_sparsity: float = 0.95
    greedy_tokens: int | None = 1024
    lazy: bool = True
    probe_tokens: int = 2048
    max_raise: float = 1.15
    bins_per_octave: int = 1024
    score: str = "magnitude"
    search_steps: int = 200
    search_delta: float = 0.05

    def __post_init__(self):
        super().__post_init__()
        if self.block_budget not in BLOCK_BUDGETS:
            raise UsageError(f"unknown block_budget {self.block_budget!r}; choose one of {', '.join(BLOCK_BUDGETS)}")
        if not 1.0 <= self.max_raise <= 2.0:
            raise UsageError(f"max_raise must be in [1, 2], got {self.max_raise}")
        if self.probe_tokens < 1:
            raise UsageError(f"probe_tokens must be >= 1, got {self.probe_tokens}")
        if isinstance(self.search_steps, bool) or not isinstance(self.search_steps, int) or self.search_steps < 1:
            raise UsageError(f"search_steps must be an int >= 1, got {self.search_steps!r}")
        if not 0.0 < self.search_delta <= 0.5:
            raise UsageError(f"search_delta must be in (0, 0.5], got {self.search_delta}")
        if self.score not in SCORES:
            raise UsageError(f"unknown score {self.score!r}; choose one of {', '.join(SCORES)}")
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"unknown allocation {self.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
        if not 0.0 < self.step <= 1.0:
            raise UsageError(f"step must be in (0, 1], got {self.step}")
        if not 0.0 < self.max_sparsity <= 1.0:
            raise UsageError(f"max_sparsity must be in (0, 1], got {self.max_sparsity}")
        if self.greedy_tokens is not None and self.greedy_tokens < 1:
            raise UsageError(f"greedy_tokens must be >= 1 or None, got {self.greedy_tokens}")

    def _scale(self, module) -> torch.Tensor | None:
        return column_norms(layer_weight(module)) if self.score == "wina" else None

    def make_collector(self, layer_name, module, target_sparsity):
        return ScoreQuantile(target_sparsity, self._scale(module), self.bins_per_octave)

    def plan(self, model, batches, targets, device, *, progress=True) -> dict[str, float]:
        """Block budgets before the sequential pass (``block_budget``: ``methods/budget.py``)."""
        if self.block_budget == "uniform":
            return dict(targets)
        return block_budgets(
            model,
            batches,
            targets,
            device,
            mode=self.block_budget,
            probe_tokens=self.probe_tokens,
            max_sparsity=self.max_sparsity,
            max_raise=self.max_raise,
            steps=self.search_steps,
            delta=self.search_delta,
            progress=progress,
        )

    def allocate(self, ctx) -> dict[str, float]:
        if self.allocation == "uniform":
            return dict(ctx.targets)
        return greedy_allocation(
            ctx,
            step=self.step,
            max_sparsity=self.max_sparsity,
            tokens=self.greedy_tokens,
            lazy=self.lazy,
            bins_per_octave=self.bins_per_octave,
            scales={n: self._scale(m) for n, m in ctx.modules.items()},
        )
