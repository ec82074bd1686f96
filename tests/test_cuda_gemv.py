"""The CUDA C++ sparse GEMV (actsparse/kernels/cuda_gemv.py + csrc/sgemv.cu).

CPU part (the CI): the launch rule, the backend switch and its errors, and — where nvcc is installed — the
build itself (compiled for sm_90 without a GPU, cached, a failing build reported). GPU part (compute capability
≥ 9.0; the GPU machine: ``python -m pytest -q tests/test_cuda_gemv.py``): the kernel against the torch
reference over shapes, segments, shifts, biases, dtypes, every cluster size and tile, and through the
custom op compiled with ``fullgraph=True``.
"""

import math
from dataclasses import astuple

import pytest
import torch
from helpers import VOCAB, make_tiny_llama, random_norm_gains
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import actsparse as A
import actsparse.kernels as K
from actsparse.engine import Decoder, glu_fused, norms_fused
from actsparse.errors import UsageError
from actsparse.kernels import cuda_gemv as CG
from actsparse.kernels import ops
from actsparse.kernels.reference import mask_input, rms_norm, sparse_gemv_reference

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
gpu = pytest.mark.skipif(not HOPPER, reason="the CUDA kernel needs a GPU of compute capability >= 9.0")
TOL = {torch.float16: 2e-3, torch.bfloat16: 8e-3}


# ---- the launch rule -------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    k=st.integers(1, CG.MAX_K),
    n=st.integers(1, 400).map(lambda v: 64 * v),
    sms=st.sampled_from([16, 78, 114, 132, 148]),
)
def test_rule_fits_the_kernel_and_fills_the_gpu(k, n, sms):
    cfg = CG.choose_cuda_config(k, n, sms)
    assert cfg.block_n in CG.BLOCK_NS and n % cfg.block_n == 0 and cfg.block_n % cfg.cluster == 0
    assert cfg.cluster in (1, 2, 4, 8, 16) and math.ceil(k / cfg.cluster) <= CG.ROWS_PER_BLOCK
    smallest = min(c for c in (1, 2, 4, 8, 16) if math.ceil(k / c) <= CG.ROWS_PER_BLOCK)
    blocks = n // cfg.block_n * cfg.cluster
    if blocks < 1.9 * sms:  # too few blocks only where no configuration has more
        most = max(
            n // bn * c
            for c in (1, 2, 4, 8, 16)
            for bn in CG.BLOCK_NS
            if math.ceil(k / c) <= CG.ROWS_PER_BLOCK and n % bn == 0 and bn % c == 0
        )
        assert blocks == most
    else:  # enough blocks: the smallest cluster that gets there, and no wider tile would
        assert cfg.cluster >= smallest
        wider = [bn for bn in CG.BLOCK_NS if bn > cfg.block_n and n % bn == 0 and bn % cfg.cluster == 0]
        assert all(n // bn * cfg.cluster < 1.9 * sms for bn in wider)


def test_tuned_exceptions_are_configurations_the_kernel_takes():
    assert CG._TUNED  # measured exceptions exist (H100/H200) and each is a valid launch for its shape
    for (_, _, sms), shapes in CG._TUNED.items():
        for (k, n), (bn, cl) in shapes.items():
            assert bn in CG.BLOCK_NS and n % bn == 0 and bn % cl == 0 and math.ceil(k / cl) <= CG.ROWS_PER_BLOCK
            assert (bn, cl) != astuple(CG.choose_cuda_config(k, n, sms))[:2]  # an exception, not the rule again


@settings(max_examples=100, deadline=None, derandomize=True)
@given(k=st.integers(1, CG.MAX_K), n=st.integers(1, 400).map(lambda v: 64 * v), sms=st.sampled_from([78, 132]))
def test_tuning_candidates_are_launchable_and_include_the_rule(k, n, sms):
    cands = CG.candidate_configs(k, n, sms)
    assert CG.choose_cuda_config(k, n, sms) in cands and len(set(cands)) == len(cands)
    for c in cands:
        assert n % c.block_n == 0 and c.block_n % c.cluster == 0 and math.ceil(k / c.cluster) <= CG.ROWS_PER_BLOCK
    valid = [
        (bn, cl)
        for bn in CG.BLOCK_NS
        for cl in (1, 2, 4, 8, 16)
        if n % bn == 0 and bn % cl == 0 and math.ceil(k / cl) <= CG.ROWS_PER_BLOCK
    ]
    sized = [c for c in cands if 64 <= n // c.block_n * c.cluster <= 1100]
    if any(64 <= n // bn * cl <= 1100 for bn, cl in valid):  # every candidate but maybe the rule's is sized
        assert len(sized) >= len(cands) - 1
    else:  # none is: all of them
        assert {(c.block_n, c.cluster) for c in cands} == set(valid)


def test_tune_is_checked_and_a_no_op_without_the_cuda_kernel():
    model = make_tiny_llama()
    A.apply_thresholds(model, {"model.layers.0.mlp.up_proj": 0.1})
    with pytest.raises(UsageError, match="tune must be True or False"):
        K.enable_kernels(model, tune="yes")
    before = dict(CG._CONFIGS)
    K.enable_kernels(model, tune=True)  # a CPU model: nothing to time
    assert before == CG._CONFIGS


# ---- the tuning cache (CPU: the file; GPU: that tune_config takes a cached choice) ---------------------------


def _props(name="NVIDIA H200", sms=132):
    """What ``torch.cuda.get_device_properties`` reports, for the fields the cache key reads."""
    return type("Props", (), {"name": name, "major": 9, "minor": 0, "multi_processor_count": sms})()


def test_tune_cache_keys_tell_gpus_shapes_dtypes_and_sparsity_apart():
    _, p = _packed(4096, (1024, 1024))
    key = CG._tune_cache_key(_props(), p, torch.bfloat16, 0.5)
    assert CG._tune_cache_key(_props(), p, torch.bfloat16, 0.53) == key  # rounded to 0.1
    others = {
        CG._tune_cache_key(_props(), p, torch.bfloat16, 0.57),
        CG._tune_cache_key(_props(), p, torch.float16, 0.5),
        CG._tune_cache_key(_props("NVIDIA H100 80GB HBM3"), p, torch.bfloat16, 0.5),
        CG._tune_cache_key(_props(sms=114), p, torch.bfloat16, 0.5),
        CG._tune_cache_key(_props(), _packed(2048, (1024, 1024))[1], torch.bfloat16, 0.5),
        CG._tune_cache_key(_props(), _packed(4096, (1024, 1024), quantize="int8")[1], torch.bfloat16, 0.5),
    }
    assert key not in others and len(others) == 6
    assert CG._source_hash() in key  # a changed kernel source times again


def test_tune_cache_round_trip_merges_and_ignores_what_it_cannot_read(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path))
    path = CG.tune_cache_path()
    assert path.parent == tmp_path / "cuda" and CG.read_tune_cache() == {}  # none yet: empty, silently
    a, b = CG.CudaConfig(128, 2), CG.CudaConfig(256, 4)
    CG._store_tuned("k1", a, {a: 10.5, b: 12.0})
    CG._store_tuned("k2", b, {b: 7.25})  # a second shape (another process, say): both kept
    entries = CG.read_tune_cache()
    assert set(entries) == {"k1", "k2"} and entries["k1"]["config"] == [128, 2]
    assert CG._cached_choice(entries["k1"], [a, b]) == (a, {a: 10.5, b: 12.0})
    assert CG._cached_choice(entries["k1"], [b]) is None  # not a launch this shape takes: timed again
    for bad in ({"config": [96, 2], "us": {}}, {"config": "128/2"}, {"config": [128, 2, 1], "us": {}}, None):
        assert CG._cached_choice(bad, [a, b]) is None
    assert [f.name for f in path.parent.iterdir()] == ["tuned.json"]  # atomic: no temp file left
    for text in ("{not json", '{"format": 99, "entries": {}}', "[1, 2]"):
        path.write_text(text)
        with pytest.warns(UserWarning, match="ignoring the tuning cache"):
            assert CG.read_tune_cache() == {}
        CG._store_tuned("k3", a, {a: 1.0})  # rewritten whole, quietly (the read above warned)
        assert set(CG.read_tune_cache()) == {"k3"}


def test_a_tune_cache_that_cannot_be_written_only_warns(tmp_path, monkeypatch):
    (tmp_path / "cuda").write_text("a file where the cache folder goes")
    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path))
    with pytest.warns(UserWarning, match="was not cached"):
        CG._store_tuned("k", CG.CudaConfig(64, 1), {CG.CudaConfig(64, 1): 3.0})


def test_a_config_the_kernel_cannot_launch_is_refused():
    for bad in ((96, 2), (64, 3), (64, 0), (256, 32)):
        with pytest.raises(UsageError, match="block_n in"):
            CG.CudaConfig(*bad)


def test_rule_refuses_what_the_kernel_cannot_take():
    with pytest.raises(UsageError, match="K <= 32768"):
        CG.choose_cuda_config(CG.MAX_K + 1, 4096, 132)
    with pytest.raises(UsageError, match="multiple of 64"):
        CG.choose_cuda_config(4096, 96, 132)


# ---- the backend switch ----------------------------------------------------------------------------------


def _packed(k=96, ns=(64, 32), dtype=torch.bfloat16, device="cpu", shifts=None, bias=False, seed=0, quantize=None):
    """An input and its packed layers in the decoder's plain layout, thresholds at the median |x - μ|."""
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(n, k, generator=g).to(dtype).to(device) for n in ns]
    x = (torch.randn(k, generator=g) * 2).to(dtype)
    taus = [torch.quantile((x.float() - (shifts[i] if shifts else 0.0)).abs(), 0.5).item() for i in range(len(ns))]
    biases = [torch.randn(n, generator=g).to(device) for n in ns] if bias else None
    return x.to(device), K.pack(ws, taus, shifts=shifts, biases=biases, layout_block=None, quantize=quantize)


def test_the_reference_norm_is_transformers_llama_rmsnorm():
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.bfloat16, torch.float16):
        norm = LlamaRMSNorm(96, eps=1e-5).to(dtype)
        norm.weight.data = (1 + 0.2 * torch.randn(96, generator=g)).to(dtype)
        h = (torch.randn(2, 96, generator=g) * 3).to(dtype)
        with torch.no_grad():
            assert torch.equal(rms_norm(h, norm.weight, 1e-5), norm(h))


def test_the_reference_fusions_are_the_layers_they_stand_for():
    """norm=: the thresholded layers applied to the normalized stream; residual=: the stream plus their output,
    rounded to the dtype as ``residual + hidden_states`` rounds it."""
    g = torch.Generator().manual_seed(4)
    ws = [torch.randn(n, 96, generator=g).to(torch.bfloat16) for n in (64, 128)]
    h = (torch.randn(96, generator=g) * 3).to(torch.bfloat16)
    w = (1 + 0.2 * torch.randn(96, generator=g)).to(torch.bfloat16)
    xn = rms_norm(h, w, 1e-6)
    taus = [0.4, 0.9]
    p = K.pack(ws, taus, layout_block=None)
    got = sparse_gemv_reference(h, p, norm=(w, 1e-6))
    for (off, n), t, wi in zip(p.segments, taus, ws):
        layer = (mask_input(xn, torch.tensor(t)) @ wi.float().t()).to(torch.bfloat16)
        torch.testing.assert_close(got[off : off + n], layer)
    r = (torch.randn(p.padded_out, generator=g) * 4).to(torch.bfloat16)
    assert torch.equal(sparse_gemv_reference(xn, p, residual=r), r + sparse_gemv_reference(xn, p))


def test_fusion_arguments_are_refused_one_mistake_at_a_time():
    x, p = _packed(96, (64,))
    w = torch.ones(96, dtype=torch.bfloat16)
    cases = [
        (dict(residual=torch.zeros(64, dtype=torch.bfloat16)), r"residual must be a contiguous \[256\] torch.bfloat16"),
        (dict(residual=torch.zeros(256)), r"residual must be .*got \(256,\) torch.float32"),
        (dict(norm=(w, 1e-5), gate=x.clone()), "norm and gate are two ways"),
        (dict(norm=(torch.ones(95, dtype=torch.bfloat16), 1e-5)), r"norm's weight must be a contiguous \[96\]"),
        (dict(norm=(w.float(), 1e-5)), r"norm's weight must be .*torch.float32"),
        (dict(norm=(w, float("nan"))), "eps must be a finite number >= 0, got nan"),
        (dict(norm=(w, -1e-5)), "eps must be a finite number >= 0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UsageError, match=message):
            CG.sparse_gemv_cuda(x, p, **kwargs)
    with pytest.raises(UsageError, match="runs on CUDA devices, not cpu"):  # valid fusions: the CPU input stops it
        CG.sparse_gemv_cuda(x, p, norm=(w, 1e-5), residual=torch.zeros(256, dtype=torch.bfloat16))


def test_cpu_inputs_never_pick_the_cuda_kernel():
    x, p = _packed()
    assert not ops.cuda_kernel_available("cpu")
    assert "CUDA devices" in CG.unavailable_reason("cpu")
    for backend in ops.BACKENDS:
        p.backend = backend
        assert ops.kernel_for(x, p) in ("triton", "torch")
        if backend == "cuda":  # asked for explicitly: refused, not silently replaced
            with pytest.raises(UsageError, match="backend='cuda'.*input is on cpu"):
                K.sparse_gemv(x, p)
        else:
            torch.testing.assert_close(K.sparse_gemv(x, p)[0], sparse_gemv_reference(x, p)[:64])


def test_the_cuda_kernel_called_on_cpu_inputs_says_where_it_runs():
    x, p = _packed()
    with pytest.raises(UsageError, match="runs on CUDA devices, not cpu: K.sparse_gemv picks"):
        CG.sparse_gemv_cuda(x, p)


def test_without_cuda_nothing_asks_the_toolchain():
    if not torch.cuda.is_available():  # CPU-only torch: False, not an error from torch.cuda
        assert not ops.cuda_kernel_available("cuda")
    x, p = _packed()
    p.threshold = p.threshold.to("meta")  # a tensor on another device than the weights: not this kernel's
    assert not CG.supports(x, p)


def test_consumer_reduction_of_a_plain_layout_compiles_to_one_graph():
    x, p = _packed(ns=(256, 256), dtype=torch.float16)  # the layout enable_kernels packs (supports() is traced)
    f = torch.compile(lambda v: K.sparse_gemv(v, p, reduce="consumer"), fullgraph=True, backend="aot_eager")
    for a, b in zip(f(x), K.sparse_gemv(x, p)):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


def test_a_bad_backend_is_refused():
    x, p = _packed()
    p.backend = "cutlass"
    with pytest.raises(UsageError, match="auto, cuda, triton"):
        K.sparse_gemv(x, p)
    model = make_tiny_llama()
    A.apply_thresholds(model, {"model.layers.0.mlp.up_proj": 0.1})
    with pytest.raises(UsageError, match="backend must be one of"):
        K.enable_kernels(model, backend="cuBLAS")


@pytest.mark.skipif(HOPPER, reason="checks the refusal on a CPU model")
def test_backend_cuda_is_refused_where_it_cannot_run_and_the_model_is_left_alone():
    model = make_tiny_llama().to(torch.bfloat16)
    A.apply_thresholds(model, {"model.layers.0.mlp.up_proj": 0.1})
    K.enable_kernels(model, backend="triton")  # a plan exists: a refused call must not undo it
    before = K.kernel_routes(model)
    with pytest.raises(UsageError, match="backend='cuda'.*CUDA devices"):
        K.enable_kernels(model, backend="cuda")
    assert K.kernel_routes(model) == before


def test_supports_takes_only_what_the_kernel_computes():
    x, p = _packed()
    assert CG.supports(x, p)
    _, blocked = _packed()
    blocked.weight_t = blocked.weight_t.reshape(96, 2, 256).permute(1, 0, 2).contiguous()  # a blocked layout
    assert not CG.supports(x, blocked)
    assert not CG.supports(x.float(), p)  # activations of another dtype
    xq, q = _packed(dtype=torch.float32)
    assert not CG.supports(xq, q)  # fp32 weights
    xs, s = _packed(shifts=[0.3, 0.0])
    assert CG.supports(xs, s)
    s.wsum = None
    assert not CG.supports(xs, s)  # a shift needs Σ W
    for quantize in ("int8", "int8-sym"):
        xi, i8 = _packed(quantize=quantize)
        assert CG.supports(xi, i8)  # int8 codes with fp32 scales (and zero points)
        i8.scale = None
        assert not CG.supports(xi, i8)


# ---- the build (nvcc, no GPU needed) ---------------------------------------------------------------------

NVCC = CG._nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not installed")


@needs_nvcc
def test_build_compiles_caches_and_exports_the_launcher(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path))
    so = CG.build_library("sm_90")
    assert so.parent == tmp_path / "cuda" and so.name.startswith("sgemv-sm_90-") and so.stat().st_size > 0
    assert [f.name for f in so.parent.iterdir()] == [so.name]  # no temp file left behind
    mtime = so.stat().st_mtime_ns
    assert CG.build_library("sm_90") == so and so.stat().st_mtime_ns == mtime  # cached: not rebuilt
    with open(so, "rb") as f:
        assert b"actsparse_sgemv" in f.read()


def test_a_failing_build_names_the_error_and_leaves_no_file(tmp_path, monkeypatch):
    bin_dir = tmp_path / "cuda" / "bin"
    bin_dir.mkdir(parents=True)
    fake = bin_dir / "nvcc"
    fake.write_text(
        "#!/bin/sh\n[ \"$1\" = --version ] && echo 'fake nvcc' && exit 0\necho 'fatal: no such arch' >&2\nexit 2\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UsageError, match="(?s)building the CUDA sparse GEMV failed.*no such arch"):
        CG.build_library("sm_90")
    assert list((tmp_path / "cache" / "cuda").iterdir()) == []


# ---- the kernel on a GPU ---------------------------------------------------------------------------------


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check(x, p, config=None):
    ref = sparse_gemv_reference(x, p)
    out = torch.full((p.padded_out,), float("nan"), dtype=x.dtype, device=x.device)
    y = CG.sparse_gemv_cuda(x, p, config, out=out)
    for off, n in p.segments:
        assert not torch.isnan(y[off : off + n]).any(), "kernel left outputs unwritten"
        assert _rel(y[off : off + n], ref[off : off + n]) <= TOL[x.dtype], (off, n, config)
    return y


@gpu
@pytest.mark.parametrize("quantize", [None, "int8", "int8-sym"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "k,ns", [(96, (64, 32)), (4096, (4096, 1024, 1024)), (11008, (4096,)), (1000, (300,)), (4100, (640, 512))]
)
def test_kernel_matches_the_reference(dtype, k, ns, quantize):
    for shifts, bias in ((None, False), ([0.3, -0.2, 0.0][: len(ns)], True)):
        x, p = _packed(k, ns, dtype, "cuda", shifts=shifts, bias=bias, quantize=quantize)
        assert ops.kernel_for(x, p) == "cuda"
        _check(x, p)


@gpu
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_every_tile_and_cluster_size_agrees(quantize):
    x, p = _packed(3000, (512, 256), torch.bfloat16, "cuda", shifts=[0.1, 0.0], bias=True, quantize=quantize)
    for bn in CG.BLOCK_NS:
        for cl in (2, 4, 8, 16):
            if bn % cl == 0:
                for pdl in (True, False):
                    _check(x, p, CG.CudaConfig(bn, cl, pdl))


def _shifted(t, offset):
    """``t``'s values in a view starting ``offset`` elements into a larger buffer (not 16-byte aligned unless 0)."""
    buf = torch.zeros(t.numel() + 16, dtype=t.dtype, device=t.device)
    v = buf[offset : offset + t.numel()]
    v.copy_(t)
    return v


@gpu
@pytest.mark.parametrize("offset", [0, 1, 5])
def test_inputs_at_any_alignment_and_single_block_tiles(offset):
    """Each thread reads its 8 inputs in one 16-byte load only where the slice is aligned: a shifted input (and
    gate) takes the element-wise path, K = 1000 leaves partial vectors at the slices' ends, cluster 1 no DSMEM."""
    x, p = _packed(1000, (256, 128), torch.bfloat16, "cuda", shifts=[0.1, 0.0], bias=True)
    xs = _shifted(x, offset)
    assert (xs.data_ptr() % 16 == 0) == (offset == 0)
    for bn in CG.BLOCK_NS:
        for cl in (1, 2, 8):
            if bn % cl == 0:
                assert torch.equal(_check(xs, p, CG.CudaConfig(bn, cl)), _check(x, p, CG.CudaConfig(bn, cl)))
    gate = torch.randn(1000, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).cuda()
    want = CG.sparse_gemv_cuda(torch.nn.functional.silu(gate) * x, p)
    assert torch.equal(CG.sparse_gemv_cuda(xs, p, gate=_shifted(gate, offset)), want)


@gpu
@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,offset", [(4096, 0), (1000, 0), (4096, 3)])
def test_the_norm_formed_in_the_load_matches_the_reference(dtype, k, offset, quantize):
    """x is the residual stream; every block sums all K squares for rstd (in its own order: torch's rstd may
    differ in the last bit, so the comparison is to the tolerance) and normalizes its slice as it loads it."""
    h, p = _packed(k, (4096,) if k > 2048 else (320,), dtype, "cuda", shifts=[0.05], bias=True, quantize=quantize)
    w = (1 + 0.2 * torch.randn(k, generator=torch.Generator().manual_seed(6))).to(dtype).cuda()
    xn = rms_norm(h, w, 1e-5)
    p.threshold.fill_(torch.quantile((xn.float() - 0.05).abs(), 0.5).item())
    ref = sparse_gemv_reference(h, p, norm=(w, 1e-5))
    got = CG.sparse_gemv_cuda(_shifted(h, offset), p, norm=(_shifted(w, offset), 1e-5))
    assert _rel(got, ref) <= TOL[dtype]
    assert _rel(got, CG.sparse_gemv_cuda(xn, p)) <= TOL[dtype]  # the kernel on torch's normalized input


@gpu
@pytest.mark.parametrize("gated", [False, True])
def test_the_residual_is_added_as_the_output_is_written(gated):
    """y = T(residual + T(sum)): exactly torch's ``residual + hidden_states`` of the kernel's own output, also in
    place (``out`` is the residual) and with a gated input (the down projection)."""
    x, p = _packed(4096, (4096,), torch.bfloat16, "cuda", bias=True)
    gate = torch.randn(4096, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16).cuda() if gated else None
    r = (torch.randn(4096, generator=torch.Generator().manual_seed(8)) * 4).to(torch.bfloat16).cuda()
    plain = CG.sparse_gemv_cuda(x, p, gate=gate)
    got = CG.sparse_gemv_cuda(x, p, gate=gate, residual=r)
    assert torch.equal(got, r + plain)
    inplace = r.clone()
    CG.sparse_gemv_cuda(x, p, gate=gate, out=inplace, residual=inplace)
    assert torch.equal(inplace, got)
    xin = torch.nn.functional.silu(gate) * x if gated else x
    assert _rel(got, sparse_gemv_reference(xin, p, residual=r)) <= TOL[torch.bfloat16]


@gpu
def test_sparsity_extremes_nan_and_a_bf16_bias():
    x, p = _packed(2048, (256,), torch.bfloat16, "cuda")
    p.threshold.fill_(math.inf)  # nothing kept: y = 0
    assert torch.equal(CG.sparse_gemv_cuda(x, p)[:256], torch.zeros(256, dtype=x.dtype, device="cuda"))
    p.threshold.fill_(-math.inf)  # everything kept: the dense product
    _check(x, p)
    x[7] = float("nan")  # NaN is kept, as in the reference
    p.threshold.fill_(0.5)
    assert torch.isnan(CG.sparse_gemv_cuda(x, p)[:256]).all()
    x2, p2 = _packed(512, (256,), torch.bfloat16, "cuda")
    p2.bias = torch.randn(256, device="cuda").to(torch.bfloat16)  # a single layer keeps its own bias dtype
    _check(x2, p2)


@gpu
def test_the_op_dispatches_to_cuda_and_compiles_to_one_graph():
    x, p = _packed(512, (256, 256), torch.bfloat16, "cuda", bias=True)
    assert ops.kernel_for(x, p) == "cuda"
    p.backend = "triton"
    assert ops.kernel_for(x, p) == "triton"
    ref = K.sparse_gemv(x, p)
    p.backend = "auto"
    f = torch.compile(lambda v: K.sparse_gemv(v, p), fullgraph=True)
    for a, b in zip(f(x), ref):
        assert _rel(a, b) <= TOL[x.dtype]


@gpu
def test_decoder_with_the_cuda_kernel_equals_triton():
    model = make_tiny_llama(hidden=256, inter=512, layers=2).to("cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, VOCAB, (2, 32), generator=g).cuda() for _ in range(4)]
    A.sparsify_(model, A.SparsifyConfig({".*layers.*": 0.5}), data, progress=False)
    ids = torch.randint(0, VOCAB, (1, 9), generator=g).cuda()
    runs = {}
    for backend in ("triton", "cuda"):
        K.enable_kernels(model, backend=backend)
        runs[backend] = Decoder(model, 64, fallback=False).run(ids, 16, output_logits=True)
    torch.testing.assert_close(runs["cuda"].logits[0], runs["triton"].logits[0], rtol=3e-2, atol=3e-2)
    assert torch.equal(runs["cuda"].sequences[:, :12], runs["triton"].sequences[:, :12])


@gpu
@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [11008, 1000])
def test_gated_input_is_silu_gate_times_up_rounded_as_torch_rounds_it(dtype, k, quantize):
    """The in-load product gives the very input torch's ``act_fn(gate) * up`` gives: the same kept rows and
    values, hence the same outputs bit for bit as the kernel run on torch's product."""
    up, p = _packed(k, (4096,) if k > 2048 else (320,), dtype, "cuda", shifts=[0.05], bias=True, quantize=quantize)
    gate = (torch.randn(k, generator=torch.Generator().manual_seed(5)) * 3).to(dtype).cuda()
    x = torch.nn.functional.silu(gate) * up
    p.threshold.fill_(torch.quantile((x.float() - 0.05).abs(), 0.5).item())
    want = CG.sparse_gemv_cuda(x, p)
    got = CG.sparse_gemv_cuda(up, p, gate=gate)
    assert torch.equal(got, want)
    for a, b in zip(K.sparse_gemv(up, p, gate=gate), K.sparse_gemv(x, p)):
        assert torch.equal(a, b)
    with pytest.raises(UsageError, match="gate must match the input"):
        CG.sparse_gemv_cuda(up, p, gate=gate[:-1])


@gpu
def test_decoder_with_fused_glu_gives_the_unfused_tokens_and_logits():
    model = _sparse_cuda_llama(0.5)
    K.enable_kernels(model)
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4)).cuda()
    plain = Decoder(model, 64, glu=False, fallback=False).run(ids, 16, output_logits=True)
    assert glu_fused(model) == []
    fused = Decoder(model, 64, fallback=False).run(ids, 16, output_logits=True)  # glu: on with the CUDA graph
    assert glu_fused(model) == [f"model.layers.{i}.mlp" for i in range(len(model.model.layers))]
    # (the unfused step's SiLU is inductor's x * sigmoid(x), the kernel's eager x / (1 + exp(-x)): an fp32 ulp
    # apart, so an input can round to the neighbouring bf16 value)
    assert torch.equal(fused.sequences, plain.sequences)
    for a, b in zip(fused.logits, plain.logits):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


@gpu
def test_decoder_with_fused_norms_gives_the_unfused_tokens_and_logits():
    model = _sparse_cuda_llama(0.5)
    random_norm_gains(model)
    K.enable_kernels(model)
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4)).cuda()
    plain = Decoder(model, 64, norms=False, glu=False, fallback=False).run(ids, 16, output_logits=True)
    assert norms_fused(model) == []
    fused = Decoder(model, 64, fallback=False).run(ids, 16, output_logits=True)  # norms: on with the CUDA graph
    assert norms_fused(model) == [f"model.layers.{i}" for i in range(len(model.model.layers))]
    # (the kernel sums the mean square in its own order: rstd may differ from inductor's in the last fp32 bit)
    assert torch.equal(fused.sequences, plain.sequences)
    for a, b in zip(fused.logits, plain.logits):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def _sparse_cuda_llama(sparsity: float, int8: bool = False):
    """A tiny bf16 Llama on CUDA (int8 codes if asked), every layer sparsified at ``sparsity``."""
    model = make_tiny_llama(hidden=256, inter=512).to("cuda", torch.bfloat16)
    if int8:
        A.compress_weights(model, "int8_asym")
    g = torch.Generator().manual_seed(2)
    data = [torch.randint(0, VOCAB, (2, 16), generator=g).cuda() for _ in range(2)]
    A.sparsify_(model, A.SparsifyConfig({".*layers.*": sparsity}), data, progress=False)
    return model


@gpu
def test_the_cuda_kernel_has_no_break_even_floor():
    model = _sparse_cuda_llama(0.1)
    assert len(K.enable_kernels(model)) == 14  # 10% < KERNEL_MIN_SPARSITY, yet every layer runs the kernel
    assert K.enable_kernels(model, backend="triton") == []  # Triton's floor still applies to Triton
    assert len(K.enable_kernels(model, min_sparsity=0.05, backend="triton")) == 14


@gpu
def test_int8_layers_run_the_cuda_kernel_at_any_sparsity():
    pytest.importorskip("torchao")
    model = _sparse_cuda_llama(0.1, int8=True)
    assert len(K.enable_kernels(model, backend="cuda")) == 14  # 10%: int8 codes never take the dense route
    up = model.model.layers[0].mlp.up_proj
    assert ops.kernel_for(torch.zeros(1, 1, 256, device="cuda", dtype=torch.bfloat16), up._packed) == "cuda"


@gpu
def test_tuning_times_every_candidate_and_the_choice_runs_correctly():
    x, p = _packed(4096, (4096, 1024, 1024), torch.bfloat16, "cuda", shifts=[0.2, 0.0, -0.1], bias=True)
    key = CG._config_key(p, x.device)
    saved = CG._CONFIGS.pop(key, None)
    try:
        best, times = CG.tune_config(p, x.device, 0.5)
        assert set(times) == set(
            CG.candidate_configs(4096, p.padded_out, torch.cuda.get_device_properties(0).multi_processor_count)
        )
        assert all(math.isfinite(t) and t > 0 for t in times.values()) and times[best] == min(times.values())
        assert CG.cuda_config(p, x.device) == best  # the process's choice for this shape now
        _check(x, p)  # with it, the layer's own thresholds and shifts (the probe did not touch them)
        with pytest.raises(UsageError, match="sparsity must be in"):
            CG.tune_config(p, x.device, 1.5)
    finally:
        CG._CONFIGS.pop(key, None)
        if saved is not None:
            CG._CONFIGS[key] = saved


@gpu
def test_tuning_takes_a_cached_choice_instead_of_timing(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path))
    x, p = _packed(4096, (4096, 1024, 1024), torch.bfloat16, "cuda", bias=True)
    key = CG._config_key(p, x.device)
    saved = CG._CONFIGS.pop(key, None)
    try:
        best, times = CG.tune_config(p, x.device, 0.5)  # timed, then written to the cache
        assert set(CG.read_tune_cache()) == {CG._tune_cache_key(torch.cuda.get_device_properties(0), p, x.dtype, 0.5)}
        other = next(c for c in times if c != best)  # a valid choice the timing did not pick, written over it
        cache_key = next(iter(CG.read_tune_cache()))
        CG._store_tuned(cache_key, other, {other: 1.0})
        CG._CONFIGS.pop(key)
        assert CG.tune_config(p, x.device, 0.52) == (other, {other: 1.0})  # read, not re-timed
        assert CG.cuda_config(p, x.device) == other
        _check(x, p)  # and it computes the same function
        again, _ = CG.tune_config(p, x.device, 0.5, cache=False)  # timed again, the file left alone
        assert again in times and CG.read_tune_cache()[cache_key]["config"] == [other.block_n, other.cluster]
    finally:
        CG._CONFIGS.pop(key, None)
        if saved is not None:
            CG._CONFIGS[key] = saved


@gpu
def test_enable_kernels_tune_sets_each_shapes_config_and_decodes_the_same():
    model = _sparse_cuda_llama(0.5)
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(3)).cuda()
    K.enable_kernels(model)
    ref = A.Decoder(model, 64, fallback=False).run(ids, 8, output_logits=True)
    CG._CONFIGS.clear()
    K.enable_kernels(model, tune=True)
    shapes = {(u._packed.in_features, u._packed.padded_out) for u in model.modules() if getattr(u, "_packed", None)}
    assert {key[:2] for key in CG._CONFIGS} >= shapes  # every packed shape was timed
    got = A.Decoder(model, 64, fallback=False).run(ids, 8, output_logits=True)
    torch.testing.assert_close(got.logits[0], ref.logits[0], rtol=3e-2, atol=3e-2)
    CG._CONFIGS.clear()
