"""Triton sparse GEMV for batch-1 decode: ``y = W · mask(x − μ)`` reading only the kept weight rows.

Layout: see :mod:`.packing` (plain ``[K, N_pad]`` or blocked ``[N_pad/L, K, L]``). A program owns
``BLOCK_N`` output columns and a ``K_PER``-long slice of the inputs (split-K, so that even a 4096-column
matrix gives the GPU enough independent loads in flight). With ``COMPACT`` it applies the threshold test
to its whole slice, lists the surviving rows (prefix sum) and streams only those rows in ``BLOCK_K``
tiles; without it, it scans every ``BLOCK_K`` tile with masked loads. Products go through the tensor
cores (``x'`` as row 0 of a 16-row operand) or, with fp32 involved, an fp32 FMA tile; fp32 accumulation.

No atomics on fp16/bf16 outputs (the reason TEAL has no bf16 kernel): each program writes its fp32
partial sums to a small workspace, then bumps an int32 counter for its column block; the program that
arrives last (``SPLIT_K``-th) sums the ``SPLIT_K`` partials in a fixed order, adds bias and the μ term,
casts, writes ``y`` and resets the counter to 0 for the next launch. One launch, deterministic results.
Counters are per device: launches on one device must not run concurrently (separate streams at once).
With ``partials=True`` there is no such tail: every program stores its fp32 partial sums and the caller
adds the ``SPLIT_K`` rows (``sparse_gemv(..., reduce="consumer")``; no atomics, no counters, deterministic).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..errors import UsageError
from .packing import PackedGemv
from .triton_round import round_nearest_even
from .workspace import counter_buffer

__all__ = ["GemvConfig", "choose_config", "launch_config", "sparse_gemv_triton"]


@triton.jit
def _sparse_gemv_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    tau_ptr,
    mu_ptr,
    wsum_ptr,
    bias_ptr,
    scale_ptr,
    zero_ptr,
    part_ptr,
    cnt_ptr,
    idx_ptr,
    K,
    N,
    LB,
    K_PER,
    C1,
    C2,
    HAS_MU: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    QUANT: tl.constexpr,
    SPLIT_K: tl.constexpr,
    SPLIT_P2: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    COMPACT: tl.constexpr,
    K_P2: tl.constexpr,
    EXACT_CAST: tl.constexpr,
    PARTIALS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    # weights of column n, input k live at (n // LB) * K * LB + k * LB + n % LB (LB = N: plain [K, N])
    blk = n0 // LB
    w_cols = w_ptr + blk * K * LB + (offs_n - blk * LB)
    seg = (n0 >= C1).to(tl.int32) + (n0 >= C2).to(tl.int32)  # which packed layer these columns belong to
    # the threshold compares in the activation dtype, like SparseLinear: round τ to it first
    tau = round_nearest_even(tl.load(tau_ptr + seg), x_ptr.dtype.element_ty)
    if HAS_MU:
        mu = tl.load(mu_ptr + seg)
    else:
        mu = 0.0

    X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    if QUANT > 0:  # int8 weights enter the tensor cores as exact fp16 integers
        MMA_DTYPE: tl.constexpr = tl.float16
    else:  # Triton reads the constexpr annotation per branch, so mypy sees the name twice
        MMA_DTYPE: tl.constexpr = w_ptr.dtype.element_ty  # type: ignore[no-redef]
    if USE_DOT:  # x' as row 0 of a 16-row operand: the MMA does the fp16→fp32 work at tensor-core rate
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    row0 = (tl.arange(0, 16) == 0).to(MMA_DTYPE)
    xacc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    k_lo = pid_k * K_PER
    k_hi = tl.minimum(k_lo + K_PER, K)
    if COMPACT:
        # List this program's surviving input rows once (a prefix sum over its K slice), then stream
        # only those rows in full BLOCK_K tiles: work and loads scale with the kept rows, not with K.
        offs = k_lo + tl.arange(0, K_P2)
        in_k = offs < k_hi
        d = tl.load(x_ptr + offs, mask=in_k, other=0.0).to(tl.float32) - mu
        keep = in_k & ~(tl.abs(d) <= tau)  # not (|d| <= τ): NaN is kept, as in the reference
        if QUANT == 2:  # Σ x' for the zero point, once over the slice (per tile it costs int8 ≈10%)
            xsum = tl.sum(_to_x(tl.where(keep, d, 0.0), X_DTYPE, EXACT_CAST).to(tl.float32), axis=0)
        pos = tl.cumsum(keep.to(tl.int32), axis=0) - 1
        count = tl.sum(keep.to(tl.int32), axis=0)
        rows_ptr = idx_ptr + (pid_k * tl.num_programs(0) + pid_n) * K_P2
        tl.store(rows_ptr + pos, offs, mask=keep)
        tl.debug_barrier()  # the list is written by all threads of the program, read back by all
        for i in range(0, count, BLOCK_K):
            r = i + tl.arange(0, BLOCK_K)
            valid = r < count
            rows = tl.load(rows_ptr + r, mask=valid, other=0)
            xs = tl.load(x_ptr + rows, mask=valid, other=0.0).to(tl.float32) - mu
            acc, xacc = _accumulate(
                acc,
                xacc,
                tl.where(valid, xs, 0.0),
                rows,
                valid,
                w_cols,
                LB,
                row0,
                X_DTYPE,
                MMA_DTYPE,
                QUANT,
                USE_DOT,
                DOT_UPCAST,
                False,
                EXACT_CAST,
            )
    else:
        for kk in range(0, K_PER, BLOCK_K):  # same trip count for every program; rows past k_hi are masked
            offs_k = k_lo + kk + tl.arange(0, BLOCK_K)
            in_k = offs_k < k_hi
            d = tl.load(x_ptr + offs_k, mask=in_k, other=0.0).to(tl.float32) - mu
            keep = in_k & ~(tl.abs(d) <= tau)  # not (|d| <= τ): NaN is kept, as in the reference
            acc, xacc = _accumulate(
                acc,
                xacc,
                tl.where(keep, d, 0.0),
                offs_k,
                keep,
                w_cols,
                LB,
                row0,
                X_DTYPE,
                MMA_DTYPE,
                QUANT,
                USE_DOT,
                DOT_UPCAST,
                QUANT == 2,
                EXACT_CAST,
            )
        if QUANT == 2:
            xsum = tl.sum(xacc, axis=0)
    part = tl.sum(acc, axis=0)
    if QUANT == 2:  # W = (q - zero) * scale: Σ W x = scale * (Σ q x - zero * Σ x)
        part -= tl.load(zero_ptr + offs_n) * xsum
    if QUANT > 0:
        part *= tl.load(scale_ptr + offs_n)

    if PARTIALS:  # no reduction here: the caller sums the SPLIT_K rows (fused into its consumer by inductor)
        if pid_k == 0:
            part = _output_terms(part, offs_n, mu, wsum_ptr, bias_ptr, HAS_MU, HAS_BIAS)
        tl.store(part_ptr + pid_k * N + offs_n, part)
    elif SPLIT_K == 1:
        _epilogue(part, offs_n, mu, y_ptr, wsum_ptr, bias_ptr, HAS_MU, HAS_BIAS)
    else:
        total, last = split_k_tail(part, pid_k, pid_n, offs_n, N, part_ptr, cnt_ptr, SPLIT_K, SPLIT_P2)
        if last:
            _epilogue(total, offs_n, mu, y_ptr, wsum_ptr, bias_ptr, HAS_MU, HAS_BIAS)


@triton.jit
def split_k_tail(part, pid_k, pid_n, offs_n, N, part_ptr, cnt_ptr, SPLIT_K: tl.constexpr, SPLIT_P2: tl.constexpr):
    """Store this program's fp32 partial sums and count it in; ``(sum of the SPLIT_K partials, True)`` for
    the program of column block ``pid_n`` that arrives last (summed in a fixed order; it also resets the
    counter for the next launch), ``(zeros, False)`` for the others."""
    tl.store(part_ptr + pid_k * N + offs_n, part)
    # acq_rel: our partials are visible before the count; the last arriver sees everyone's
    arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
    last = arrived == SPLIT_K - 1
    total = tl.zeros_like(part)
    if last:
        offs_s = tl.arange(0, SPLIT_P2)
        parts = tl.load(
            part_ptr + offs_s[:, None] * N + offs_n[None, :],
            mask=(offs_s < SPLIT_K)[:, None],
            other=0.0,
            cache_modifier=".cg",
        )
        total = tl.sum(parts, axis=0)
        tl.store(cnt_ptr + pid_n, 0)
    return total, last


@triton.jit
def _accumulate(
    acc,
    xacc,
    xs,
    rows,
    keep,
    w_cols,
    LB,
    row0,
    X_DTYPE: tl.constexpr,
    MMA_DTYPE: tl.constexpr,
    QUANT: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    XACC: tl.constexpr,
    EXACT_CAST: tl.constexpr,
):
    """Add ``W[rows, cols]ᵀ · x'[rows]`` to ``acc`` (and ``x'`` to ``xacc`` if ``XACC``); ``xs`` is ``x − μ``
    (fp32), 0 where not kept."""
    xs = _to_x(xs, X_DTYPE, EXACT_CAST)  # x' in the activation dtype (exact when μ = 0)
    w = tl.load(w_cols[None, :] + rows[:, None] * LB, mask=keep[:, None], other=0)
    if USE_DOT:
        if QUANT > 0:  # q + 0x6480 read as fp16 is 1152 + q exactly; masked rows (q = 0) give 0
            w = (w.to(tl.int16) + 0x6480).to(tl.int16).to(tl.float16, bitcast=True) - 1152.0
        xa = row0[:, None] * xs.to(MMA_DTYPE)[None, :]
        if DOT_UPCAST:  # Triton's CPU interpreter multiplies bf16 as raw bits: give it fp32
            acc = tl.dot(xa.to(tl.float32), w.to(MMA_DTYPE).to(tl.float32), acc)
        else:
            acc = tl.dot(xa, w.to(MMA_DTYPE), acc)
    else:
        acc += w.to(tl.float32) * xs.to(tl.float32)[:, None]
    if XACC:
        xacc += xs.to(tl.float32)
    return acc, xacc


@triton.jit
def _to_x(t, DTYPE: tl.constexpr, EXACT: tl.constexpr):
    """fp32 ``t`` cast to ``DTYPE`` rounding to nearest-even, as torch does. Compiled kernels do that already;
    the CPU interpreter truncates bf16 (``EXACT``), which with μ ≠ 0 shows: ``x − μ`` off by an ulp, then
    ``W·x' + μ·ΣW`` cancels and the error grows (bf16, x = −4.34, μ = 0.99: 4.6% on one output)."""
    if EXACT:
        t = round_nearest_even(t, DTYPE)
    return t.to(DTYPE)


@triton.jit
def _output_terms(out, offs_n, mu, wsum_ptr, bias_ptr, HAS_MU: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``out + μ·ΣW + b`` (fp32): the per-output terms added once, after the K sum."""
    if HAS_MU:
        out += mu * tl.load(wsum_ptr + offs_n)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n)
    return out


@triton.jit
def _epilogue(out, offs_n, mu, y_ptr, wsum_ptr, bias_ptr, HAS_MU: tl.constexpr, HAS_BIAS: tl.constexpr):
    out = _output_terms(out, offs_n, mu, wsum_ptr, bias_ptr, HAS_MU, HAS_BIAS)
    tl.store(y_ptr + offs_n, round_nearest_even(out, y_ptr.dtype.element_ty).to(y_ptr.dtype.element_ty))


@dataclass(frozen=True)
class GemvConfig:
    block_k: int
    block_n: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 1
    use_dot: bool = True  # fp16/bf16 (int8 as fp16) through tensor cores; FMA whenever fp32 is involved
    compact: bool = True  # list the kept rows first, then stream only those (work ∝ kept rows)

    def k_per(self, k: int) -> int:
        return triton.cdiv(triton.cdiv(k, self.split_k), self.block_k) * self.block_k


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# Measured on an H100 (benchmarks/README.md; sweeps in benchmarks/bench_gemv.py --tune and
# benchmarks/exp_variants.py): 64x256 tiles, 3 stages, 4 warps, and K split so that at most 2 programs run
# per SM. Two 4-warp programs always fit on an SM (even at 255 registers, as the int8 kernel uses), so the
# grid is one wave: a 281st program on 132 SMs would run alone after the others (int8 4096x14336: 45.8 µs
# at 280 programs vs 34.6 at 224). 1 program per SM is slower; 3 (where they fit) is mixed, ±1 µs. The kept-row list
# (compact) costs a few percent at low sparsity but removes the floor that scanning every row leaves above
# 60%; int8 needs it even more (its per-element unpacking otherwise costs the same at any sparsity).
_RULES = {  # weight bytes -> (block_k, block_n, programs per SM, num_stages, compact)
    1: (64, 256, 2, 3, True),
    2: (64, 256, 2, 3, True),
    4: (16, 128, 4, 1, False),
}


def choose_config(
    k: int, n: int, weight_bytes: int, sm_count: int, *, per_sm: int | None = None, block_n: int | None = None
) -> GemvConfig:
    """A deterministic launch rule by shape and weight width (no autotuning lottery).

    Tiles from ``_RULES``; K is split so that at most ``per_sm × SMs`` programs run (one wave; fp32:
    about that many), each over at least two tiles and at most ``MAX_COMPACT_ROWS`` rows. ``block_n``
    caps the tile width (the layout block).
    """
    block_k, bn, p, stages, compact = _RULES[weight_bytes]
    block_n = min(bn, block_n or bn)
    per_sm = per_sm or p
    n_blocks = triton.cdiv(n, block_n)
    target = per_sm * sm_count // n_blocks if weight_bytes < 4 else triton.cdiv(per_sm * sm_count, n_blocks)
    split = max(1, min(target, k // (2 * block_k)), triton.cdiv(k, MAX_COMPACT_ROWS))
    cfg = GemvConfig(block_k, block_n, split, 4, stages, True, compact)
    return GemvConfig(block_k, block_n, triton.cdiv(k, cfg.k_per(k)), 4, stages, True, compact)


MAX_COMPACT_ROWS = 4096
_CONFIG_CACHE: dict[tuple, GemvConfig] = {}


def launch_config(packed: PackedGemv, device: torch.device) -> GemvConfig:
    """The launch rule's config for ``packed`` on ``device`` (cached per shape, weight width and device)."""
    k, n, lb = packed.in_features, packed.padded_out, packed.layout_block
    key = (k, n, lb, packed.weight_t.element_size(), device.type, device.index)
    config = _CONFIG_CACHE.get(key)
    if config is None:
        config = _CONFIG_CACHE[key] = choose_config(k, n, packed.weight_t.element_size(), _sm_count(device), block_n=lb)
    return config


def sparse_gemv_triton(
    x: torch.Tensor,
    packed: PackedGemv,
    config: GemvConfig | None = None,
    *,
    out: torch.Tensor | None = None,
    partials: bool = False,
) -> torch.Tensor:
    """``y_pad[N_pad]`` for one input row ``x`` (``numel == K``), in ``x``'s dtype (into ``out`` if given).

    With ``partials`` the kernel skips its split-K reduction and returns the fp32 partial sums
    ``[split_k, N_pad]`` instead (bias and μ-term in row 0): ``y = partials.sum(0).to(x.dtype)``. That sum
    and cast are left to the caller (e.g. to fuse them into the kernel that consumes ``y``).
    """
    k, n, lb = packed.in_features, packed.padded_out, packed.layout_block
    x1 = x.reshape(-1)
    if x1.numel() != k:
        raise UsageError(f"sparse GEMV takes one input row of {k} features, got shape {tuple(x.shape)}")
    x1 = x1.contiguous()
    dev = x1.device
    if config is None:
        config = launch_config(packed, dev)
    if lb % config.block_n:
        raise UsageError(f"block_n={config.block_n} must divide the layout block {lb}")
    split = config.split_k
    if partials:
        part = torch.empty((split, n), dtype=torch.float32, device=dev) if out is None else out
        if part.shape != (split, n) or part.dtype != torch.float32 or not part.is_contiguous():
            raise UsageError(f"out must be a contiguous [{split}, {n}] float32 tensor")
        y = part
    else:
        y = torch.empty(n, dtype=x1.dtype, device=dev) if out is None else out
        if y.shape != (n,) or y.dtype != x1.dtype or not y.is_contiguous():
            raise UsageError(f"out must be a contiguous [{n}] {x1.dtype} tensor")
        part = torch.empty((split, n) if split > 1 else (1,), dtype=torch.float32, device=dev)
    n_blocks = n // config.block_n
    cnt = counter_buffer(dev, n_blocks, "gemv") if split > 1 and not partials else part
    k_per = config.k_per(k)
    k_p2 = triton.next_power_of_2(k_per)
    compact = config.compact and k_p2 <= MAX_COMPACT_ROWS  # the row list lives in registers first
    idx = torch.empty(n_blocks * split * k_p2 if compact else 1, dtype=torch.int32, device=dev)
    quant = 0 if not packed.quantized else (2 if packed.zero is not None else 1)
    c1, c2 = packed.segment_starts
    _sparse_gemv_kernel[(n_blocks, split)](
        x1,
        packed.weight_t,
        y,
        packed.threshold,
        packed.shift if packed.shift is not None else packed.threshold,
        packed.wsum if packed.wsum is not None else y,
        packed.bias if packed.bias is not None else y,
        packed.scale if packed.scale is not None else y,
        packed.zero if packed.zero is not None else y,
        part,
        cnt,
        idx,
        k,
        n,
        lb,
        k_per,
        c1,
        c2,
        HAS_MU=packed.shift is not None,
        HAS_BIAS=packed.bias is not None,
        QUANT=quant,
        SPLIT_K=split,
        SPLIT_P2=triton.next_power_of_2(split),
        BLOCK_K=config.block_k,
        BLOCK_N=config.block_n,
        USE_DOT=config.use_dot and torch.float32 not in (x1.dtype, packed.weight_t.dtype) and config.block_k >= 16,
        DOT_UPCAST=interpreting() and packed.weight_t.dtype == torch.bfloat16,
        COMPACT=compact,
        K_P2=k_p2,
        EXACT_CAST=interpreting() and x1.dtype == torch.bfloat16,
        PARTIALS=partials,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return y


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
