"""The decode attention kernel (actsparse/kernels/decode_attention.py) against its torch reference and SDPA.

CPU (the CI): the Triton kernel in Triton's interpreter on small shapes. GPU (``python -m pytest -q
tests/test_decode_attention.py`` on the GPU machine): the same cases compiled, plus real shapes and a
compiled, graph-captured call.
"""

import contextlib
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from actsparse.errors import UsageError
from actsparse.kernels import decode_attention as DA
from actsparse.kernels.workspace import counter_buffer

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _qkv(b, hq, hkv, length, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for h, n in ((hq, 1), (hkv, length), (hkv, length)))
    return q.to(DEV, dtype), k.to(DEV, dtype), v.to(DEV, dtype)


def _sdpa(q, k, v, mask, scale, math_only=False):
    """torch's own attention in fp32, the keys and values repeated per query group (``math_only``: torch's
    reference backend, the softmax as written)."""
    g = q.shape[1] // k.shape[1]
    kf, vf = (t.float().repeat_interleave(g, dim=1) for t in (k, v))
    m = mask if mask is None or mask.dtype == torch.bool else mask.float()
    with sdpa_kernel([SDPBackend.MATH]) if math_only else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q.float(), kf, vf, attn_mask=m, scale=scale)


def _masks(b, hq, length, dtype):
    prefix = torch.zeros(b, 1, 1, length, dtype=torch.bool)
    prefix[..., : length // 2 + 3] = True  # a static cache written up to here
    window = torch.zeros(b, 1, 1, length, dtype=torch.bool)
    window[..., length // 3 : length - 5] = True  # a sliding window: blocks dropped at both ends
    additive = torch.full((b, 1, 1, length), -math.inf)
    additive[..., 3 : length - 9] = torch.linspace(-2.0, 1.0, length - 12)
    per_head = torch.rand(b, hq, 1, length, generator=torch.Generator().manual_seed(5)) > 0.3
    per_head[..., 0] = True
    return {
        "none": None,
        "prefix": prefix.to(DEV),
        "window": window.to(DEV),
        "additive": additive.to(DEV, dtype),
        "per-head": per_head.to(DEV),
        "expanded": prefix.expand(b, hq, 1, length).to(DEV),  # stride 0 over heads
    }


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "b,hq,hkv,length,d",
    [(1, 4, 4, 200, 64), (1, 8, 2, 130, 128), (2, 6, 3, 70, 32), (1, 4, 1, 64, 16)],
    ids=["mha", "gqa4", "batch2-gqa2", "mqa-one-block"],
)
@pytest.mark.parametrize("one_launch", [None, True, False], ids=["rule", "one-launch", "combine-kernel"])
def test_kernel_matches_the_reference_and_sdpa(b, hq, hkv, length, d, dtype, one_launch, monkeypatch):
    monkeypatch.setattr(DA, "ONE_LAUNCH", one_launch)
    q, k, v = _qkv(b, hq, hkv, length, d, dtype)
    scale = d**-0.5
    for name, mask in _masks(b, hq, length, dtype).items():
        assert DA.decode_attention_supported(q, k, v, mask) is None, name
        out = DA.decode_attention(q, k, v, mask, scale)
        ref = DA.decode_attention_reference(q, k, v, mask, scale)
        assert out.shape == q.shape and out.dtype == dtype
        torch.testing.assert_close(ref.float(), _sdpa(q, k, v, mask, scale), rtol=TOL[dtype], atol=TOL[dtype])
        torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype], msg=name)


def test_the_last_program_combines_in_range_order_and_resets_its_counters(monkeypatch):
    """One launch gives the two-launch result bit for bit, call after call, and leaves its counters at zero."""
    b, hq, hkv, length, d = 2, 8, 2, 260, 32  # 5 blocks: several splits per key/value head
    q, k, v = _qkv(b, hq, hkv, length, d, torch.bfloat16, seed=7)
    mask = _masks(b, hq, length, torch.bfloat16)["window"]
    assert DA.split_count(b * hkv, length, 132)[0] > 1
    monkeypatch.setattr(DA, "ONE_LAUNCH", False)
    two = DA.decode_attention(q, k, v, mask, 0.3)
    monkeypatch.setattr(DA, "ONE_LAUNCH", True)
    for _ in range(3):
        assert torch.equal(DA.decode_attention(q, k, v, mask, 0.3), two)
        assert int(counter_buffer(q.device, b * hkv, "attention").abs().sum()) == 0


@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
def test_reading_every_block_gives_the_same_attention_on_a_finite_cache(hkv, monkeypatch):
    """SKIP_DROPPED_BLOCKS off (the experiment's knob): dropped blocks are read and weigh nothing."""
    q, k, v = _qkv(1, 4, hkv, 260, 32, torch.float16, seed=4)
    for name, mask in _masks(1, 4, 260, torch.float16).items():
        want = DA.decode_attention(q, k, v, mask, 0.2)
        monkeypatch.setattr(DA, "SKIP_DROPPED_BLOCKS", False)
        torch.testing.assert_close(DA.decode_attention(q, k, v, mask, 0.2), want, rtol=2e-3, atol=2e-3, msg=name)
        monkeypatch.setattr(DA, "SKIP_DROPPED_BLOCKS", True)


def test_blocks_the_mask_drops_whole_are_never_read():
    b, hq, hkv, length, d = 1, 4, 2, 5 * DA.BLOCK_N, 32
    q, k, v = _qkv(b, hq, hkv, length, d, torch.float16, seed=1)
    mask = torch.zeros(b, 1, 1, length, dtype=torch.bool, device=DEV)
    mask[..., DA.BLOCK_N + 7 : 3 * DA.BLOCK_N] = True  # blocks 0, 3 and 4 dropped whole, block 1 in part
    ref = DA.decode_attention_reference(q, k, v, mask, 0.2)
    kp, vp = k.clone(), v.clone()
    for blk in (0, 3, 4):
        kp[:, :, blk * DA.BLOCK_N : (blk + 1) * DA.BLOCK_N] = math.nan
        vp[:, :, blk * DA.BLOCK_N : (blk + 1) * DA.BLOCK_N] = math.nan
    torch.testing.assert_close(DA.decode_attention(q, kp, vp, mask, 0.2), ref, rtol=2e-3, atol=2e-3)
    vp[:, :, DA.BLOCK_N] = math.nan  # a dropped position inside a block that is read: 0 x NaN shows it
    assert DA.decode_attention(q, kp, vp, mask, 0.2).isnan().any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_float_mask_at_the_dtypes_minimum_weighs_splits_as_sdpa_does(dtype):
    """Rows whose additive mask is a large finite negative everywhere: softmax is a plain mean, across splits."""
    b, hq, hkv, length, d = 1, 4, 2, 200, 32  # 4 blocks, so several splits are combined
    q, k, v = _qkv(b, hq, hkv, length, d, dtype, seed=3)
    mask = torch.zeros(b, hq, 1, length, dtype=dtype)
    mask[:, 0] = torch.finfo(dtype).min  # head 0: every position at the minimum
    mask[:, 1, :, 50:] = torch.finfo(dtype).min  # head 1: the first 50 positions only
    mask = mask.to(DEV)
    assert DA.split_count(b * hkv, length, 132)[0] > 1
    out = DA.decode_attention(q, k, v, mask, d**-0.5)
    # torch's math backend: on CUDA the fp32 memory-efficient kernel outputs zeros for a row masked at bf16's
    # minimum everywhere (H100, torch 2.11: 0.15 off in head 0), where the softmax as written is the mean
    want = _sdpa(q, k, v, mask, d**-0.5, math_only=True)
    torch.testing.assert_close(out.float(), want, rtol=TOL[dtype], atol=TOL[dtype])


def test_a_query_with_every_position_dropped_gets_zeros():
    q, k, v = _qkv(1, 2, 2, 100, 16, torch.float16)
    mask = torch.zeros(1, 2, 1, 100, dtype=torch.bool, device=DEV)
    mask[:, 1, :, 10:20] = True  # head 0 sees nothing
    out = DA.decode_attention(q, k, v, mask, 0.25)
    assert out[:, 0].abs().max() == 0
    torch.testing.assert_close(out, DA.decode_attention_reference(q, k, v, mask, 0.25), rtol=2e-3, atol=2e-3)


def _rope_inputs(b, hq, hkv, length, d, dtype, seed=0):
    """A new token's q, k, v ([B, H, 1, D]), its rotary cos/sin ([B, 1, D]) and caches written with earlier keys."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, 1, d, generator=g).to(DEV, dtype) for h in (hq, hkv, hkv))
    angles = torch.rand(b, 1, d // 2, generator=g) * 40
    angles = torch.cat((angles, angles), dim=-1)  # transformers' layout: the frequencies twice
    cos, sin = angles.cos().to(DEV, dtype), angles.sin().to(DEV, dtype)
    kc, vc = (torch.randn(b, hkv, length, d, generator=g).to(DEV, dtype) for _ in range(2))
    return q, k, v, cos, sin, kc, vc


def test_rotary_reference_is_transformers_apply_rotary_pos_emb():
    for dtype in (torch.float16, torch.bfloat16):
        q, k, _, cos, sin, _, _ = _rope_inputs(2, 4, 2, 8, 64, dtype, seed=3)
        want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
        assert torch.equal(DA.rotary_reference(q, cos, sin), want_q)
        assert torch.equal(DA.rotary_reference(k, cos, sin), want_k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "b,hq,hkv,length,d",
    [(1, 4, 4, 260, 64), (1, 8, 2, 200, 128), (2, 6, 3, 70, 32)],
    ids=["mha", "gqa4", "batch2-gqa2"],
)
def test_the_rope_kernel_writes_the_rotated_key_and_value_and_attends_as_the_reference(b, hq, hkv, length, d, dtype):
    splits, per = DA.split_count(b * hkv, length, 132)
    span = per * DA.BLOCK_N
    for pos in sorted({0, span - 1, span, length // 2, length - 1}):  # first/last position of a split, middle, end
        q, k, v, cos, sin, kc, vc = _rope_inputs(b, hq, hkv, length, d, dtype, seed=pos)
        mask = torch.zeros(b, 1, 1, length, dtype=torch.bool, device=DEV)
        mask[..., : pos + 1] = True  # a static cache written up to the new token
        position = torch.tensor(pos, device=DEV)
        for m in (mask, None):
            want_k, want_v = kc.clone(), vc.clone()
            ref = DA.decode_attention_rope_reference(q, k, v, cos, sin, want_k, want_v, position, m, d**-0.5)
            got_k, got_v = kc.clone(), vc.clone()
            assert DA.decode_attention_rope_supported(q, k, v, cos, sin, got_k, got_v, position, m) is None
            out = DA.decode_attention_rope(q, k, v, cos, sin, got_k, got_v, position, m, d**-0.5)
            assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v), (pos, splits)  # bit for bit
            torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype], msg=f"{pos}")


def test_the_rope_kernel_writes_where_the_mask_drops_the_block_and_nothing_past_the_cache():
    q, k, v, cos, sin, kc, vc = _rope_inputs(1, 4, 2, 200, 32, torch.bfloat16, seed=9)
    pos = 150
    mask = torch.ones(1, 1, 1, 200, dtype=torch.bool, device=DEV)
    mask[..., pos - pos % DA.BLOCK_N :] = False  # the block holding the position is never read
    want_k, want_v, got_k, got_v = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    at = torch.tensor(pos, device=DEV)
    ref = DA.decode_attention_rope_reference(q, k, v, cos, sin, want_k, want_v, at, mask, 0.2)
    out = DA.decode_attention_rope(q, k, v, cos, sin, got_k, got_v, at, mask, 0.2)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[torch.bfloat16], atol=TOL[torch.bfloat16])
    for past in (200, 210, -1):  # (inside the last split's padded range, beyond it, before the cache)
        got_k, got_v = kc.clone(), vc.clone()
        DA.decode_attention_rope(q, k, v, cos, sin, got_k, got_v, torch.tensor(past, device=DEV), None, 0.2)
        assert torch.equal(got_k, kc) and torch.equal(got_v, vc), past


def test_what_the_rope_kernel_does_not_take_is_named():
    q, k, v, cos, sin, kc, vc = _rope_inputs(1, 4, 2, 40, 16, torch.float16)
    pos = torch.tensor(3, device=DEV)
    cases = {
        "one query token": (q.expand(1, 4, 2, 16), k, v, cos, sin, kc, vc, pos),
        "the new key and value as": (q, k.expand(1, 2, 2, 16), v, cos, sin, kc, vc, pos),
        "the new key and value in the query's dtype": (q, k.float(), v, cos, sin, kc, vc, pos),
        "cos as": (q, k, v, cos[..., :8], sin, kc, vc, pos),
        "sin in the query's dtype": (q, k, v, cos, sin.float(), kc, vc, pos),
        "0-d int64": (q, k, v, cos, sin, kc, vc, pos.view(1)),
        "an even head dim": tuple(t[..., :15] for t in (q, k, v, cos, sin, kc, vc)) + (pos,),
    }
    for words, args in cases.items():
        why = DA.decode_attention_rope_supported(*args, None)
        assert why is not None and words in why, (words, why)
        with pytest.raises(UsageError, match="decode_attention_rope"):
            DA.decode_attention_rope(*args, None, 0.25)


def test_splits_cover_the_cache_and_fill_the_gpu():
    for heads in (1, 8, 32, 64, 256):
        for length in (1, 63, 64, 65, 512, 2048, 4096, 32768):
            splits, per = DA.split_count(heads, length, 132)
            blocks = -(-length // DA.BLOCK_N)
            assert splits * per >= blocks and (splits - 1) * per < blocks  # every block once, no empty split
            assert splits <= DA.MAX_SPLITS  # the combine holds them all in registers
            if heads * blocks >= 264 and heads * DA.MAX_SPLITS >= 264:
                assert heads * splits >= 132  # at least one program per SM (about two)


def test_what_the_kernel_does_not_take_is_named():
    q, k, v = _qkv(1, 4, 2, 40, 16, torch.float16)
    cases = {
        "one query token": (q.expand(1, 4, 2, 16), k, v, None),
        "do not match": (q, k[:, :, :, :8], v[:, :, :, :8], None),
        "fp16/bf16": (q.float(), k.float(), v.float(), None),
        "mask": (q, k, v, torch.ones(1, 1, 1, 39, dtype=torch.bool, device=DEV)),
        "boolean or floating-point": (q, k, v, torch.ones(1, 1, 1, 40, dtype=torch.int64, device=DEV)),
        "broadcastable": (q, k, v, torch.ones(1, 3, 1, 40, dtype=torch.bool, device=DEV)),
    }
    for words, args in cases.items():
        why = DA.decode_attention_supported(*args)
        assert why is not None and words in why, (words, why)
        with pytest.raises(UsageError, match="decode_attention"):
            DA.decode_attention(*args, 0.25)


_COMPILE = """
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from actsparse.kernels import decode_attention as DA
from actsparse.kernels.workspace import counter_buffer
names = ["q_ptr", "k_ptr", "v_ptr", "m_ptr", "part_ptr", "ml_ptr", "out_ptr", "cnt_ptr", "kn_ptr", "vn_ptr",
         "cos_ptr", "sin_ptr", "pos_ptr", "sq_b", "sq_h", "sk_b", "sk_h", "sk_l", "sv_b", "sv_h", "sv_l", "sm_b",
         "sm_h", "sm_l", "skn_b", "skn_h", "svn_b", "svn_h", "sc_b", "L", "H_KV"]
types = ["*bf16"] * 3 + ["*u8", "*fp32", "*fp32", "*bf16", "*i32"] + ["*bf16"] * 4 + ["*i64"] + ["i32"] * 18
sig = {**dict(zip(names, types)), "scale": "fp32"}
for mask, g, d, one, skip, rope in ((0, 4, 128, True, True, False), (1, 4, 128, True, False, False),
                                    (2, 4, 128, False, True, False), (1, 64, 256, True, True, False),
                                    (1, 1, 128, True, True, True), (1, 4, 128, False, True, True)):
    c = dict(G=g, G_PAD=max(16, g), D=d, D_PAD=d, BLOCK_N=DA.BLOCK_N, PER_SPLIT=4, MASK=mask, DOT_UPCAST=False,
             COMBINE=one, S_PAD=DA.MAX_SPLITS, SKIP=skip, ROPE=rope)
    src = ASTSource(fn=DA._split_kernel, signature={**sig, **dict.fromkeys(c, "constexpr")}, constexprs=c)
    print("split", mask, compile(src, target=GPUTarget("cuda", 90, 32)).metadata.shared)
half = {n: ("*fp16" if t == "*bf16" else t) for n, t in sig.items()}  # the fp16 rotation: fused or as shipped
c = dict(G=4, G_PAD=16, D=128, D_PAD=128, BLOCK_N=DA.BLOCK_N, PER_SPLIT=4, MASK=1, DOT_UPCAST=False, COMBINE=True,
         S_PAD=DA.MAX_SPLITS, SKIP=True, ROPE=True)
src = ASTSource(fn=DA._split_kernel, signature={**half, **dict.fromkeys(c, "constexpr")}, constexprs=c)
ptx = [compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": f}).asm["ptx"]
       for f in (True, DA.fp_fusion(torch.float16, True))]
print("rope-fp16", *(p.count("fma.rn.f16") for p in ptx))
sig = {"part_ptr": "*fp32", "ml_ptr": "*fp32", "out_ptr": "*bf16", "HQ": "i32", "H_KV": "i32", "SPLITS": "i32"}
for d in (128, 256):
    c = dict(G=4, G_PAD=16, D=d, D_PAD=d, S_PAD=DA.MAX_SPLITS)
    src = ASTSource(fn=DA._combine_kernel, signature={**sig, **dict.fromkeys(c, "constexpr")}, constexprs=c)
    print("combine", compile(src, target=GPUTarget("cuda", 90, 32)).metadata.shared)
"""


def test_kernels_compile_for_hopper_without_a_gpu(tmp_path):
    """The interpreter runs Python, not the compiler: compile both kernels for sm_90 with Triton's own ptxas, in
    a process without TRITON_INTERPRET (which patches the language in-process) and with an empty kernel cache;
    the fp16 rotation as the library launches it has no ``fma.rn.f16`` (with fp fusion it has)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.split("\n")
    assert [ln.split()[0] for ln in lines if ln] == ["split"] * 6 + ["rope-fp16"] + ["combine"] * 2
    assert all(int(ln.split()[-1]) > 0 for ln in lines if ln.startswith("split"))  # shared memory for the dots
    fused, shipped = (int(v) for v in next(ln for ln in lines if ln.startswith("rope-fp16")).split()[1:])
    assert fused > 0 and shipped == 0, (fused, shipped)  # fp16 FMAs skip the rotation's rounding: none shipped


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.parametrize("hkv", [32, 8], ids=["llama2-7b", "llama3-8b"])
def test_real_shapes_on_the_gpu(hkv):
    q, k, v = _qkv(1, 32, hkv, 4096, 128, torch.bfloat16)
    for written in (1, 300, 4096):
        mask = torch.zeros(1, 1, 1, 4096, dtype=torch.bool, device="cuda")
        mask[..., :written] = True
        out = DA.decode_attention(q, k, v, mask, 128**-0.5)
        ref = DA.decode_attention_reference(q, k, v, mask, 128**-0.5)
        torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[torch.bfloat16], atol=TOL[torch.bfloat16])


@gpu
def test_compiled_and_graph_captured_call_reads_the_mask_live():
    q, k, v = _qkv(1, 8, 2, 1024, 128, torch.bfloat16)
    mask = torch.zeros(1, 1, 1, 1024, dtype=torch.bool, device="cuda")
    mask[..., :100] = True
    fn = torch.compile(lambda q, k, v, m: DA.decode_attention(q, k, v, m, 0.1), fullgraph=True)
    out = fn(q, k, v, mask)  # compile and warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(q, k, v, mask)
    for written in (100, 700, 1):
        mask.zero_()
        mask[..., :written] = True
        graph.replay()
        torch.testing.assert_close(out, DA.decode_attention_reference(q, k, v, mask, 0.1), rtol=1.6e-2, atol=1.6e-2)


@gpu
@pytest.mark.parametrize("hkv", [32, 8], ids=["llama2-7b", "llama3-8b"])
def test_the_rope_kernel_compiled_and_graph_captured_reads_the_position_live(hkv):
    q, k, v, cos, sin, kc, vc = _rope_inputs(1, 32, hkv, 4096, 128, torch.bfloat16)
    pos = torch.tensor(0, device="cuda")
    mask = torch.zeros(1, 1, 1, 4096, dtype=torch.bool, device="cuda")
    fn = torch.compile(lambda *a: DA.decode_attention_rope(*a, 128**-0.5), fullgraph=True)
    args = (q, k, v, cos, sin, kc, vc, pos, mask)
    out = fn(*args)  # compile and warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*args)
    for at in (5, 63, 64, 2000, 4095):
        pos.fill_(at)
        mask.zero_()
        mask[..., : at + 1] = True
        want_k, want_v = kc.clone(), vc.clone()
        ref = DA.decode_attention_rope_reference(q, k, v, cos, sin, want_k, want_v, pos, mask, 128**-0.5)
        graph.replay()
        assert torch.equal(kc, want_k) and torch.equal(vc, want_v), at
        torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[torch.bfloat16], atol=TOL[torch.bfloat16])
