"""Streaming statistics of |x| for threshold calibration, with bounded memory.

* ``HistogramQuantile`` — one quantile over *all* calibration tokens. |x| is binned on a log2 scale
  (``bins_per_octave`` bins per power of two over [2^-40, 2^24)), so memory is fixed (64 Ki counts)
  and the quantile's relative error is at most ``2^(1/bins_per_octave) - 1`` (0.07% by default).
* ``EMAQuantile`` — NNCF's rule: the exact quantile of each batch, combined by a bias-corrected
  exponential moving average (``pandas.ewm(adjust=True)``), ``alpha = 0.2``.

Both take token-major activations ``[n_tokens, features]`` (padding already removed) and return
the threshold τ such that a fraction ``q`` of the |x| is ``<= τ``. By convention ``q = 0`` gives
``-inf`` (exact identity) and ``q = 1`` gives ``+inf`` (zero everything).
"""

from __future__ import annotations

import math

import torch

__all__ = ["HistogramQuantile", "EMAQuantile", "exact_quantile"]

_LOG2_MIN, _LOG2_MAX = -40, 24


def exact_quantile(values: torch.Tensor, q: float) -> float:
    """``torch.quantile(values, q)`` (linear interpolation) without its 16M-element limit."""
    v = values.reshape(-1).float()
    n = v.numel()
    if n == 0:
        raise ValueError("quantile of an empty tensor")
    pos = q * (n - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    a = v.kthvalue(lo + 1).values.item()
    b = a if hi == lo else v.kthvalue(hi + 1).values.item()
    return a + (b - a) * (pos - lo)


def _edge_threshold(q: float, n_seen: int) -> float | None:
    """The conventions shared by all collectors: no data is an error; q=0 → -inf, q=1 → +inf."""
    if n_seen == 0:
        raise ValueError("no values were collected")
    return -math.inf if q == 0.0 else math.inf if q == 1.0 else None


class HistogramQuantile:
    """Quantile of |x| over every value seen, from a fixed log2-spaced histogram."""

    def __init__(self, q: float, bins_per_octave: int = 1024):
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        self.q = q
        self.bpo = int(bins_per_octave)
        self.nbins = (_LOG2_MAX - _LOG2_MIN) * self.bpo
        self.counts = torch.zeros(self.nbins, dtype=torch.int64)
        self.n_tiny = 0  # |x| < 2^-40, including exact zeros
        self.n = 0
        self.max = 0.0

    def update(self, x: torch.Tensor) -> None:
        a = x.detach().reshape(-1).abs().float()
        if a.numel() == 0:
            return
        self.n += a.numel()
        self.max = max(self.max, a.max().item())
        tiny = a < 2.0 ** _LOG2_MIN
        n_tiny = int(tiny.sum().item())
        self.n_tiny += n_tiny
        if n_tiny:
            a = a[~tiny]
        idx = ((torch.log2(a) - _LOG2_MIN) * self.bpo).floor_().clamp_(0, self.nbins - 1).long()
        self.counts += torch.bincount(idx, minlength=self.nbins).cpu()

    def result(self) -> float:
        edge = _edge_threshold(self.q, self.n)
        if edge is not None:
            return edge
        rank = self.q * self.n  # number of values that should be <= tau
        if rank <= self.n_tiny:
            return 0.0
        cum = torch.cumsum(self.counts, 0)
        need = torch.tensor([math.ceil(rank - self.n_tiny)], dtype=cum.dtype)
        i = int(torch.searchsorted(cum, need).item())  # first bin where the count reaches the rank
        i = min(i, self.nbins - 1)
        before = self.n_tiny + (cum[i - 1].item() if i > 0 else 0)
        in_bin = self.counts[i].item()
        frac = (rank - before) / in_bin if in_bin else 1.0
        tau = 2.0 ** (_LOG2_MIN + (i + frac) / self.bpo)
        return min(tau, self.max)


class EMAQuantile:
    """NNCF's threshold: per-batch quantile of |x| combined by a bias-corrected EMA."""

    def __init__(self, q: float, alpha: float = 0.2):
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"EMA alpha must be in (0, 1), got {alpha}")
        self.q, self.alpha = q, alpha
        self.value = 0.0
        self.n_batches = 0

    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        t = exact_quantile(x.detach().abs(), self.q)
        beta = 1.0 - self.alpha
        k = self.n_batches
        self.value = (t * self.alpha + self.value * beta * (1 - beta ** k)) / (1 - beta ** (k + 1))
        self.n_batches += 1

    def result(self) -> float:
        edge = _edge_threshold(self.q, self.n_batches)
        return self.value if edge is None else edge
