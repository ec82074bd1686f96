"""enable_kernels' plan: shared-input groups in one launch, the dense route below break-even, live thresholds."""

import math

import pytest
import torch
from helpers import make_tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode

import actsparse as A
import actsparse.kernels as K
from actsparse.engine import forward_kwargs
from actsparse.engine.hf import output_cache

pytest.importorskip("actsparse.kernels.triton_gemv", reason="triton is not installed")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.bfloat16


class CountGemv(TorchDispatchMode):
    """Counts actsparse::sparse_gemv launches (what the dispatcher sees, not our Python)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "actsparse.sparse_gemv" in str(func):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _model(targets):
    torch.manual_seed(0)
    model = make_tiny_llama(hidden=64, inter=256).to(DEV, DT)
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 256, (2, 16), generator=g).to(DEV) for _ in range(2)]
    A.sparsify_(model, A.SparsifyConfig(targets), data, progress=False)
    return model


def _decode_logits(model, ids):
    with torch.no_grad():
        out = model(ids[:, :-1], use_cache=True)
        cache = output_cache(out)
        return model(ids[:, -1:], **forward_kwargs(model, cache, last_only=False)).logits


def test_shared_input_layers_run_as_one_launch_with_the_per_layer_result():
    model = _model({".*layers.*": 0.5})
    ids = torch.randint(0, 256, (1, 9), device=DEV)
    ref = _decode_logits(model, ids)  # masked F.linear everywhere
    K.enable_kernels(model, fuse=False)
    with CountGemv() as alone:
        single = _decode_logits(model, ids)
    K.enable_kernels(model)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj._packed is attn.k_proj._packed is attn.v_proj._packed
    assert [r.group for r in K.kernel_routes(model).values()][:3] == [
        ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj")
    ] * 3
    with CountGemv() as fused:
        got = _decode_logits(model, ids)
    assert alone.n == 14 and fused.n == 8  # 7 launches per block -> 4 (q/k/v, o, gate/up, down)
    torch.testing.assert_close(got, single, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got, ref, rtol=3e-2, atol=3e-2)


def test_group_members_called_alone_or_out_of_order_stay_correct():
    model = _model({".*layers.*": 0.5})
    attn = model.model.layers[0].self_attn
    x, x2 = torch.randn(2, 1, 1, 64, device=DEV, dtype=DT)
    with torch.no_grad():
        want = {n: getattr(attn, n)(x) for n in ("q_proj", "k_proj", "v_proj")}
        want2 = attn.q_proj(x2)
        K.enable_kernels(model)
        with CountGemv() as c:
            got_v = attn.v_proj(x)  # a follower first: it launches the group
            got_q2 = attn.q_proj(x2)  # another input: a launch of its own (replaces what x left)
            got_k = attn.k_proj(x)  # x again: launches the group again
            got_q = attn.q_proj(x)  # ... and leaves q's output for x
        assert c.n == 3
        x.mul_(2)  # an in-place edit of the shared input: nothing stale is returned
        assert not torch.equal(attn.k_proj(x), got_k)
    for got, name in ((got_q, "q_proj"), (got_k, "k_proj"), (got_v, "v_proj")):
        torch.testing.assert_close(got, want[name], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got_q2, want2, rtol=2e-2, atol=2e-2)


def test_group_thresholds_stay_live_per_layer():
    model = _model({".*layers.*": 0.5})
    K.enable_kernels(model)
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 1, 64, device=DEV, dtype=DT)
    with torch.no_grad():
        attn.k_proj.act_threshold.fill_(math.inf)  # only k drops everything
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    assert torch.count_nonzero(k) == 0 and torch.count_nonzero(q) > 0 and torch.count_nonzero(v) > 0
    assert float(attn.k_proj._packed.threshold[1]) == math.inf
    sd = model.state_dict()
    assert sd["model.layers.0.self_attn.k_proj.act_threshold"].item() == math.inf
    K.disable_kernels(model)  # the buffers are the layers' own again
    attn.k_proj.act_threshold.fill_(0.0)
    assert float(attn.q_proj.act_threshold) != 0.0 and attn.k_proj.act_threshold._base is None


def test_dense_route_below_break_even_is_deterministic():
    model = _model({".*self_attn.*": 0.1, ".*mlp.*": 0.5})
    names = K.enable_kernels(model, backend="triton")  # the Triton kernel's break-even (CUDA C++: none)
    routes = K.kernel_routes(model)
    assert all(".mlp." in n for n in names) and len(names) == 6
    for name, r in routes.items():
        layer = model.get_submodule(name)
        if ".self_attn." in name:
            assert r.route == "dense" and layer._packed is None and r.expected_sparsity == pytest.approx(0.1)
            assert "< 0.2" in r.reason
        else:
            assert r.route == "kernel" and layer._packed is not None
    assert K.enable_kernels(model, backend="triton") == names  # same model, same plan
    assert len(K.enable_kernels(model, min_sparsity=0.05)) == 14
    assert K.enable_kernels(model, min_sparsity=0.6) == []
    with pytest.raises(ValueError, match="min_sparsity"):
        K.enable_kernels(model, min_sparsity=2)


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_int8_codes_never_take_the_dense_route(backend):
    pytest.importorskip("torchao", reason="torchao is not installed")
    torch.manual_seed(0)
    model = make_tiny_llama(hidden=64, inter=256).to(DEV, DT)
    A.compress_weights(model, "int8_sym")
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 256, (2, 16), generator=g).to(DEV) for _ in range(2)]
    A.sparsify_(model, A.SparsifyConfig({".*self_attn.*": 0.1, ".*mlp.*": 0.0}), data, progress=False)
    assert len(K.enable_kernels(model, backend=backend)) == 14  # below Triton's bf16 break-even, still the kernel
    assert {r.route for r in K.kernel_routes(model).values()} == {"kernel"}
    assert K.INT8_MIN_SPARSITY == 0.0
    names = K.enable_kernels(model, min_sparsity=0.05, backend=backend)  # an explicit floor still applies
    assert len(names) == 8 and all(".self_attn." in n for n in names)


class CountMM(TorchDispatchMode):
    """Counts matrix products (aten mm / addmm / matmul-as-mm) the dispatcher sees."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("mm", "addmm", "bmm"):
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_a_dense_route_group_runs_one_masked_gemm_with_each_layers_own_mask():
    model = _model({".*mlp.*": 0.1})  # gate/up (256 wide) below break-even: the dense route
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.up_proj.act_threshold.fill_(0.3)  # a mask of its own, unlike gate's
    x = torch.randn(1, 1, 64, device=DEV, dtype=DT)
    with torch.no_grad():
        want = (mlp.gate_proj(x), mlp.up_proj(x))  # each layer's masked F.linear
        assert K.enable_kernels(model, backend="triton") == []  # nothing on the sparse GEMV ...
        route = K.kernel_routes(model)["model.layers.0.mlp.up_proj"]
        assert route.route == "dense" and "one masked GEMM" in route.reason and mlp.up_proj._packed is not None
        assert mlp.gate_proj.weight.data_ptr() == mlp.gate_proj._packed.weight_t.data_ptr()  # shared, no copy
        with CountMM() as mm, CountGemv() as gemv:
            got = (mlp.gate_proj(x), mlp.up_proj(x))
    assert mm.n == 1 and gemv.n == 0  # ... but one GEMM for the pair
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
    unmasked = torch.nn.functional.linear(x, mlp.up_proj.weight)
    assert (got[1] - unmasked).abs().max() > 1e-2  # up's own τ = 0.3 was applied, not gate's


def test_expected_sparsity_from_targets_and_identity_thresholds():
    torch.manual_seed(0)
    model = make_tiny_llama(hidden=64, inter=256).to(DEV, DT)
    A.apply_thresholds(
        model,
        {
            "model.layers.0.mlp.up_proj": -math.inf,
            "model.layers.0.mlp.gate_proj": -math.inf,
            "model.layers.0.mlp.down_proj": 0.1,
            "model.layers.1.mlp.down_proj": math.inf,
        },
    )
    layers = A.sparse_layers(model)
    assert K.expected_sparsity(layers["model.layers.0.mlp.up_proj"]) == 0.0
    assert K.expected_sparsity(layers["model.layers.0.mlp.down_proj"]) is None  # a threshold, no target
    assert K.expected_sparsity(layers["model.layers.1.mlp.down_proj"]) == 1.0
    # identity thresholds (0%) stay dense under the Triton kernel; an unknown sparsity is taken as sparse
    routed = K.enable_kernels(model, backend="triton")
    assert sorted(routed) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_model_to_dtype_keeps_thresholds_fp32():
    model = _model({".*mlp.*": 0.5})
    up = model.model.layers[0].mlp.up_proj
    tau = up.act_threshold.clone()
    model.to(torch.float16)
    assert up.weight.dtype == torch.float16 and up.act_threshold.dtype == torch.float32
    assert torch.equal(up.act_threshold, tau)  # not rounded through fp16
