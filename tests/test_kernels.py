"""Sparse GEMV: Triton kernel vs the torch reference (CPU interpreter here, real kernels on CUDA)."""

import gc
import math
import weakref

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import actsparse.kernels as K
from actsparse.engine import forward_kwargs
from actsparse.engine.hf import output_cache
from actsparse.errors import UsageError
from actsparse.kernels import ops
from actsparse.kernels.reference import mask_input, sparse_gemv_reference
from actsparse.kernels.workspace import counter_buffer

tg = pytest.importorskip("actsparse.kernels.triton_gemv", reason="triton is not installed")
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
round_nearest_even = pytest.importorskip("actsparse.kernels.triton_round").round_nearest_even

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# fp32 accumulation in another order; outputs rounded once to the dtype (rare 1-ulp flips)
TOL = {torch.float16: 2e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}
# what a decoder's fp16/bf16 layer runs: the CUDA C++ kernel where it runs (Hopper + nvcc), else Triton
HALF_GEMV = "cuda" if ops.cuda_kernel_available(DEV) else "triton"


def _step(model, ids, out):
    """One decode step on the cache ``out`` returned (named for the installed transformers version)."""
    cache = output_cache(out)
    return model(ids, **forward_kwargs(model, cache, last_only=False)).logits


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(k, ns, dtype, *, sparsity=0.5, shifts=None, bias=False, quantize=None, seed=0, layout=256):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(n, k, generator=g).to(dtype).to(DEV) for n in ns]
    x = (torch.randn(k, generator=g) * 2).to(dtype).to(DEV)
    thresholds = []
    for i in range(len(ns)):
        mu = shifts[i] if shifts else 0.0
        d = (x.float() - mu).abs()
        if sparsity <= 0:
            thresholds.append(-math.inf)
        elif sparsity >= 1:
            thresholds.append(math.inf)
        else:
            thresholds.append(torch.quantile(d.cpu(), sparsity).item())
    biases = [torch.randn(n, generator=g).to(DEV) for n in ns] if bias else None
    return x, K.pack(ws, thresholds, shifts=shifts, biases=biases, quantize=quantize, layout_block=layout)


def check(x, packed, config=None):
    ref = sparse_gemv_reference(x, packed)
    out = torch.full((packed.padded_out,), float("nan"), dtype=x.dtype, device=x.device)  # poison
    y = tg.sparse_gemv_triton(x, packed, config, out=out)
    for off, n in packed.segments:
        assert not torch.isnan(y[off : off + n]).any(), "kernel left outputs unwritten"
        assert rel_err(y[off : off + n], ref[off : off + n]) <= TOL[x.dtype], (off, n)
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quantize", [None, "int8", "int8-sym"])
@pytest.mark.parametrize("layout", [None, 128, 256])
def test_kernel_matches_reference_with_shift_bias_and_segments(dtype, quantize, layout):
    x, p = make(100, [37, 300, 5], dtype, shifts=[0.3, -0.5, 0.0], bias=True, quantize=quantize, layout=layout)
    configs = [
        None,
        tg.GemvConfig(32, 128, 3),
        tg.GemvConfig(16, 64, 7),
        tg.GemvConfig(32, 128, 2, use_dot=False),
        tg.GemvConfig(16, 128, 2, compact=False),
        tg.GemvConfig(16, 128, 1, use_dot=False, compact=False),
    ]
    if layout != 128:
        configs.append(tg.GemvConfig(16, 256, 1))
    for cfg in configs:
        check(x, p, cfg)


def test_layouts_hold_the_same_weights():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, 40, generator=g) for n in (37, 300)]
    for layout in (None, 64, 256):
        p = K.pack(ws, layout_block=layout)
        assert p.padded_out == 768 and p.in_features == 40 and p.layout_block == (layout or 768)
        for i, w in enumerate(ws):
            assert torch.equal(p.dense_weight(i), w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 1.0])
def test_kernel_across_sparsities(dtype, sparsity):
    x, p = make(257, [300], dtype, sparsity=sparsity, bias=True)
    y = check(x, p, tg.GemvConfig(32, 256, 4))
    check(x, p, tg.GemvConfig(32, 256, 4, compact=False))
    if sparsity == 1.0:  # nothing survives: only the bias is left
        torch.testing.assert_close(y[:300].float(), p.bias[:300].to(dtype).float())


@pytest.mark.parametrize("k,n", [(1, 1), (3, 257), (64, 1), (129, 33)])
def test_odd_sizes(k, n):
    x, p = make(k, [n], torch.float16, sparsity=0.4, shifts=[0.1])
    check(x, p)
    check(x, p, tg.GemvConfig(16, 256, max(1, k // 16)))


def test_threshold_compares_in_activation_dtype():
    # 0.8 rounds up to 0.80078125 in bf16: an input of exactly that value is dropped, as SparseLinear does
    x = torch.tensor([0.80078125, 0.796875, -0.80078125, 1.0] * 4, dtype=torch.bfloat16, device=DEV)
    w = torch.ones(8, 16, dtype=torch.bfloat16, device=DEV)
    p = K.pack([w], [0.8])
    y = tg.sparse_gemv_triton(x, p)
    from actsparse.sparse_linear import sparsify_tensor

    expected = sparsify_tensor(x, torch.tensor(0.8, device=DEV)).float().sum()
    assert y[0].item() == pytest.approx(expected.item())
    assert expected.item() == pytest.approx(4 * 1.0)


def test_nan_inputs_are_kept_like_the_reference():
    x = torch.randn(64, device=DEV)
    x[3] = float("nan")
    p = K.pack([torch.randn(16, 64, device=DEV)], [0.5])
    assert torch.isnan(tg.sparse_gemv_triton(x, p)[:16]).all()
    assert torch.isnan(sparse_gemv_reference(x, p)[:16]).all()


@triton.jit
def _round_kernel(v_ptr, out_ptr, like_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    v = tl.load(v_ptr + offs, mask=offs < n)
    tl.store(out_ptr + offs, round_nearest_even(v, like_ptr.dtype.element_ty), mask=offs < n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_kernel_rounding_matches_torch_bit_for_bit_nan_included(dtype):
    """The rounding the GEMV's epilogue and the rotation share: torch's ``.to`` for every bit pattern that matters
    (ties both ways, the largest finite values, infinities, signed zeros, NaNs with every payload: NVIDIA's
    canonical NaN 0x7FFFFFFF once rounded to −0.0 by the bf16 bits)."""
    bits = [0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000,
            0x00000000, 0x80000000, 0x00000001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0x7F800001, 0x477FF000]  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    rand = torch.randint(-(2**31), 2**31 - 1, (48,), generator=gen, dtype=torch.int64)
    v = torch.cat([torch.tensor(bits, dtype=torch.int64), rand]).to(torch.int32).view(torch.float32).to(DEV)
    out = torch.empty_like(v)
    _round_kernel[(1,)](v, out, torch.empty(1, dtype=dtype, device=DEV), v.numel(), BLOCK=64)
    want = v.to(dtype).float()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(out), nan), v[torch.isnan(out) != nan].view(torch.int32)
    assert torch.equal(out[~nan].view(torch.int32), want[~nan].view(torch.int32))


def test_split_k_is_deterministic_and_resets_its_counters():
    x, p = make(1000, [512], torch.float32, sparsity=0.5)
    cfg = tg.GemvConfig(16, 256, 8)
    first = tg.sparse_gemv_triton(x, p, cfg)
    for _ in range(3):
        assert torch.equal(tg.sparse_gemv_triton(x, p, cfg), first)
    assert int(counter_buffer(x.device, 2, "gemv").abs().sum()) == 0


@settings(max_examples=20, deadline=None)
@given(
    k=st.integers(1, 300),
    ns=st.lists(st.integers(1, 300), min_size=1, max_size=3),
    dtype=st.sampled_from(DTYPES),
    sparsity=st.floats(0, 1),
    shift=st.one_of(st.none(), st.floats(-2, 2)),
    quantize=st.sampled_from([None, "int8", "int8-sym"]),
    split=st.integers(1, 9),
    layout=st.sampled_from([None, 128, 256]),
    compact=st.booleans(),
    seed=st.integers(0, 2**16),
)
# found by hypothesis: bf16 x − μ must round to nearest-even in the kernel as in the reference (the CPU
# interpreter truncated it; W·x' + μ·ΣW then cancels an ulp of x' into a 4.6% error)
@example(
    k=1,
    ns=[1, 1],
    dtype=torch.bfloat16,
    sparsity=0.0,
    shift=0.9921875,
    quantize=None,
    split=1,
    layout=None,
    compact=False,
    seed=0,
)
@example(
    k=1,
    ns=[1, 1],
    dtype=torch.bfloat16,
    sparsity=0.0,
    shift=0.9921875,
    quantize="int8",
    split=1,
    layout=None,
    compact=True,
    seed=0,
)
def test_kernel_property(k, ns, dtype, sparsity, shift, quantize, split, layout, compact, seed):
    shifts = [shift] * len(ns) if shift is not None else None
    x, p = make(
        k, ns, dtype, sparsity=sparsity, shifts=shifts, bias=seed % 2 == 0, quantize=quantize, seed=seed, layout=layout
    )
    check(x, p, tg.GemvConfig(16, 128, split, compact=compact))


@settings(max_examples=50, deadline=None)
@given(
    k=st.integers(1, 100_000),
    n=st.integers(1, 200).map(lambda b: b * 256),
    wbytes=st.sampled_from([1, 2, 4]),
    sms=st.integers(1, 200),
)
def test_config_rule_covers_k_with_no_empty_split(k, n, wbytes, sms):
    cfg = tg.choose_config(k, n, wbytes, sms)
    assert n % cfg.block_n == 0 and cfg.split_k >= 1
    kp = cfg.k_per(k)
    assert kp % cfg.block_k == 0
    assert kp * cfg.split_k >= k > kp * (cfg.split_k - 1)  # every split has rows; together they cover K
    assert kp <= tg.MAX_COMPACT_ROWS or cfg.block_k > tg.MAX_COMPACT_ROWS
    assert tg.choose_config(k, n, wbytes, sms) == cfg
    if wbytes < 4:  # one wave: at most 2 programs per SM unless K alone needs more slices (or N more blocks)
        n_blocks = n // cfg.block_n
        assert n_blocks * cfg.split_k <= max(2 * sms, n_blocks * math.ceil(k / tg.MAX_COMPACT_ROWS))


def test_dispatch_picks_kernel_for_one_row_and_matches_reference():
    x, p = make(96, [64, 32], torch.float16, shifts=[0.2, 0.0], bias=True)
    assert K.kernel_for(x, p) == "triton"
    ys = K.sparse_gemv(x.view(1, 1, 96), p)
    assert [tuple(y.shape) for y in ys] == [(1, 1, 64), (1, 1, 32)]
    ref = sparse_gemv_reference(x, p)
    assert rel_err(torch.cat([y.reshape(-1) for y in ys]), torch.cat([ref[:64], ref[256:288]])) < TOL[x.dtype]
    xb = x.repeat(3, 1)  # several rows: dense route
    assert K.kernel_for(xb, p) == "torch"
    yb = K.sparse_gemv(xb, p)[0]
    assert rel_err(yb, sparse_gemv_reference(xb, p)[:, :64]) < TOL[x.dtype]


def test_without_triton_everything_falls_back_to_the_reference(monkeypatch):
    x, p = make(96, [64], torch.float32, shifts=[0.2], bias=True)
    monkeypatch.setattr(ops, "_tg", None)
    assert not K.triton_available(x.device)
    assert K.kernel_for(x, p) == "torch"
    assert torch.equal(K.sparse_gemv(x, p)[0], sparse_gemv_reference(x, p)[:64])


def test_custom_op_compiles_to_one_graph():
    x, p = make(64, [32], torch.float32, sparsity=0.5)
    f = torch.compile(lambda v: K.sparse_gemv(v, p)[0] * 2 + 1, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(x), K.sparse_gemv(x, p)[0] * 2 + 1)
    torch.library.opcheck(
        torch.ops.actsparse.sparse_gemv.default, (x, p.weight_t, p.threshold, None, None, None, None, None, [0, 32])
    )
    split = tg.launch_config(p, x.device).split_k
    torch.library.opcheck(
        torch.ops.actsparse.sparse_gemv_partials.default,
        (x, p.weight_t, p.threshold, None, None, None, None, None, [0, 32], split),
    )


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("split", [1, 5])
def test_partials_sum_to_the_reference_with_terms_added_once(quantize, split):
    x, p = make(300, [200, 56], torch.bfloat16, shifts=[0.3, -0.1], bias=True, quantize=quantize)
    cfg = tg.GemvConfig(16, 128, split)
    part = tg.sparse_gemv_triton(x, p, cfg, partials=True)
    assert part.shape == (split, p.padded_out) and part.dtype == torch.float32
    ref = sparse_gemv_reference(x, p)
    y = part.sum(0).to(x.dtype)
    for off, n in p.segments:
        assert rel_err(y[off : off + n], ref[off : off + n]) <= TOL[x.dtype]
    # the bias sits in row 0 only: without it the other rows are bit-identical, row 0 differs by it
    _, p2 = make(300, [200, 56], torch.bfloat16, shifts=[0.3, -0.1], bias=False, quantize=quantize)
    rows = tg.sparse_gemv_triton(x, p2, cfg, partials=True)
    assert torch.equal(rows[1:], part[1:])
    torch.testing.assert_close(part[0] - rows[0], p.bias, rtol=0, atol=1e-4)
    with pytest.raises(UsageError, match="float32"):
        tg.sparse_gemv_triton(x, p, cfg, partials=True, out=torch.empty(split, p.padded_out, dtype=x.dtype))


def test_consumer_reduction_matches_the_kernel_reduction_and_traces_as_the_partials_op():
    x, p = make(1000, [512, 256], torch.float16, shifts=[0.2, 0.0], bias=True)
    by_kernel = K.sparse_gemv(x, p)
    by_consumer = K.sparse_gemv(x, p, reduce="consumer")
    assert tg.launch_config(p, x.device).split_k > 1  # a real split-K: the partials are summed outside
    for a, b in zip(by_kernel, by_consumer):
        assert rel_err(a, b) <= TOL[x.dtype]

    def traced(reduce):
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        f = torch.compile(lambda v: K.sparse_gemv(v, p, reduce=reduce)[1] * 2, fullgraph=True, backend=backend)
        torch.testing.assert_close(f(x), by_consumer[1] * 2, rtol=TOL[x.dtype], atol=TOL[x.dtype])
        return {str(n.target).removesuffix(".default") for g in graphs for n in g.graph.nodes}

    consumer, kernel = traced("consumer"), traced("kernel")
    assert "actsparse.sparse_gemv_partials" in consumer and "actsparse.sparse_gemv" not in consumer
    assert "actsparse.sparse_gemv" in kernel and "actsparse.sparse_gemv_partials" not in kernel
    with pytest.raises(UsageError, match="reduce must be one of"):
        K.sparse_gemv(x, p, reduce="atomics")


def test_quantize_int8_error_bound_and_exact_grid():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 40, generator=g)
    for sym in (False, True):
        q, s, z = K.quantize_int8(w, symmetric=sym)
        assert q.dtype == torch.int8 and (z == 0).all() == sym
        deq = (q.float() - z[:, None]) * s[:, None]
        assert ((deq - w).abs() <= s[:, None] / 2 + 1e-6).all()
    grid = torch.randint(-127, 128, (4, 40), generator=g).float() * 0.01
    grid[:, 0], grid[:, 1] = 1.27, -1.27
    q, s, z = K.quantize_int8(grid, symmetric=True)
    torch.testing.assert_close((q.float() - z[:, None]) * s[:, None], grid)


def test_mask_input_matches_sparse_linear_rule():
    from actsparse.sparse_linear import sparsify_tensor

    x = torch.randn(1000, dtype=torch.float16)
    tau = torch.tensor(0.6)
    assert torch.equal(mask_input(x, tau).to(torch.float16), sparsify_tensor(x, tau))


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(weights=[torch.randn(4, 8), torch.randn(4, 9)]), "same in_features"),
        (dict(weights=[torch.randn(4, 8)] * 4), "1 to 3"),
        (dict(weights=[torch.randn(4, 8)], quantize="int4"), "quantize"),
        (dict(weights=[torch.randn(4, 8)], thresholds=[0.1, 0.2]), "one value per weight"),
        (dict(weights=[torch.randn(4, 8)], shifts=[float("nan")]), "finite"),
        (dict(weights=[torch.randn(4, 8).to(torch.int32)]), "float dtype"),
        (dict(weights=[torch.randn(4, 8)], layout_block=100), "layout_block"),
    ],
)
def test_pack_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        K.pack(bad.pop("weights"), **bad)


def test_sparse_gemv_rejects_bad_input():
    p = K.pack([torch.randn(4, 8)])
    with pytest.raises(ValueError, match="8"):
        K.sparse_gemv(torch.randn(7), p)
    with pytest.raises(TypeError, match="float16"):
        K.sparse_gemv(torch.ones(8, dtype=torch.int64), p)
    with pytest.raises(ValueError, match="out must be"):
        tg.sparse_gemv_triton(torch.randn(8), p, out=torch.empty(3))


def _sparse_tiny(dtype, hidden=64, inter=256):
    from helpers import make_tiny_llama

    from actsparse import sparsify_activations

    model = make_tiny_llama(hidden=hidden, inter=inter).to(DEV, dtype)
    g = torch.Generator().manual_seed(3)
    data = [torch.randint(0, 256, (2, 16), generator=g).to(DEV) for _ in range(2)]
    sparsify_activations(model, data, {".*(gate|up|down|o)_proj.*": 0.4, ".*(q|k|v)_proj.*": 0.3}, progress=False)
    return model


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_enable_kernels_decode_matches_masked_linear(dtype):
    from actsparse import SparseLinear

    model = _sparse_tiny(dtype)
    ids = torch.randint(0, 256, (1, 12), device=DEV)
    with torch.no_grad():
        out = model(ids[:, :11], use_cache=True)
        ref = _step(model, ids[:, 11:], out)
    names = K.enable_kernels(model)
    assert len(names) == 14  # 7 projections × 2 layers
    down = model.model.layers[0].mlp.down_proj  # out_features 64: packed copy; gate/up (256): shared views
    up, gate = model.model.layers[0].mlp.up_proj, model.model.layers[0].mlp.gate_proj
    assert up._packed is gate._packed  # one packed group, one launch
    storage = up._packed.weight_t.untyped_storage().data_ptr()
    assert up.weight.untyped_storage().data_ptr() == storage == gate.weight.untyped_storage().data_ptr()
    assert down._packed.weight_t.untyped_storage().data_ptr() != down.weight.untyped_storage().data_ptr()
    calls = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: calls.append(ops.kernel_for(i[0], m._packed)))
        for m in model.modules()
        if isinstance(m, SparseLinear)
    ]
    with torch.no_grad():
        out = model(ids[:, :11], use_cache=True)  # prefill: dense route
        assert set(calls) == {"torch"}
        calls.clear()
        got = _step(model, ids[:, 11:], out)
        assert set(calls) == {HALF_GEMV}
    for h in hooks:
        h.remove()
    assert rel_err(got, ref) < 2e-2
    # thresholds stay live: +inf everywhere leaves only what the bias-free layers give (zeros)
    with torch.no_grad():
        x = torch.randn(1, 1, 64, device=DEV, dtype=dtype)
        assert torch.count_nonzero(up(x)) > 0
        up.act_threshold.fill_(float("inf"))
        assert torch.count_nonzero(up(x)) == 0
    K.disable_kernels(model)
    assert up.weight.is_contiguous() and up._packed is None


def test_kernel_path_steps_aside_for_grad_and_edited_weights():
    model = _sparse_tiny(torch.float16)
    K.enable_kernels(model)
    up = model.model.layers[0].mlp.up_proj
    x = torch.randn(1, 1, 64, device=DEV, dtype=torch.float16)
    from actsparse.kernels.linear import kernel_forward

    with torch.no_grad():
        assert kernel_forward(up, x) is not None
        up.weight.mul_(2)  # edited in place after packing
        assert kernel_forward(up, x) is None
    assert kernel_forward(up, x) is None  # grad mode with trainable weights
    lin = up.to_linear()
    assert lin.weight.is_contiguous()


def test_enable_kernels_runs_shifted_layers_and_skips_scaled_or_topk_ones():
    from helpers import make_tiny_llama

    from actsparse import SparsityParams, apply_thresholds, sparse_layers

    torch.manual_seed(0)
    model = make_tiny_llama(seed=3).to(DEV, torch.float16)
    apply_thresholds(
        model,
        {
            "model.layers.0.mlp.up_proj": SparsityParams(0.3, shift=0.2),
            "model.layers.0.mlp.down_proj": SparsityParams(0.05, scale=torch.rand(128) + 0.5),
            "model.layers.1.mlp.gate_proj": SparsityParams(topk=32),
        },
    )
    x = torch.randn(1, 1, 64, device=DEV, dtype=torch.float16)
    up = sparse_layers(model)["model.layers.0.mlp.up_proj"]
    with torch.no_grad():
        ref = up(x)
        assert K.enable_kernels(model) == ["model.layers.0.mlp.up_proj"]
        calls = []
        h = up.register_forward_hook(lambda m, i, o: calls.append(ops.kernel_for(i[0], m._packed)))
        got = up(x)
        h.remove()
    assert calls == [HALF_GEMV]
    assert rel_err(got, ref) < 2e-2


@pytest.mark.parametrize("mode", ["int8_asym", "int8_sym"])
def test_enable_kernels_runs_torchao_int8_weights_from_their_own_codes(mode):
    pytest.importorskip("torchao", reason="torchao is not installed")
    from helpers import make_tiny_llama

    from actsparse import SparseLinear, sparsify_activations
    from actsparse.quant import compress_weights, dense_weight, int8_codes

    model = make_tiny_llama(hidden=64, inter=256).to(DEV, torch.bfloat16)
    compress_weights(model, mode)
    g = torch.Generator().manual_seed(3)
    data = [torch.randint(0, 256, (2, 16), generator=g).to(DEV) for _ in range(2)]
    sparsify_activations(model, data, {".*(gate|up|down)_proj.*": 0.5}, progress=False)
    ids = torch.randint(0, 256, (1, 12), device=DEV)
    with torch.no_grad():
        out = model(ids[:, :11], use_cache=True)
        ref = _step(model, ids[:, 11:], out)
    assert len(K.enable_kernels(model)) == 6
    up = model.model.layers[0].mlp.up_proj
    q, scale, zero = int8_codes(up.weight)
    assert up._packed is model.model.layers[0].mlp.gate_proj._packed  # gate/up: one launch
    off, n = up._packed.segments[up._kernel_group[1]]
    assert up._packed.quantized and torch.equal(up._packed.columns(off, off + n), q.t())  # torchao's codes, not ours
    assert torch.equal(up._packed.scale[off : off + n], scale) and (up._packed.zero is None) == (zero is None)
    calls = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: calls.append(ops.kernel_for(i[0], m._packed)))
        for m in model.modules()
        if isinstance(m, SparseLinear)
    ]
    with torch.no_grad():
        out = model(ids[:, :11], use_cache=True)
        calls.clear()
        got = _step(model, ids[:, 11:], out)
    for h in hooks:
        h.remove()
    assert set(calls) == {HALF_GEMV} and len(calls) == 6  # int8 codes run the CUDA kernel where it runs
    # end to end, the thresholds make the output jump where a layer's rounding moves an entry across one
    # (here the eager reference also rounds torchao's dequantized weights to bf16): a loose bound; the
    # per-layer check below is the exact one
    assert rel_err(got, ref) < 5e-2
    x = torch.randn(1, 1, 64, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        want = torch.nn.functional.linear(up.sparsify_input(x).float(), dense_weight(up.weight).float())
        assert rel_err(up(x), want) < TOL[torch.bfloat16]
    K.disable_kernels(model)
    assert up._packed is None and int8_codes(up.weight) is not None


def test_counters_are_not_first_allocated_inside_a_graph_capture(monkeypatch):
    """The zeroing of a buffer allocated during a capture would be recorded, not run: refused, naming the fix."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(UsageError, match="before capturing"):
        counter_buffer(torch.device("cuda", 0), 1 << 20, "test-capture")
    assert counter_buffer(torch.device("cpu"), 4, "test-capture").shape[0] >= 4  # (CPU: nothing is captured)


def test_an_outgrown_counter_buffer_stays_alive_for_graphs_that_captured_it():
    """A graph captured with the first buffer keeps its address: growing must not free it for reuse."""
    dev = torch.device("cpu")
    first = counter_buffer(dev, 8, "test-grow")
    alive = weakref.ref(first)
    del first
    bigger = counter_buffer(dev, 1 << 12, "test-grow")
    gc.collect()
    assert alive() is not None and alive() is not bigger and bigger.numel() >= 1 << 12
    assert counter_buffer(dev, 16, "test-grow") is bigger  # smaller asks reuse the grown buffer
