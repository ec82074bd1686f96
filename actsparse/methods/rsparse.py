"""Sparse + low-rank (after R-Sparse): the dropped input channels go through a rank-r approximation of W.

Thresholding drops the small entries ``x_d`` of a layer's input and, with them, ``W x_d``. R-Sparse keeps an
estimate of that part: ``W x_d ≈ U V x_d`` with ``U V`` a rank-``r`` approximation of ``W``, read once per token
(``r·(in+out)`` weights instead of ``in·out``). Here the approximation is the one that is best *for the dropped
entries*: with ``σ_j² = E[x_j² · 1(|x_j| <= τ)]`` (how much channel ``j`` carries while it is dropped, on the
calibration data), ``U V`` is the truncated SVD of ``W·diag(σ)`` mapped back (``V ← V·diag(1/σ)``), which
minimises the expected ``‖(W - U V) x_d‖²`` under a diagonal model of the dropped entries (``whiten=False``:
the plain SVD of ``W``).

Equal bytes: the low-rank term costs ``r(in+out)/(in·out)`` of the layer's bytes, so the threshold drops that
much more (τ at sparsity ``target + share``): the *measured* sparsity (zeros less the low-rank share, as
``SparsityMonitor`` reports it) is the target, and comparisons with plain thresholds are at equal bytes read.
Two passes per layer: the threshold, then the per-channel energy below it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UsageError
from ..offload import layer_weight
from ..rule import SparsityParams
from ..stats import Collector, HistogramQuantile
from .base import MethodConfig, register_method

__all__ = ["RSparseMethod", "lowrank_factors"]


def lowrank_factors(
    weight: torch.Tensor, rank: int, sigma: torch.Tensor | None = None, floor: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U [out, r], V [r, in])`` with ``U V`` the best rank-``r`` approximation of ``W`` in the norm weighted by
    ``sigma`` per input channel (``‖(W - U V)·diag(σ)‖_F``; None: plain Frobenius).

    ``σ`` is raised to at least ``floor ×`` its RMS over the channels first: a channel that was (almost) never
    dropped during calibration (e.g. one that always carries a large activation) would otherwise get a tiny
    weight, ``V ← V·diag(1/σ)`` huge entries there (×10⁶ measured on SmolLM2), and the one token that does drop
    it a wild correction."""
    w = weight.detach().float()
    s = torch.ones(w.shape[1], dtype=torch.float32, device=w.device) if sigma is None else sigma.float().to(w.device)
    rms = float(s.pow(2).mean().sqrt())
    s = s.clamp_min(max(floor * rms, 1e-30))
    u, sv, vh = torch.linalg.svd(w * s, full_matrices=False)
    return (u[:, :rank] * sv[:rank]).contiguous(), (vh[:rank] / s).contiguous()


class _LowRankCollector(Collector):
    """Pass 1: |x| histogram -> τ at ``q``. Pass 2: per-channel energy of the dropped entries -> the factors."""

    def __init__(self, q: float, weight: torch.Tensor, rank: int, whiten: float | None, bins_per_octave: int):
        # whiten: the σ floor (see lowrank_factors), or None for the plain SVD of W
        self.q, self.weight, self.rank, self.whiten = q, weight, rank, whiten
        self.hist = HistogramQuantile(q, bins_per_octave)
        self.tau: float | None = None
        self.energy = torch.zeros(weight.shape[1], dtype=torch.float64)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        if self.tau is None:
            self.hist.update(x)
            return
        xf = x.float()
        dropped = xf.masked_fill(xf.abs() > self.tau, 0.0)
        self.energy += dropped.pow(2).sum(0).double().cpu()
        self.count += x.shape[0]

    def next_pass(self) -> bool:
        if self.tau is None and self.whiten is not None:
            self.tau = self.hist.result()
            return True
        return False

    def result(self) -> SparsityParams:
        tau = self.hist.result() if self.tau is None else self.tau
        sigma = (self.energy / max(self.count, 1)).sqrt().float() if self.whiten is not None else None
        u, v = lowrank_factors(self.weight, self.rank, sigma, self.whiten or 0.0)
        info = {"rank": self.rank, "whiten": self.whiten is not None, "sigma_floor": self.whiten}
        return SparsityParams(tau, lowrank=(u.cpu(), v.cpu()), info=info)


@register_method("rsparse")
@dataclass(frozen=True)
class RSparseMethod(MethodConfig):
    """Thresholds plus a rank-``rank`` correction for the dropped channels (see the module docstring);
    ``whiten``: fit the factors to the dropped entries' per-channel energy (else the plain SVD of W), each
    channel's weight at least ``sigma_floor`` × their RMS (see :func:`lowrank_factors`)."""

    rank: int = 16
    whiten: bool = True
    sigma_floor: float = 0.1
    bins_per_octave: int = 1024

    def __post_init__(self):
        super().__post_init__()
        if self.rank < 1:
            raise UsageError(f"rank must be >= 1, got {self.rank}")
        if self.topk:
            raise UsageError("rsparse thresholds the inputs; '+topk' does not apply")
        if not 0.0 <= self.sigma_floor <= 1.0:
            raise UsageError(f"sigma_floor must be in [0, 1], got {self.sigma_floor}")

    def make_collector(self, layer_name, module, target_sparsity):
        k, n = module.in_features, module.out_features
        if self.rank >= min(k, n):
            raise UsageError(
                f"rank {self.rank} is not below {layer_name}'s smallest dimension ({min(k, n)}): the low-rank term "
                f"would read as much as the layer; lower rank"
            )
        share = self.rank * (k + n) / (k * n)
        if target_sparsity <= 0:
            return HistogramQuantile(0.0, self.bins_per_octave)  # nothing dropped: no low-rank term
        q = target_sparsity + share
        if q > 1.0:
            raise UsageError(
                f"{layer_name}: rank {self.rank} reads {share:.3f} of the layer's bytes, so target {target_sparsity} "
                f"would need {q:.3f} > 1 of the inputs dropped; lower rank or the target"
            )
        floor = self.sigma_floor if self.whiten else None
        return _LowRankCollector(q, layer_weight(module), self.rank, floor, self.bins_per_octave)
