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
from typing import Any

import torch

from .errors import UsageError

__all__ = ["Collector", "HistogramQuantile", "EMAQuantile", "SignedQuantile", "Reservoir", "exact_quantile"]

_LOG2_MIN, _LOG2_MAX = -40, 24


class Collector:
    """Statistics of one layer's inputs during calibration (what a per-layer method returns).

    ``update(x)`` receives the layer's input activations ``[n_tokens, in_features]`` (padding removed),
    ``result()`` gives the threshold τ (or full ``SparsityParams``). ``next_pass()`` is called after each
    pass over the calibration data: True asks for another pass over the same data (e.g. the mode first,
    then the threshold of ``|x - mode|``); the default is one pass.
    """

    def update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self) -> Any:
        raise NotImplementedError

    def next_pass(self) -> bool:
        return False


def exact_quantile(values: torch.Tensor, q: float) -> float:
    """``torch.quantile(values, q)`` (linear interpolation) without its 16M-element limit."""
    v = values.reshape(-1).float()
    n = v.numel()
    if n == 0:
        raise UsageError("quantile of an empty tensor")
    pos = q * (n - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    a = v.kthvalue(lo + 1).values.item()
    b = a if hi == lo else v.kthvalue(hi + 1).values.item()
    return a + (b - a) * (pos - lo)


def _edge_threshold(q: float, n_seen: int) -> float | None:
    """The conventions shared by all collectors: no data is an error; q=0 → -inf, q=1 → +inf."""
    if n_seen == 0:
        raise UsageError("no values were collected")
    return -math.inf if q == 0.0 else math.inf if q == 1.0 else None


class HistogramQuantile(Collector):
    """Quantile of |x| over every value seen, from a fixed log2-spaced histogram."""

    def __init__(self, q: float, bins_per_octave: int = 1024):
        if not 0.0 <= q <= 1.0:
            raise UsageError(f"quantile must be in [0, 1], got {q}")
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
        tiny = a < 2.0**_LOG2_MIN
        n_tiny = int(tiny.sum().item())
        self.n_tiny += n_tiny
        if n_tiny:
            a = a[~tiny]
        idx = ((torch.log2(a) - _LOG2_MIN) * self.bpo).floor_().clamp_(0, self.nbins - 1).long()
        self.counts += torch.bincount(idx, minlength=self.nbins).cpu()

    def result(self) -> float:
        return self.quantile(self.q)

    def quantile(self, q: float) -> float:
        """The threshold for any fraction ``q`` of the values seen (``result()`` is ``quantile(self.q)``)."""
        edge = _edge_threshold(q, self.n)
        if edge is not None:
            return edge
        rank = q * self.n  # number of values that should be <= tau
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


class EMAQuantile(Collector):
    """NNCF's threshold: per-batch quantile of |x| combined by a bias-corrected EMA."""

    def __init__(self, q: float, alpha: float = 0.2):
        if not 0.0 < alpha < 1.0:
            raise UsageError(f"EMA alpha must be in (0, 1), got {alpha}")
        self.q, self.alpha = q, alpha
        self.value = 0.0
        self.n_batches = 0

    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        t = exact_quantile(x.detach().abs(), self.q)
        beta = 1.0 - self.alpha
        k = self.n_batches
        self.value = (t * self.alpha + self.value * beta * (1 - beta**k)) / (1 - beta ** (k + 1))
        self.n_batches += 1

    def result(self) -> float:
        edge = _edge_threshold(self.q, self.n_batches)
        return self.value if edge is None else edge


class SignedQuantile(Collector):
    """Quantile of signed values (e.g. the median of x) from two |x| histograms, one per sign."""

    def __init__(self, q: float, bins_per_octave: int = 1024):
        if not 0.0 <= q <= 1.0:
            raise UsageError(f"quantile must be in [0, 1], got {q}")
        self.q = q
        self.pos = HistogramQuantile(0.5, bins_per_octave)
        self.neg = HistogramQuantile(0.5, bins_per_octave)
        self.n_zero = 0

    def update(self, x: torch.Tensor) -> None:
        v = x.detach().reshape(-1).float()
        self.pos.update(v[v > 0])
        self.neg.update(v[v < 0])
        self.n_zero += int((v == 0).sum())

    def result(self) -> float:
        n_neg, n_pos = self.neg.n, self.pos.n
        n = n_neg + n_pos + self.n_zero
        if n == 0:
            raise UsageError("no values were collected")
        rank = self.q * n
        if rank < n_neg:  # among the negatives, counted from the most negative
            return -min(self.neg.quantile(1.0 - rank / n_neg), self.neg.max)
        if rank <= n_neg + self.n_zero:
            return 0.0
        return min(self.pos.quantile((rank - n_neg - self.n_zero) / n_pos), self.pos.max)


class Reservoir(Collector):
    """A uniform random sample of at most ``size`` values from a stream (Algorithm R, batched; seeded)."""

    def __init__(self, size: int, seed: int = 0):
        if size < 1:
            raise UsageError(f"reservoir size must be >= 1, got {size}")
        self.size = size
        self.values = torch.empty(0)
        self.n = 0
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        v = x.detach().reshape(-1).float().cpu()
        if v.numel() == 0:
            return
        room = self.size - self.values.numel()
        if room > 0:
            self.values = torch.cat([self.values, v[:room]])
            self.n += min(room, v.numel())
            v = v[room:]
        if v.numel():
            # value number i (1-based, over the whole stream) replaces a random slot with probability size/i
            idx = torch.arange(self.n + 1, self.n + v.numel() + 1, dtype=torch.float64)
            slot = (torch.rand(v.numel(), generator=self.gen, dtype=torch.float64) * idx).long()
            take = slot < self.size
            self.values[slot[take]] = v[take]  # repeated slots: one of the values wins
            self.n += v.numel()
