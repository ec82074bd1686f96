"""Sparse + low-rank (R-Sparse): the dropped channels through a rank-r factorisation, at equal bytes read."""

import math

import pytest
import torch
from helpers import make_tiny_llama, token_batches

import actsparse as A
import actsparse.kernels as K
from actsparse.calibrate import _Hooks
from actsparse.errors import UsageError
from actsparse.eval import SparsityMonitor
from actsparse.forward import input_hooks
from actsparse.methods import method_from_spec
from actsparse.methods.rsparse import RSparseMethod, lowrank_factors
from actsparse.stats import exact_quantile

MLP = {A.TargetScope(patterns=[r".*mlp\..*"]): 0.5}


def test_full_rank_factors_give_back_the_dense_layer_at_any_threshold():
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 16)
    u, v = lowrank_factors(lin.weight, 16)  # rank = min(in, out): exact
    x = torch.randn(5, 24)
    for tau in (0.0, 0.5, math.inf):
        layer = A.SparseLinear.from_linear(lin, A.SparsityParams(tau, lowrank=(u, v)))
        with torch.no_grad():
            torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-5)


def test_the_forward_is_kept_entries_through_w_and_dropped_ones_through_uv():
    torch.manual_seed(1)
    lin = torch.nn.Linear(24, 16)
    u, v = torch.randn(16, 3), torch.randn(3, 24)
    layer = A.SparseLinear.from_linear(lin, A.SparsityParams(0.7, shift=0.1, lowrank=(u, v)))
    x = torch.randn(4, 24)
    d = x - 0.1
    kept = d.masked_fill(d.abs() <= 0.7, 0.0)
    want = kept @ lin.weight.t() + (d - kept) @ v.t() @ u.t() + 0.1 * lin.weight.sum(1) + lin.bias
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_calibrated_factors_fit_the_dropped_entries_and_the_bytes_add_up(calib_data, tmp_path):
    model = make_tiny_llama()
    first = "model.layers.0.mlp.gate_proj"  # its inputs are the dense model's: a reference by hand
    seen = []
    h = model.get_submodule(first).register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        for x in calib_data:
            model(x)
    h.remove()
    dense_in = torch.cat(seen)
    w = model.get_submodule(first).weight.detach().clone()
    A.sparsify_(model, A.SparsifyConfig(MLP, method=RSparseMethod(rank=4)), calib_data, progress=False)
    layer = A.sparse_layers(model)[first]
    share = 4 * (64 + 128) / (64 * 128)
    assert layer.lowrank_share == pytest.approx(share) and layer.target_sparsity == 0.5
    tau = exact_quantile(dense_in.abs(), 0.5 + share)  # τ drops the low-rank term's share more
    assert layer.params.threshold == pytest.approx(tau, rel=2e-3)
    sigma = dense_in.masked_fill(dense_in.abs() > layer.params.threshold, 0).pow(2).mean(0).sqrt()
    u, v = lowrank_factors(w, 4, sigma)
    torch.testing.assert_close(layer.params.lowrank[0] @ layer.params.lowrank[1], u @ v, rtol=1e-3, atol=1e-4)
    # on the calibration data the layer skips (zeros less the low-rank share) what was asked
    with SparsityMonitor(model) as mon, torch.no_grad():
        for x in calib_data:
            model(x)
    assert mon.sparsity()[first] == pytest.approx(0.5, abs=0.01)
    # the correction reduces the layer's output error against dropping the same entries outright
    kept = dense_in.masked_fill(dense_in.abs() <= layer.params.threshold, 0)
    dense_out, plain = dense_in @ w.t(), kept @ w.t()
    corrected = plain + (dense_in - kept) @ layer.params.lowrank[1].t() @ layer.params.lowrank[0].t()
    assert (corrected - dense_out).norm() < (plain - dense_out).norm()
    # saved and loaded with the thresholds; the sparse GEMV leaves these layers on the dense route
    path = A.save_thresholds(model, str(tmp_path / "t.safetensors"))
    fresh = make_tiny_llama()
    A.load_thresholds(fresh, path)
    x = calib_data[0]
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, model(x).logits)
    assert all(n not in K.enable_kernels(fresh.to(torch.bfloat16)) for n in A.sparse_layers(fresh))


def test_bad_ranks_are_refused(calib_data):
    with pytest.raises(UsageError, match="rank must be >= 1"):
        RSparseMethod(rank=0)
    with pytest.raises(UsageError, match="smallest dimension"):
        A.sparsify_(make_tiny_llama(), A.SparsifyConfig(MLP, method=RSparseMethod(rank=64)), calib_data, progress=False)
    with pytest.raises(UsageError, match="lower rank or the target"):
        A.sparsify_(
            make_tiny_llama(),
            A.SparsifyConfig({".*mlp.*": 0.95}, method=RSparseMethod(rank=32)),
            calib_data,
            progress=False,
        )
    with pytest.raises(ValueError, match="low-rank factors"):
        A.SparseLinear.from_linear(
            torch.nn.Linear(8, 4), A.SparsityParams(0.1, lowrank=(torch.ones(4, 2), torch.ones(3, 8)))
        )


def test_a_channel_never_dropped_in_calibration_cannot_blow_up_the_correction():
    torch.manual_seed(3)
    w = torch.randn(16, 24)
    sigma = torch.ones(24)
    sigma[3] = 0.0  # always kept while calibrating (e.g. a massive-activation channel)
    rms = float(sigma.pow(2).mean().sqrt())
    _, v = lowrank_factors(w, 4, sigma)  # default floor 0.1 × RMS(σ): |V| ≤ 1 / (0.1 · rms)
    assert float(v.abs().max()) <= 1 / (0.1 * rms) * (1 + 1e-5)
    _, v_raw = lowrank_factors(w, 4, sigma, floor=0.0)
    assert float(v_raw[:, 3].abs().max()) > 1e6  # what the floor prevents
    with pytest.raises(UsageError, match="sigma_floor"):
        RSparseMethod(sigma_floor=2.0)


def test_sequential_calibration_sees_the_low_rank_term_of_the_layers_before():
    # each layer is calibrated on the inputs the deployed model gives it: with the earlier layers' U·V·x_dropped
    # added (without it the later layers' thresholds were fitted on another network: 2-7% off at 50-70%)
    data = token_batches(4)
    model = make_tiny_llama(layers=4, hidden=128, inter=256)
    scope = {A.TargetScope(patterns=[r".*mlp\.(gate|up|down)_proj"]): 0.5}
    A.sparsify_activations(model, data, scope, method=method_from_spec("rsparse", rank=16), progress=False)
    layers = A.sparse_layers(model)
    zeros = {n: [0, 0] for n in layers}

    def count(name, m, x):
        d = m.sparsify_input(x)
        zeros[name][0] += int((d == 0).sum())
        zeros[name][1] += d.numel()

    with input_hooks(layers, count), torch.no_grad():
        for x in data:
            model(x)
    for n, m in layers.items():  # the fitted quantile: the target plus the bytes the low-rank term reads
        assert zeros[n][0] / zeros[n][1] == pytest.approx(m.target_sparsity + m.lowrank_share, abs=1e-3), n


def test_calibration_hooks_drop_factors_a_layer_no_longer_has(tiny_llama, calib_data):
    name = "model.layers.0.mlp.down_proj"
    layer = dict(tiny_llama.named_modules())[name]
    hooks = _Hooks({name: layer})
    u, v = torch.randn(64, 2), torch.randn(2, 128)
    with hooks.installed(), torch.no_grad():
        hooks.set_params(name, A.SparsityParams(0.1, lowrank=(u, v)))
        with_factors = tiny_llama(calib_data[0]).logits
        hooks.set_params(name, A.SparsityParams(0.1))  # the same threshold, no factors
        without = tiny_llama(calib_data[0]).logits
    assert not torch.equal(with_factors, without)
    A.apply_thresholds(tiny_llama, {name: 0.1})
    assert torch.equal(tiny_llama(calib_data[0]).logits, without)  # what the deployed layer computes
