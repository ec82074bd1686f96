import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actsparse.stats import EMAQuantile, HistogramQuantile, exact_quantile


def _dists():
    g = torch.Generator().manual_seed(0)
    return {
        "normal": torch.randn(60000, generator=g),
        "lognormal": torch.randn(60000, generator=g).exp() * 1e-3,
        "half_zeros": torch.cat([torch.zeros(20000), torch.randn(40000, generator=g)]),
        "heavy": torch.randn(60000, generator=g) ** 5,
    }


@pytest.mark.parametrize("name", list(_dists()))
@pytest.mark.parametrize("q", [0.05, 0.3, 0.5, 0.9, 0.99])
def test_histogram_quantile_matches_exact_quantile(name, q):
    x = _dists()[name]
    h = HistogramQuantile(q)
    for chunk in x.split(7001):  # streamed in uneven batches
        h.update(chunk.reshape(-1, 1))
    tau = h.result()
    frac = (x.abs() <= tau).double().mean().item()
    assert abs(frac - q) < 2e-4 or (name == "half_zeros" and q < 1 / 3 and tau == 0.0)
    exact = torch.quantile(x.abs(), q).item()
    if exact > 0:
        assert abs(tau - exact) / exact < 2e-3


def test_histogram_memory_is_bounded():
    h = HistogramQuantile(0.5)
    size = h.counts.numel()
    for _ in range(5):
        h.update(torch.randn(10000, 8))
    assert h.counts.numel() == size and h.n == 5 * 80000


def test_quantile_edge_conventions():
    for cls in (HistogramQuantile, EMAQuantile):
        lo, hi = cls(0.0), cls(1.0)
        for c in (lo, hi):
            c.update(torch.randn(100))
        assert lo.result() == -math.inf and hi.result() == math.inf
    with pytest.raises(ValueError):
        HistogramQuantile(0.5).result()


def test_ema_is_pandas_adjusted_ewm_of_batch_quantiles():
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(500, generator=g) * (i + 1) for i in range(5)]
    alpha = 0.2
    ema = EMAQuantile(0.4, alpha)
    for b in batches:
        ema.update(b)
    per_batch = [torch.quantile(b.abs(), 0.4).item() for b in batches]
    w = [(1 - alpha) ** (len(per_batch) - 1 - i) for i in range(len(per_batch))]
    expected = sum(wi * t for wi, t in zip(w, per_batch)) / sum(w)
    assert ema.result() == pytest.approx(expected, rel=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=200), st.floats(0, 1))
def test_exact_quantile_equals_torch_quantile(values, q):
    x = torch.tensor(values, dtype=torch.float64)
    assert exact_quantile(x, q) == pytest.approx(torch.quantile(x.float(), q).item(), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("q", [0.1, 0.5, 0.9])
def test_signed_quantile_matches_torch(q):
    from actsparse.stats import SignedQuantile

    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(3000, generator=g) * 0.5 - 0.3, torch.zeros(200), torch.rand(1000, generator=g) * 4])
    sq = SignedQuantile(q)
    for part in x.split(700):
        sq.update(part)
    assert sq.result() == pytest.approx(torch.quantile(x, q).item(), rel=2e-3, abs=1e-4)


def test_reservoir_is_a_uniform_sample_of_the_stream():
    from actsparse.stats import Reservoir

    r = Reservoir(2000, seed=0)
    stream = torch.arange(100_000, dtype=torch.float32)
    for part in stream.split(3333):
        r.update(part)
    assert r.values.numel() == 2000 and r.n == 100_000
    assert len(set(r.values.tolist())) > 1900  # distinct values of the stream
    # uniform over the stream: the mean position is near the middle, every decile is represented
    assert abs(r.values.mean().item() / 100_000 - 0.5) < 0.03
    counts = torch.bincount((r.values / 10_000).long(), minlength=10)
    assert counts.min() > 120
