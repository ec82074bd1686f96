"""fuse_glu: gated MLPs hand gate and up to the down projection's sparse GEMV (CPU: Triton's interpreter).

On the CPU the op forms ``silu(gate) * up`` itself and runs the same kernel as the unfused MLP, so outputs are
bit-identical; the CUDA kernel's in-load product is tested on the GPU (tests/test_cuda_gemv.py -k gated).
"""

import pytest
import torch
import torch.nn as nn
from helpers import VOCAB, make_tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode

import actsparse as A
import actsparse.kernels as K
from actsparse.engine import Decoder, fuse_glu, glu_fused, unfuse_glu
from actsparse.errors import UsageError
from actsparse.generation import dense_view

pytest.importorskip("actsparse.kernels.triton_gemv", reason="triton is not installed")

DT = torch.bfloat16


class GatedCalls(TorchDispatchMode):
    """Counts ``actsparse::sparse_gemv`` launches given a gate (``counts["gated"]``, what the dispatcher sees)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) == "actsparse.sparse_gemv":
            named = {a.name: v for a, v in zip(func._schema.arguments, args)} | (kwargs or {})
            if named.get("gate") is not None:
                self.counts["gated"] = self.counts.get("gated", 0) + 1
        return func(*args, **(kwargs or {}))


def _model(layers=2, kernels=True):
    model = make_tiny_llama(layers=layers, hidden=64, inter=256).to(DT)
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, VOCAB, (2, 16), generator=g) for _ in range(2)]
    A.sparsify_(model, A.SparsifyConfig({".*layers.*": 0.5}), data, progress=False)
    if kernels:
        K.enable_kernels(model, backend="triton")
    return model


def _row(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 1, model.config.hidden_size, generator=g).to(DT)


def test_fused_mlps_give_the_same_outputs_through_one_glu_gemv_each():
    model = _model()
    mlps = [layer.mlp for layer in model.model.layers]
    x = _row(model)
    with torch.no_grad():
        want = [m(x) for m in mlps]
        assert fuse_glu(model) == []  # on the CPU no down projection runs the CUDA kernel
        names = fuse_glu(model, require_cuda=False)
        assert names == glu_fused(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
        assert fuse_glu(model, require_cuda=False) == names  # idempotent: the same forwards kept
        with GatedCalls() as ops:
            got = [m(x) for m in mlps]
        assert ops.counts.get("gated") == 2
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        prefill = torch.randn(1, 5, model.config.hidden_size).to(DT)  # several rows: the MLP's own arithmetic
        with GatedCalls() as ops:
            fused = mlps[0](prefill)
        assert "gated" not in ops.counts
        unfuse_glu(model)
        assert glu_fused(model) == [] and "forward" not in vars(mlps[0])
        assert torch.equal(fused, mlps[0](prefill))


def test_a_hook_on_down_proj_sees_the_product_and_the_mlp_is_not_fused_while_hooked():
    model = _model(layers=1)
    mlp = model.model.layers[0].mlp
    seen = []
    handle = mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    assert fuse_glu(model, require_cuda=False) == []  # hooks at fusing time: left alone
    handle.remove()
    assert fuse_glu(model, require_cuda=False) == ["model.layers.0.mlp"]
    handle = mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(i[0]))  # hooked after fusing
    x = _row(model)
    with torch.no_grad(), GatedCalls() as ops:
        y = mlp(x)
    assert "gated" not in ops.counts and len(seen) == 1
    with torch.no_grad():
        assert torch.equal(seen[0], mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    handle.remove()
    with torch.no_grad():
        assert torch.equal(mlp(x), y)


class _ScaledMLP(nn.Module):
    """Gate/up/down and SiLU like Llama's, but a forward that scales the output: must keep its own forward."""

    def __init__(self, mlp):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = (
            mlp.gate_proj,
            mlp.up_proj,
            mlp.down_proj,
            mlp.act_fn,
        )

    def forward(self, x):
        return 0.5 * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _ClampedMLP(_ScaledMLP):
    """Llama's MLP with large values clamped (as some MoE experts do): a random probe never reaches the clamp."""

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x).clamp(max=7.0)) * self.up_proj(x).clamp(-7.0, 7.0))


class _RoutedMLP(_ScaledMLP):
    """A forward that needs more than the hidden states (a router's weights, say)."""

    def forward(self, x, weights):
        return weights * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_a_fused_mlp_runs_with_plain_linears_swapped_in():
    """compare_generate's dense view puts plain nn.Linear layers (no packed state) where the sparse ones were."""
    model = _model(layers=1)
    mlp = model.model.layers[0].mlp
    assert fuse_glu(model, require_cuda=False) == ["model.layers.0.mlp"]
    x = _row(model)
    with torch.no_grad(), dense_view(model):
        assert type(mlp.down_proj) is nn.Linear
        got = mlp(x)
        want = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    assert torch.equal(got, want)


def test_only_mlps_that_compute_down_of_silu_gate_times_up_are_fused():
    model = _model()
    layers = model.model.layers
    layers[0].mlp = _ScaledMLP(layers[0].mlp)
    layers[1].mlp.act_fn = nn.GELU()
    assert fuse_glu(model, require_cuda=False) == []
    layers[0].mlp = _RoutedMLP(layers[0].mlp)
    assert fuse_glu(model, require_cuda=False) == []
    layers[0].mlp = _ClampedMLP(layers[0].mlp)
    assert fuse_glu(model, require_cuda=False) == []
    layers[1].mlp.act_fn = nn.SiLU()
    assert fuse_glu(model, require_cuda=False) == ["model.layers.1.mlp"]
    assert "forward" not in vars(layers[0].mlp)


def test_without_kernels_or_on_the_dense_route_nothing_is_fused():
    assert fuse_glu(_model(kernels=False), require_cuda=False) == []
    model = _model(kernels=False)
    K.enable_kernels(model, backend="triton", min_sparsity=0.9)  # every layer on the dense route
    assert fuse_glu(model, require_cuda=False) == []


def test_decoder_glu_false_restores_the_mlps_own_forward_and_glu_true_unfuses_what_no_longer_qualifies():
    model = _model()
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    fuse_glu(model, require_cuda=False)
    a = Decoder(model, 32).run(ids, 4)  # CPU: fuse off, hence glu off: the MLPs' own forwards
    assert glu_fused(model) == []
    fuse_glu(model, require_cuda=False)
    b = Decoder(model, 32, glu=True).run(ids, 4)  # its fuse_glu requires the CUDA kernel: none runs on the CPU
    assert glu_fused(model) == []
    assert torch.equal(a.sequences, b.sequences)
    fuse_glu(model, require_cuda=False)
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda *a: None)
    assert fuse_glu(model, require_cuda=False) == ["model.layers.1.mlp"]  # the hooked one is unfused


def test_an_act_fn_hooked_or_replaced_after_fusing_is_honoured():
    model = _model(layers=1)
    mlp = model.model.layers[0].mlp
    fuse_glu(model, require_cuda=False)
    x = _row(model)
    calls = []
    handle = mlp.act_fn.register_forward_hook(lambda m, i, o: calls.append(1))
    with torch.no_grad(), GatedCalls() as ops:
        mlp(x)
    assert calls == [1] and "gated" not in ops.counts
    handle.remove()
    mlp.act_fn = nn.GELU()
    with torch.no_grad():
        want = mlp.down_proj(nn.functional.gelu(mlp.gate_proj(x)) * mlp.up_proj(x))
        assert torch.equal(mlp(x), want)


def test_a_gate_that_needs_gradients_takes_the_mlps_arithmetic():
    model = _model(layers=1)
    mlp = model.model.layers[0].mlp
    fuse_glu(model, require_cuda=False)
    model.requires_grad_(False)
    mlp.gate_proj.weight.requires_grad_(True)
    mlp(_row(model)).float().sum().backward()  # the op has no backward: it must not have run
    assert mlp.gate_proj.weight.grad is not None


def test_the_glu_op_refuses_mismatched_inputs():
    model = _model(layers=1)
    packed = model.model.layers[0].mlp.down_proj._packed
    up = torch.randn(256).to(DT)
    with pytest.raises(UsageError, match="gate and up must have one shape, dtype and device"):
        K.sparse_gemv(up, packed, gate=torch.randn(128).to(DT))
    with pytest.raises(UsageError, match="gate and up must have one shape, dtype and device"):
        K.sparse_gemv(up, packed, gate=up.float())
    with pytest.raises(UsageError, match="input has 128 features, the packed weights expect 256"):
        K.sparse_gemv(torch.randn(128).to(DT), packed, gate=torch.randn(128).to(DT))


def test_a_gate_with_the_consumer_reduction_forms_the_product_first():
    model = _model(layers=1)
    packed = model.model.layers[0].mlp.down_proj._packed
    g = torch.Generator().manual_seed(7)
    gate, up = (torch.randn(256, generator=g).to(DT) for _ in range(2))
    want = K.sparse_gemv(nn.functional.silu(gate) * up, packed, reduce="consumer")
    for a, b in zip(K.sparse_gemv(up, packed, reduce="consumer", gate=gate), want):
        assert torch.equal(a, b)
