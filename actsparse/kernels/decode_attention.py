"""Attention for one query token over a static KV cache, reading only the cache blocks the mask lets through.

A static cache holds ``max_seq_len`` positions, and at decode time the attention mask lets through only the
ones written so far. ``F.scaled_dot_product_attention`` with that mask reads the whole cache every step, and
for one query token it runs one program per head (32 on Llama-2-7B), so it is neither bandwidth- nor
occupancy-efficient: the longer the cache, the more of the step goes to attention, whatever the prompt.

:func:`decode_attention` splits every key/value head's positions into ``splits`` ranges (enough programs to
fill the GPU), and each program walks its range in blocks of ``BLOCK_N`` positions: it reads the mask for the
block first and **skips the block** (no key or value read) when the mask drops all of it; otherwise the
scores of the head's query group (GQA: the query heads that share this key/value head, one tensor-core
product), an online softmax in fp32, and the weighted values (keys and values of a block are read together:
one memory latency per block). The ranges are combined by their log-sum-exp: for one query head per key/value head
(MHA) **in the same launch** (every program stores its partial output and bumps a counter per head, and the
program that arrives last combines that head's ranges in range order: deterministic; it resets the counter
for the next call); for grouped heads by a second kernel, one program per query head (a last arriver would
combine its group's heads one after another: slower, see :data:`ONE_LAUNCH`). Any mask works (padding,
sliding windows, a prefix): skipping is per block and exact.

Semantics: those of ``scaled_dot_product_attention(q, k, v, attn_mask, scale=scale, enable_gqa=True)`` for a
``[B, Hq, 1, D]`` query, ``[B, Hkv, L, D]`` keys and values (``Hq`` a multiple of ``Hkv``) and a boolean
(True = attend) or additive float mask broadcastable to ``[B, Hq, 1, L]``: scores ``q·k`` with fp32
accumulation times ``scale``, plus the mask, softmax in fp32, fp32 accumulation of the weighted values, output
in the query dtype; a query whose mask drops every position gets zeros. :func:`decode_attention_reference` is
that definition in torch. The kernel rounds the probabilities to the value dtype for the tensor-core product
(as flash attention does), a difference within the dtype's rounding; the tests compare it with the reference
on the CPU under ``TRITON_INTERPRET=1`` and on the GPU.

:func:`decode_attention_rope` is the same attention for a decode step taken from the new token's projections:
the split kernel rotates the query and the new key itself (transformers' ``rotate_half`` convention, each
product and the sum rounded to the dtype as torch rounds them: :func:`rotary_reference`), and the program whose
range holds the write position stores the rotated key and the value into the caches and uses them in its block
(no other program reads that position), so the rotary and cache-write kernels before the attention are gone.
Its op, ``actsparse::decode_attention_rope``, mutates the two caches (inductor calls it on them in place).

The op ``actsparse::decode_attention`` is registered with ``torch.library.custom_op`` (and a fake kernel),
so ``torch.compile`` keeps it as one node and CUDA graphs capture it. It runs on CUDA fp16/bf16 tensors (or
anywhere under the interpreter); :func:`decode_attention_supported` says whether a call qualifies.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from ..errors import UsageError
from .workspace import counter_buffer

try:  # Triton is optional: CPU-only installs never call the kernel (decode_attention_supported says no)
    import triton
    import triton.language as tl

    from .triton_round import round_nearest_even
except Exception:  # pragma: no cover - depends on the environment
    triton = None

__all__ = [
    "decode_attention",
    "decode_attention_reference",
    "decode_attention_rope",
    "decode_attention_rope_reference",
    "decode_attention_rope_supported",
    "rotary_reference",
    "decode_attention_supported",
    "decode_attention_available",
    "split_count",
]

BLOCK_N = 64  # cache positions per block: the unit the mask test skips
MAX_SPLITS = 64
PROGRAMS_PER_SM = 2  # the split count's aim (split_count)
NUM_WARPS = 4  # of the split kernel (benchmarks/exp_attention.py times these settings)
# False: every block is read, its loads not waiting for its mask (one memory latency less per block, the unwritten
# positions' bytes more); only for caches whose dropped positions hold finite values (a static cache: zeros)
SKIP_DROPPED_BLOCKS = True
# The last program of each key/value head combines its ranges (True), a combine kernel does (False), or the first
# for MHA and the second for grouped heads (None). H100, bench_attention.py: MHA 6.34 vs 6.64 us (512 positions,
# 256 written), a tie at 2048; Llama-3's 4 query heads per KV head 7.61 vs 5.91 and 15.44 vs 6.81 us.
ONE_LAUNCH: bool | None = None
_DTYPES = (torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``; as ``triton_gemv``'s,
    which this module does not import: that import changes what Triton's compiler sees in the interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def decode_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """The definition: ``[B, Hq, 1, D]`` out for one query token (fp32 arithmetic, output in ``q``'s dtype)."""
    b, hq, _, d = q.shape
    g = hq // k.shape[1]
    kf = k.float().repeat_interleave(g, dim=1)
    vf = v.float().repeat_interleave(g, dim=1)
    s = (q.float() @ kf.transpose(-1, -2)) * scale  # [B, Hq, 1, L]
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.float()
    dropped = torch.isneginf(s).all(-1, keepdim=True)  # a query with every position dropped: zeros
    p = torch.softmax(s.masked_fill(dropped, 0.0), dim=-1).masked_fill(dropped, 0.0)
    return (p @ vf).to(q.dtype)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotary embedding of ``x`` ``[B, H, 1, D]`` with ``cos``/``sin`` ``[B, 1, D]`` (one position):
    ``x * cos + rotate_half(x) * sin``, ``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])``, each product and
    the sum rounded to ``x``'s dtype as torch rounds them (Llama's ``apply_rotary_pos_emb``)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * c) + (rotated * s)


def decode_attention_rope_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, position: torch.Tensor, mask: torch.Tensor | None, scale: float,
) -> torch.Tensor:  # fmt: skip
    """The definition of :func:`decode_attention_rope`: the new token's keys (rotated) and values written into the
    caches at ``position``, then the attention of its rotated query (:func:`decode_attention_reference`)."""
    at = position.reshape(1)
    k_cache.index_copy_(2, at, rotary_reference(k, cos, sin))
    v_cache.index_copy_(2, at, v)
    return decode_attention_reference(rotary_reference(q, cos, sin), k_cache, v_cache, mask, scale)


def fp_fusion(dtype: torch.dtype, rope: bool) -> bool:
    """Whether the split kernel is compiled with fp fusion (Triton's default). Off for the fp16 rotation only: it
    rounds each product and the sum to fp16 as torch does, and with fusion LLVM narrows them to half arithmetic
    and contracts them into one ``fma.rn.f16`` (seen in the sm_90 PTX), skipping the product's rounding; the fp16
    rope tests failed on an H100 with it. bf16 is rounded by its bits, which nothing contracts."""
    return not (rope and dtype == torch.float16)


def decode_attention_available(device: torch.device | str) -> bool:
    """Whether the kernel can run on ``device`` at all (CUDA with Triton, or any device in the interpreter)."""
    return triton is not None and (torch.device(device).type == "cuda" or interpreting())


def decode_attention_supported(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> str | None:
    """None when :func:`decode_attention` takes these tensors, else why not (the caller falls back)."""
    if triton is None:
        return "Triton is not installed"
    if not (q.is_cuda or interpreting()):  # (decode_attention_available, without a device object to trace)
        return f"the kernel runs on CUDA devices, not {q.device}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[2] != 1:
        return f"one query token [B, H, 1, D] with [B, H_kv, L, D] keys and values, got {tuple(q.shape)}"
    b, hq, _, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or hq % k.shape[1]:
        return f"keys {tuple(k.shape)} and values {tuple(v.shape)} do not match the query {tuple(q.shape)}"
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"fp16/bf16 query, keys and values of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
    if d > _MAX_HEAD_DIM or hq // k.shape[1] > 64:
        return f"head dim <= {_MAX_HEAD_DIM} and at most 64 query heads per key/value head"
    if k.stride(-1) != 1 or v.stride(-1) != 1 or q.stride(-1) != 1:
        return "the head dim must be contiguous"
    if k.device != q.device or v.device != q.device:
        return f"keys and values on the query's device ({q.device}), got {k.device} and {v.device}"
    if mask is not None:
        if mask.dim() != 4 or mask.shape[-1] != k.shape[2] or mask.shape[2] != 1:
            return f"a [B, 1|H, 1, L] mask, got {tuple(mask.shape)} for L = {k.shape[2]}"
        if mask.shape[0] not in (1, b) or mask.shape[1] not in (1, hq) or mask.device != q.device:
            return f"a mask broadcastable to [{b}, {hq}, 1, L] on {q.device}, got {tuple(mask.shape)}"
        if mask.dtype != torch.bool and not mask.is_floating_point():
            return f"a boolean or floating-point mask, got {mask.dtype}"
    return None


def decode_attention_rope_supported(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, position: torch.Tensor, mask: torch.Tensor | None,
) -> str | None:  # fmt: skip
    """None when :func:`decode_attention_rope` takes these tensors, else why not (the caller falls back)."""
    why = decode_attention_supported(q, k_cache, v_cache, mask)
    if why is not None:
        return why
    b, hkv, d = k_cache.shape[0], k_cache.shape[1], q.shape[3]
    if tuple(k.shape) != (b, hkv, 1, d) or tuple(v.shape) != (b, hkv, 1, d):
        return f"the new key and value as [{b}, {hkv}, 1, {d}], got {tuple(k.shape)} and {tuple(v.shape)}"
    if k.dtype != q.dtype or v.dtype != q.dtype or k.stride(-1) != 1 or v.stride(-1) != 1:
        return "the new key and value in the query's dtype, the head dim contiguous"
    if d % 2:
        return f"an even head dim for the rotary embedding, got {d}"
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, b) or t.shape[1] != 1 or t.shape[2] != d:
            return f"{name} as [{b} or 1, 1, {d}] (one position), got {tuple(t.shape)}"
        if t.dtype != q.dtype or t.stride(-1) != 1 or t.device != q.device:
            return f"{name} in the query's dtype on its device, the head dim contiguous"
    if position.dim() != 0 or position.dtype != torch.long or position.device != q.device:
        return "the write position as a 0-d int64 tensor on the query's device"
    if k.device != q.device or v.device != q.device:
        return f"the new key and value on the query's device ({q.device})"
    return None


def split_count(batch_kv_heads: int, length: int, sm_count: int) -> tuple[int, int]:
    """``(splits, blocks per split)``: enough programs for about :data:`PROGRAMS_PER_SM` per SM, each at least
    one block, at most :data:`MAX_SPLITS` (the combine holds every split's partial output in registers)."""
    blocks = max(1, -(-length // BLOCK_N))
    want = max(1, min(blocks, MAX_SPLITS, -(-PROGRAMS_PER_SM * sm_count // max(batch_kv_heads, 1))))
    per = -(-blocks // want)
    return -(-blocks // per), per


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """``[B, Hq, 1, D]`` attention of one query token (module docstring); raises where not supported."""
    why = decode_attention_supported(q, k, v, mask)
    if why is not None:
        raise UsageError(f"decode_attention: {why}")
    return torch.ops.actsparse.decode_attention(q, k, v, mask, float(scale))


def decode_attention_rope(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, position: torch.Tensor, mask: torch.Tensor | None, scale: float,
) -> torch.Tensor:  # fmt: skip
    """One decode step's attention from the new token's projections (:func:`decode_attention_rope_reference`):
    the kernel rotates ``q`` and ``k``, writes the rotated key and ``v`` into the caches at ``position`` and
    attends over them in one launch (no rotary or cache-write kernels before it); raises where not supported. A
    position outside the caches writes nothing (the caller keeps it inside: the Decoder's length check)."""
    why = decode_attention_rope_supported(q, k, v, cos, sin, k_cache, v_cache, position, mask)
    if why is not None:
        raise UsageError(f"decode_attention_rope: {why}")
    return torch.ops.actsparse.decode_attention_rope(q, k, v, cos, sin, k_cache, v_cache, position, mask, float(scale))


@torch.library.custom_op("actsparse::decode_attention_rope", mutates_args=("k_cache", "v_cache"))
def _decode_attention_rope_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, position: torch.Tensor, mask: torch.Tensor | None, scale: float,
) -> torch.Tensor:  # fmt: skip
    return _launch(q, k_cache, v_cache, mask, scale, (k, v, cos, sin, position))


@_decode_attention_rope_op.register_fake
def _(q, k, v, cos, sin, k_cache, v_cache, position, mask, scale):
    return q.new_empty(q.shape)


@torch.library.custom_op("actsparse::decode_attention", mutates_args=())
def _decode_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    return _launch(q, k, v, mask, scale)


@_decode_attention_op.register_fake
def _(q, k, v, mask, scale):
    return q.new_empty(q.shape)


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    new: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """The kernels over the caches ``k``, ``v``; ``new`` = (key, value, cos, sin, position): the new token's,
    rotated (with ``q``) and written by the split kernel (:func:`decode_attention_rope`)."""
    b, hq, _, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    g = hq // hkv
    g_pad = max(16, triton.next_power_of_2(g))
    d_pad = max(16, triton.next_power_of_2(d))
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
    splits, per = split_count(b * hkv, length, sms)
    part = torch.empty(b * hkv, splits, g_pad, d_pad, dtype=torch.float32, device=q.device)
    ml = torch.empty(b * hkv, splits, 2, g_pad, dtype=torch.float32, device=q.device)  # each split's max and sum
    out = torch.empty(b, hq, 1, d, dtype=q.dtype, device=q.device)
    one = splits == 1 or (g == 1 if ONE_LAUNCH is None else ONE_LAUNCH)
    # (with one split the program writes the output itself: ml stands in as an unused pointer)
    cnt = counter_buffer(q.device, b * hkv, "attention") if one and splits > 1 else ml
    if mask is None:
        m, mode, sm = q, 0, (0, 0, 0)  # (an unused pointer)
    else:
        m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        mode = 1 if mask.dtype == torch.bool else 2
        sm = (0 if mask.shape[0] == 1 else mask.stride(0), 0 if mask.shape[1] == 1 else mask.stride(1), mask.stride(3))
    s_pad = max(2, triton.next_power_of_2(splits))
    if new is None:
        kn, vn, cos, sin, pos, sn, sc = q, q, q, q, q, (0, 0, 0, 0), 0  # (unused pointers)
    else:
        kn, vn, cos, sin, pos = new
        sn = (kn.stride(0), kn.stride(1), vn.stride(0), vn.stride(1))
        cos, sin = (t.expand(b, 1, d).contiguous() for t in (cos, sin))  # (one batch stride for both: d)
        sc = d
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():  # Triton launches on the current one
        _split_kernel[(b * hkv, splits)](
            q, k, v, m, part, ml, out, cnt,
            kn, vn, cos, sin, pos,
            q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            sm[0], sm[1], sm[2],
            sn[0], sn[1], sn[2], sn[3], sc,
            length, hkv, scale,
            G=g, G_PAD=g_pad, D=d, D_PAD=d_pad, BLOCK_N=BLOCK_N, PER_SPLIT=per, MASK=mode,
            DOT_UPCAST=interpreting() and q.dtype == torch.bfloat16, COMBINE=one, S_PAD=s_pad,
            SKIP=SKIP_DROPPED_BLOCKS, ROPE=new is not None, num_warps=NUM_WARPS,
            enable_fp_fusion=fp_fusion(q.dtype, new is not None),
        )  # fmt: skip
        if not one:
            _combine_kernel[(b * hq,)](part, ml, out, hq, hkv, splits, G=g, G_PAD=g_pad, D=d, D_PAD=d_pad, S_PAD=s_pad)
    return out


if triton is not None:

    @triton.jit
    def _split_kernel(
        q_ptr, k_ptr, v_ptr, m_ptr, part_ptr, ml_ptr, out_ptr, cnt_ptr,
        kn_ptr, vn_ptr, cos_ptr, sin_ptr, pos_ptr,
        sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b, sm_h, sm_l,
        skn_b, skn_h, svn_b, svn_h, sc_b,
        L, H_KV, scale,
        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr, PER_SPLIT: tl.constexpr, MASK: tl.constexpr, DOT_UPCAST: tl.constexpr,
        COMBINE: tl.constexpr, S_PAD: tl.constexpr, SKIP: tl.constexpr, ROPE: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(0).to(tl.int64)  # int64 offsets: a cache of >= 2**31 elements must not wrap
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        b = bh // H_KV
        h = bh % H_KV
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D_PAD)
        gq = g < G
        dm = d < D
        qh = h * G + g  # the query heads that read this key/value head
        qp = q_ptr + b * sq_b + qh[:, None] * sq_h
        q = tl.load(qp + d[None, :], mask=gq[:, None] & dm[None, :], other=0.0)
        if ROPE:  # the new token's query and key rotated here, its key and value written at pos (by one program)
            half: tl.constexpr = D // 2
            partner = tl.where(d < half, d + half, d - half)  # rotate_half: -x[d + D/2] below D/2, x[d - D/2] above
            sign = tl.where(d < half, -1.0, 1.0)
            cos = tl.load(cos_ptr + b * sc_b + d, mask=dm, other=0.0)
            sin = tl.load(sin_ptr + b * sc_b + d, mask=dm, other=0.0)
            qr = tl.load(qp + partner[None, :], mask=gq[:, None] & dm[None, :], other=0.0)
            q = _rotate(q, qr, sign[None, :], cos[None, :], sin[None, :])
            knp = kn_ptr + b * skn_b + h * skn_h
            kn = _rotate(
                tl.load(knp + d, mask=dm, other=0.0), tl.load(knp + partner, mask=dm, other=0.0), sign, cos, sin
            )
            vn = tl.load(vn_ptr + b * svn_b + h * svn_h + d, mask=dm, other=0.0)
            pos = tl.load(pos_ptr)
            # the program whose range holds the position writes it (none for a position past the cache)
            if (pos // (PER_SPLIT * BLOCK_N) == split) & (pos >= 0) & (pos < L):
                tl.store(k_ptr + b * sk_b + h * sk_h + pos * sk_l + d, kn, mask=dm)
                tl.store(v_ptr + b * sv_b + h * sv_h + pos * sv_l + d, vn, mask=dm)
        else:
            kn = tl.zeros([D_PAD], q.dtype)
            vn = kn
            pos = -1
        if DOT_UPCAST:  # Triton's CPU interpreter multiplies bf16 as raw bits: give it fp32
            q = q.to(tl.float32)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        for j in range(PER_SPLIT):
            n = (split * PER_SPLIT + j) * BLOCK_N + tl.arange(0, BLOCK_N)
            inb = n < L
            if MASK == 0:
                keep = gq[:, None] & inb[None, :]
                bias = tl.zeros([G_PAD, BLOCK_N], tl.float32)
            else:
                mp = m_ptr + b * sm_b + qh[:, None] * sm_h + n[None, :] * sm_l
                mv = tl.load(mp, mask=gq[:, None] & inb[None, :], other=0)
                if MASK == 1:
                    keep = (mv != 0) & gq[:, None] & inb[None, :]
                    bias = tl.zeros([G_PAD, BLOCK_N], tl.float32)
                else:
                    bias = mv.to(tl.float32)
                    keep = (bias != float("-inf")) & gq[:, None] & inb[None, :]
            kp = k_ptr + b * sk_b + h * sk_h + n[:, None] * sk_l + d[None, :]
            vp = v_ptr + b * sv_b + h * sv_h + n[:, None] * sv_l + d[None, :]
            if SKIP:
                if tl.max(keep.to(tl.int32)) > 0:  # a block the mask drops whole is never read
                    m_i, l_i, acc = _attend_block(
                        q, kp, vp, inb, dm, keep, bias, scale, m_i, l_i, acc, n, pos, kn, vn, DOT_UPCAST, ROPE
                    )
            else:  # every block read, with no wait for its mask (the keys' and values' loads need not follow it)
                m_i, l_i, acc = _attend_block(
                    q, kp, vp, inb, dm, keep, bias, scale, m_i, l_i, acc, n, pos, kn, vn, DOT_UPCAST, ROPE
                )
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        if COMBINE and n_splits == 1:  # the whole range in this program: the output directly
            out_rows = b * H_KV * G + qh
            tl.store(
                out_ptr + out_rows[:, None] * D + d[None, :],
                o.to(out_ptr.dtype.element_ty),
                mask=gq[:, None] & dm[None, :],
            )
        else:
            base = bh * n_splits + split
            tl.store(part_ptr + (base * G_PAD + g[:, None]) * D_PAD + d[None, :], o, mask=gq[:, None])  # (real rows)
            # the max and the sum, not m + log(l): a finite mask value near fp32's minimum would absorb log(l)
            tl.store(ml_ptr + base * 2 * G_PAD + g, m_i, mask=gq)
            tl.store(ml_ptr + (base * 2 + 1) * G_PAD + g, l_i, mask=gq)
            if COMBINE:
                # acq_rel: this program's partials are visible before its count; the last arriver sees everyone's
                arrived = tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel")
                if arrived == n_splits - 1:
                    for gi in range(G):
                        _combine_row(part_ptr, ml_ptr, out_ptr, bh * n_splits, b * H_KV * G + h * G + gi, gi,
                                     n_splits, G_PAD, D, D_PAD, S_PAD)  # fmt: skip
                    tl.store(cnt_ptr + bh, 0)  # for the next call

    @triton.jit
    def _rotate(x, xr, sign, cos, sin):
        """``x * cos + rotate_half(x) * sin`` (``xr * sign`` is ``rotate_half(x)``), each product and the sum
        rounded to ``x``'s dtype as torch rounds them."""
        dt = x.dtype
        a = round_nearest_even(x.to(tl.float32) * cos.to(tl.float32), dt)
        r = round_nearest_even(xr.to(tl.float32) * sign * sin.to(tl.float32), dt)
        return round_nearest_even(a + r, dt).to(dt)

    @triton.jit
    def _attend_block(
        q, kp, vp, inb, dm, keep, bias, scale, m_i, l_i, acc, n, pos, kn, vn,
        DOT_UPCAST: tl.constexpr, ROPE: tl.constexpr,
    ):  # fmt: skip
        """One block of positions into the online softmax: its keys and values loaded together (both in flight
        at once), scores, the running max and sum, the weighted values. ``ROPE``: position ``pos`` holds the new
        token's key and value ``kn``, ``vn`` (this program writes them to the cache; its loads may precede that)."""
        kv_mask = inb[:, None] & dm[None, :]
        kt = tl.load(kp, mask=kv_mask, other=0.0)
        vt = tl.load(vp, mask=kv_mask, other=0.0)
        if ROPE:
            at = (n == pos)[:, None]
            kt = tl.where(at, kn[None, :], kt)
            vt = tl.where(at, vn[None, :], vt)
        if DOT_UPCAST:  # Triton's CPU interpreter multiplies bf16 as raw bits: give it fp32
            kt = kt.to(tl.float32)
        s = tl.dot(q, tl.trans(kt)) * scale + bias
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = p.to(vt.dtype)
        if DOT_UPCAST:
            pv = pv.to(tl.float32)
            vt = vt.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(pv, vt)
        return m_new, l_i, acc

    @triton.jit
    def _combine_row(part_ptr, ml_ptr, out_ptr, first, row, gi, SPLITS, G_PAD: tl.constexpr, D: tl.constexpr,
                     D_PAD: tl.constexpr, S_PAD: tl.constexpr):  # fmt: skip
        """Output row ``row`` (``b * HQ + query head``) from the ``SPLITS`` partials of its key/value head
        (starting at ``first``), its query head the ``gi``-th of the group: each weighed by its softmax mass
        relative to the largest max, summed in range order."""
        s = tl.arange(0, S_PAD)
        d = tl.arange(0, D_PAD)
        sm = s < SPLITS
        base = first + s
        # .cg: straight from L2, where the other programs' stores are
        m = tl.load(ml_ptr + base * 2 * G_PAD + gi, mask=sm, other=float("-inf"), cache_modifier=".cg")
        ls = tl.load(ml_ptr + (base * 2 + 1) * G_PAD + gi, mask=sm, other=0.0, cache_modifier=".cg")
        o = tl.load(
            part_ptr + (base[:, None] * G_PAD + gi) * D_PAD + d[None, :],
            mask=sm[:, None],
            other=0.0,
            cache_modifier=".cg",
        )
        top = tl.max(m, 0)
        top = tl.where(top == float("-inf"), 0.0, top)
        w = ls * tl.exp(m - top)  # (0 for empty splits)
        total = tl.sum(w, 0)
        y = tl.sum(w[:, None] * o, 0) / tl.where(total > 0, total, 1.0)
        tl.store(out_ptr + row * D + d, y.to(out_ptr.dtype.element_ty), mask=d < D)

    @triton.jit
    def _combine_kernel(
        part_ptr, ml_ptr, out_ptr, HQ, H_KV, SPLITS,
        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)  # b * HQ + query head
        b = row // HQ
        qh = row % HQ
        _combine_row(
            part_ptr, ml_ptr, out_ptr, (b * H_KV + qh // G) * SPLITS, row, qh % G, SPLITS, G_PAD, D, D_PAD, S_PAD
        )
