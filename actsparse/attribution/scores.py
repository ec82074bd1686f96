r"""Attribution scores of units (attention heads, MLP neurons) and the masks that deactivate them.

Notation for one example (a sequence) and one unit layer ``l`` with units ``u``: ``a_u`` are the unit's input
channels of the unit layer over the example's tokens (``T × group`` values), ``g_u = ∂L/∂a_u`` the gradient
of the example's loss ``L`` (mean next-token NLL over its scored positions) with respect to them, and
``⟨g_u, a_u⟩`` their inner product over tokens and channels. Deactivating ``u`` sets ``a_u = 0``; every score
below is "higher = more important", and the lowest-scoring units of each layer are deactivated.

==========  =========================================================================================
magnitude   ``‖a_u‖_F / √T`` — RMS over tokens of the unit's output norm (the LLM baseline)
gradient    ``‖g_u‖_F`` — how strongly the loss reacts to the unit
gxo         ``−⟨g_u, a_u⟩`` — first-order loss increase when ``u`` is deactivated (gradient × output)
snip        ``|⟨g_u, a_u⟩|`` — connection sensitivity (SNIP): the size of that change, either sign
ig          ``−∫₀¹ ∂L/∂γ_u (γ = α·1) dα`` — integrated gradients of per-unit gates γ (``a_u → γ_u a_u``) along
            the straight path from all gates 0 to all gates 1, jointly over every scored layer; midpoint
            rule with ``n_steps`` points, streamed in chunks. Completeness: ``Σ_u ig_u = L(γ=0) − L(γ=1)``.
cor_gxo     ``−⟨g_u, a_u⟩ + ρ_l‖g_l‖_F‖a_u‖_F`` — GxO corrected for the interdependence of units across
            layers (derivation below)
==========  =========================================================================================

**Corrected GxO.** GxO scores every unit with the gradient of the *dense* model. When units are deactivated
together, those of earlier layers (and the other units of the same layer) change the gradient that a unit of
layer ``l`` sees, from ``g_l`` to ``g_l + δg_l``; the first-order cost of deactivating ``u`` is then
``−⟨g_u + δg_u, a_u⟩``, not ``−⟨g_u, a_u⟩``. By Cauchy–Schwarz and ``‖δg_u‖ ≤ ‖δg_l‖``,

    |⟨δg_u, a_u⟩| ≤ ‖δg_l‖_F · ‖a_u‖_F,

so with the drift written relative to the layer's gradient, ``‖δg_l‖ = ρ_l‖g_l‖``, the true first-order cost
lies in ``gxo_u ± ρ_l‖g_l‖‖a_u‖``. Corrected GxO ranks by the upper end — deactivate the units whose cost is
smallest *even in the worst case of the drift* — which adds a magnitude term weighted by the layer's gradient
norm. ``ρ = 0.5`` is the constant of the seed's code (``−GxO + 0.5·|output|·‖gradient‖``); ``rho="auto"``
measures the drift instead: one more forward/backward with the plain-GxO masks at the target sparsity gives
``‖δg_l‖`` per example and layer (``ρ_l‖g_l‖`` is replaced by it). Where the dense gradient is nearly zero
(a saturated or locally optimal output) plain GxO ranks by noise and can deactivate the largest units first;
the measured drift is then large and the correction falls back to magnitude (tests/test_attribution.py
builds such a case).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import UsageError
from ..offload import model_device
from .units import UnitLayer

__all__ = [
    "METRICS",
    "ScoreBatch",
    "UnitStats",
    "UnitHooks",
    "unit_statistics",
    "gradient_drift",
    "unit_scores",
    "keep_masks",
    "frozen_parameters",
    "masked_nll",
    "masked_row_nll",
    "calibrated_scores",
    "collect_stats",
    "mean_scores",
]

METRICS = ("magnitude", "gradient", "gxo", "ig", "snip", "cor_gxo")


def check_metrics(metrics) -> list[str]:
    metrics = list(metrics)
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise UsageError(f"unknown attribution metric(s) {bad or metrics}; choose from {', '.join(METRICS)}")
    return metrics


@dataclass
class ScoreBatch:
    """Token ids ``[B, T]``, real-token mask ``[B, T]``, next-token labels ``[B, T-1]`` (label t is predicted at
    position t) and which labels count ``[B, T-1]``."""

    ids: torch.Tensor
    attention: torch.Tensor
    labels: torch.Tensor
    label_mask: torch.Tensor

    @classmethod
    def from_ids(cls, ids: torch.Tensor, attention: torch.Tensor | None = None) -> ScoreBatch:
        ids = ids if ids.dim() == 2 else ids.unsqueeze(0)
        att = torch.ones_like(ids, dtype=torch.bool) if attention is None else attention.bool()
        return cls(ids, att, ids[:, 1:].clone(), att[:, 1:] & att[:, :-1])

    def with_labels(self, labels: torch.Tensor) -> ScoreBatch:
        return ScoreBatch(self.ids, self.attention, labels, self.label_mask)

    def repeat(self, n: int) -> ScoreBatch:
        return ScoreBatch(*(t.repeat(n, 1) for t in (self.ids, self.attention, self.labels, self.label_mask)))

    @property
    def n_labels(self) -> int:
        return int(self.label_mask.sum())


@dataclass
class UnitStats:
    """Per-example sums of one unit layer, each ``[B, n_units]`` (fp64): ``a2 = ‖a_u‖²``, ``g2 = ‖g_u‖²``,
    ``ga = ⟨g_u, a_u⟩``; ``tokens`` ``[B]``; ``ig`` the integrated gate gradients; ``drift`` ``[B]`` =
    ``‖δg_l‖_F`` (cor_gxo with ``rho="auto"``)."""

    a2: torch.Tensor
    g2: torch.Tensor
    ga: torch.Tensor
    tokens: torch.Tensor
    ig: torch.Tensor | None = None
    drift: torch.Tensor | None = None


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters do not require grad inside (gradients flow through activations only); flags restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


class UnitHooks:
    """Forward pre-hooks on unit layers: deactivate units (``keep`` masks), scale them by per-row gates
    (``alpha``, integrated gradients) and, when ``record`` is set, make their inputs differentiable and collect
    the per-example sums of :class:`UnitStats` from the gradients."""

    def __init__(self, layers: list[UnitLayer]):
        self.layers = layers
        self.keep: dict[str, torch.Tensor] = {}  # name -> bool [n] (static) or [R, n] (per row)
        self.alpha: torch.Tensor | None = None  # [R] gate per row
        self.record = False
        self.fold = 1  # rows = fold × examples (IG chunks); sums fold back
        self.token_mask: torch.Tensor | None = None
        self.reference: dict[str, torch.Tensor] | None = None  # dense gradients, for the drift
        self.keep_grads = False
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.leaves: list[torch.Tensor] = []
        self.seen: set[str] = set()

    @contextlib.contextmanager
    def installed(self) -> Iterator[UnitHooks]:
        handles = [layer.module.register_forward_pre_hook(partial(self._pre, layer)) for layer in self.layers]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _pre(self, layer: UnitLayer, module, args):
        x = args[0]
        if x.dim() != 3 or x.shape[-1] != layer.in_features:
            raise UsageError(
                f"unit layer {layer.name!r}: expected input [batch, tokens, {layer.in_features}], got {tuple(x.shape)}"
            )
        self.seen.add(layer.name)
        rows, tokens = x.shape[:2]
        xs = x.view(rows, tokens, layer.n_units, layer.group)
        keep = self.keep.get(layer.name)
        if keep is not None:
            keep = keep.to(x.device)
            xs = xs * (keep[None, None, :, None] if keep.dim() == 1 else keep[:, None, :, None]).to(x.dtype)
        if not self.record:
            return None if keep is None else (xs.reshape(x.shape), *args[1:])
        if not xs.requires_grad:
            xs = xs.detach().requires_grad_(True)
            self.leaves.append(xs)
        y = xs if self.alpha is None else xs * self.alpha.to(x.device, x.dtype)[:, None, None, None]
        y.register_hook(partial(self._grad, layer, xs.detach()))
        return (y.reshape(x.shape), *args[1:])

    def _grad(self, layer: UnitLayer, a: torch.Tensor, g: torch.Tensor):
        g64, a64 = g.double(), a.double()
        assert self.token_mask is not None  # _backward sets it before every recorded forward
        w = self.token_mask.to(a.device, torch.float64)[:, :, None, None]
        new = {"ga": (g64 * a64).sum((1, 3)), "g2": g64.square().sum((1, 3)), "a2": (a64.square() * w).sum((1, 3))}
        if self.reference is not None:
            new["drift2"] = (g64 - self.reference[layer.name].to(g.device).double()).square().sum((1, 2, 3))
        if self.keep_grads:
            self.grads[layer.name] = g.detach().clone()
        acc = self.sums.setdefault(layer.name, {})
        for k, v in new.items():
            v = v.reshape(self.fold, -1, *v.shape[1:]).sum(0).cpu()
            acc[k] = v if k not in acc else acc[k] + v
        return None


def row_nll(model: nn.Module, batch: ScoreBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nll [R, T-1], predictions [R, T-1])`` under whatever hooks are installed (log-softmax in fp32 or wider)."""
    dev = model_device(model)
    logits = model(input_ids=batch.ids.to(dev), attention_mask=batch.attention.to(dev).long(), use_cache=False).logits
    logits = logits[:, :-1]
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    nll = -logp.gather(-1, batch.labels.to(dev)[..., None]).squeeze(-1)
    return nll, logp.argmax(-1)


def _backward(model: nn.Module, hooks: UnitHooks, batch: ScoreBatch) -> None:
    hooks.leaves, hooks.seen, hooks.token_mask = [], set(), batch.attention
    nll, _ = row_nll(model, batch)
    m = batch.label_mask.to(nll.device)
    loss = ((nll * m).sum(1) / m.sum(1).clamp(min=1)).sum()  # Σ over rows of each row's mean NLL
    missing = [la.name for la in hooks.layers if la.name not in hooks.seen]
    if missing:
        raise UsageError(f"unit layer(s) {missing[:3]} were not reached by the model's forward pass")
    torch.autograd.grad(loss, hooks.leaves, allow_unused=True)
    hooks.leaves = []


def unit_statistics(
    model: nn.Module,
    layers: list[UnitLayer],
    batch: ScoreBatch,
    *,
    n_steps: int = 0,
    ig_chunk: int = 4,
    keep_grads: bool = False,
    progress=None,
) -> tuple[dict[str, UnitStats], dict[str, torch.Tensor]]:
    """One forward/backward for the gradient statistics, plus ``n_steps`` integrated-gradient points in chunks of
    ``ig_chunk`` rows per example (memory grows with the chunk, not with ``n_steps``). Returns the statistics
    per layer and, with ``keep_grads``, the dense gradients per layer (for :func:`gradient_drift`)."""
    if n_steps < 0 or ig_chunk < 1:
        raise UsageError(f"n_steps must be >= 0 and ig_chunk >= 1, got {n_steps}, {ig_chunk}")
    hooks = UnitHooks(layers)
    with frozen_parameters(model), torch.enable_grad(), hooks.installed():
        hooks.record, hooks.keep_grads = True, keep_grads
        _backward(model, hooks, batch)
        tokens = batch.attention.sum(1).double()
        out = {
            la.name: UnitStats(hooks.sums[la.name]["a2"], hooks.sums[la.name]["g2"], hooks.sums[la.name]["ga"], tokens)
            for la in layers
        }
        grads, hooks.keep_grads = hooks.grads, False
        if n_steps:
            hooks.sums = {}
            alphas = (torch.arange(n_steps, dtype=torch.float64) + 0.5) / n_steps  # midpoint rule
            for chunk in alphas.split(ig_chunk):
                hooks.fold = len(chunk)
                hooks.alpha = chunk.repeat_interleave(batch.ids.shape[0]).float()
                _backward(model, hooks, batch.repeat(len(chunk)))
                if progress is not None:
                    progress.update(len(chunk))
            for la in layers:
                out[la.name].ig = hooks.sums[la.name]["ga"] / n_steps
    return out, grads


def gradient_drift(
    model: nn.Module,
    layers: list[UnitLayer],
    batch: ScoreBatch,
    reference: dict[str, torch.Tensor],
    keep: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """``‖g_l(deactivated) − g_l(dense)‖_F`` per example ``[B]`` and layer, with units deactivated by ``keep``."""
    hooks = UnitHooks(layers)
    hooks.keep, hooks.reference = keep, reference
    with frozen_parameters(model), torch.enable_grad(), hooks.installed():
        hooks.record = True
        _backward(model, hooks, batch)
    return {la.name: hooks.sums[la.name]["drift2"].sqrt() for la in layers}


def unit_scores(stats: UnitStats, metric: str, rho: float | str = 0.5) -> torch.Tensor:
    """``[B, n_units]`` scores of one layer (higher = more important); see the module docstring."""
    if metric == "magnitude":
        return (stats.a2 / stats.tokens.clamp(min=1)[:, None]).sqrt()
    if metric == "gradient":
        return stats.g2.sqrt()
    if metric == "gxo":
        return -stats.ga
    if metric == "snip":
        return stats.ga.abs()
    if metric == "ig":
        if stats.ig is None:
            raise UsageError("integrated gradients were not computed (n_steps = 0)")
        return -stats.ig
    if metric == "cor_gxo":
        if rho == "auto":
            if stats.drift is None:
                raise UsageError("rho='auto' needs the measured gradient drift (gradient_drift)")
            weight = stats.drift[:, None]
        else:
            weight = float(rho) * stats.g2.sum(1, keepdim=True).sqrt()
        return -stats.ga + weight * stats.a2.sqrt()
    raise UsageError(f"unknown attribution metric {metric!r}; choose from {', '.join(METRICS)}")


def keep_masks(scores: dict[str, torch.Tensor], sparsity: float | dict[str, float]) -> dict[str, torch.Tensor]:
    """Per layer (and row), keep all but the ``⌊sparsity · n_units + ½⌋`` lowest-scoring units (ties: lower index
    deactivated first; NaN scores count as lowest). ``sparsity`` is one value or one per layer."""
    out = {}
    for name, s in scores.items():
        target = sparsity[name] if isinstance(sparsity, dict) else sparsity
        if not 0.0 <= target < 1.0:
            raise UsageError(f"sparsity must be in [0, 1), got {target}")
        k = int(target * s.shape[-1] + 0.5)
        keep = torch.ones(s.shape, dtype=torch.bool)
        if k:
            order = torch.sort(s.nan_to_num(nan=-math.inf), dim=-1, stable=True).indices
            keep.scatter_(-1, order[..., :k], False)
        out[name] = keep
    return out


@torch.no_grad()
def masked_row_nll(
    model: nn.Module, layers: list[UnitLayer], batch: ScoreBatch, keep: dict[str, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`row_nll` with units deactivated by ``keep`` (static ``[n]`` or per row ``[R, n]`` masks)."""
    hooks = UnitHooks(layers)
    hooks.keep = keep or {}
    with hooks.installed():
        return row_nll(model, batch)


def masked_nll(
    model: nn.Module, layers: list[UnitLayer], batch: ScoreBatch, keep: dict[str, torch.Tensor] | None = None
) -> tuple[float, int, int]:
    """``(sum of NLL, scored tokens, correct next-token predictions)`` with units deactivated by ``keep``."""
    nll, pred = masked_row_nll(model, layers, batch, keep)
    m = batch.label_mask.to(nll.device)
    correct = ((pred == batch.labels.to(pred.device)) & m).sum()
    return float((nll.double() * m).sum()), int(m.sum()), int(correct)


def calibrated_scores(
    model: nn.Module,
    layers: list[UnitLayer],
    batches: list[ScoreBatch],
    metric: str,
    *,
    n_steps: int = 8,
    ig_chunk: int = 4,
    rho: float | str = 0.5,
    sparsity: float | dict[str, float] | None = None,
    progress: bool = True,
    stats: list[dict[str, UnitStats]] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-layer unit scores ``[n_units]``: the mean over calibration examples of each example's score.
    ``rho="auto"`` measures each layer's relative gradient drift ``ρ_l = ‖δg_l‖/‖g_l‖`` on the first batch,
    with the calibrated plain-GxO masks at ``sparsity`` applied."""
    if stats is None:
        stats = collect_stats(model, layers, batches, n_steps if metric == "ig" else 0, ig_chunk, progress)
    names = [la.name for la in layers]
    if metric == "cor_gxo" and rho == "auto":
        if sparsity is None:
            raise UsageError("cor_gxo with rho='auto' needs the target sparsity")
        keep = keep_masks(mean_scores({n: unit_scores(s[n], "gxo") for n in names} for s in stats), sparsity)
        _, grads = unit_statistics(model, layers, batches[0], keep_grads=True)  # the dense gradients themselves
        drift = gradient_drift(model, layers, batches[0], grads, keep)
        ratio = {n: float((drift[n] / stats[0][n].g2.sum(1).sqrt().clamp(min=1e-30)).mean()) for n in names}
        for s in stats:
            for n in names:
                s[n].drift = ratio[n] * s[n].g2.sum(1).sqrt()
    return mean_scores({n: unit_scores(s[n], metric, rho) for n in names} for s in stats)


def collect_stats(model, layers, batches, n_steps, ig_chunk, progress) -> list[dict[str, UnitStats]]:
    out = []
    total = len(batches) * (1 + n_steps)
    with tqdm(total=total, desc="attribution scores", disable=not progress) as bar:
        for b in batches:
            s, _ = unit_statistics(model, layers, b, n_steps=n_steps, ig_chunk=ig_chunk, progress=bar)
            out.append(s)
            bar.update(1)
    return out


def mean_scores(per_batch) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for scores in per_batch:
        for n, v in scores.items():
            sums[n] = v.sum(0) if n not in sums else sums[n] + v.sum(0)
        count += next(iter(scores.values())).shape[0]
    return {n: v / count for n, v in sums.items()}
