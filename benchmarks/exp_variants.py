"""Kernel-variant sweep behind the launch rule (diagnostics for issue 7; not part of the tables).

    python benchmarks/exp_variants.py --set explore --out $OUT/variants_explore.json   # ≈2 min
    python benchmarks/exp_variants.py --set fit --out $OUT/variants_fit.json           # ≈1 min
    python benchmarks/exp_variants.py --set ablate --out $OUT/variants_ablate.json     # ≈1.5 min
    python benchmarks/exp_variants.py --set unpack --weights int8 --out $OUT/variants_unpack.json
    python benchmarks/exp_variants.py --set fit3 --shapes 4096x14336,14336x4096,4096x4096,4096x22016,4096x12288

Times experimental variants of the sparse GEMV main loop on the two large shapes (same graph-replay
protocol as bench_gemv.py) at 0/50/70/100% sparsity, next to the library kernel and dense F.linear, and
prints each compiled variant's registers / shared memory. Variants (constexpr switches of one kernel):
MODE 0 = tensor-core dot (x' as row 0 of a 16-row operand), 1 = FMA with a [BLOCK_K, BLOCK_N] fp32
accumulator, 2 = FMA with a row-sum each tile; LISTX = the kept-row list also holds x' (one fewer
dependent load per tile); PREFETCH = register double-buffering of the next tile; FOLD = 1: int8 magic
offset 1152 subtracted once at the end instead of per element, 2: plain int8→fp16 conversion; PDL =
programmatic dependent launch; HEAD = the first tile loaded straight from x while the list is built;
programs="fit" = K split so that at most 2 programs per SM run (the library's rule since issue 7);
ABL = ablations timed at 100% sparsity (1: no split-K reduction, 2: no list store/barrier, 3: launch + x
load only, 4: empty launch). "base" is the library kernel as it is when the script runs; "base-scan" the
library kernel without the kept-row list. Also times 50% sparsity kept in runs of 64 rows vs at random
(the cost of gathering 512-byte rows). The logs of the runs behind benchmarks/README.md are in
benchmarks/results/variants_*_h100.log (there "base" is the kernel before issue 7's changes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_gemv import Case, copy_bandwidth, env_info, graph_time_us  # noqa: E402

from actsparse.kernels import triton_gemv as tg  # noqa: E402
from actsparse.kernels.triton_gemv import split_k_tail  # noqa: E402
from actsparse.kernels.triton_round import round_nearest_even  # noqa: E402


@triton.jit
def _tile(acc, w_cols, rows, xs, valid, LB, row0, QUANT: tl.constexpr, MODE: tl.constexpr, FOLD: tl.constexpr):
    w = tl.load(w_cols[None, :] + rows[:, None] * LB, mask=valid[:, None], other=0)
    return _use(acc, w, xs, row0, QUANT, MODE, FOLD)


@triton.jit
def _int8_to_fp16_asm(q):
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 t, m, c;
        xor.b32 t, $2, 0x80808080;
        mov.b32 m, 0x64646464;
        mov.b32 c, 0x64806480;
        prmt.b32 $0, t, m, 0x4140;
        prmt.b32 $1, t, m, 0x4342;
        sub.f16x2 $0, $0, c;
        sub.f16x2 $1, $1, c;
        }""",
        constraints="=r,=r,r",
        args=[q],
        dtype=tl.float16,
        is_pure=True,
        pack=4,
    )


@triton.jit
def _use(acc, w, xs, row0, QUANT: tl.constexpr, MODE: tl.constexpr, FOLD: tl.constexpr):
    if QUANT > 0 and FOLD == 2:  # plain int8 -> fp16 conversion (Triton's packed fast path)
        w = w.to(tl.float16)
        MMA: tl.constexpr = tl.float16
    elif QUANT > 0 and FOLD == 3:  # 4 int8 per register -> 4 fp16 with one xor, two byte permutes, two subs
        w = _int8_to_fp16_asm(w)
        MMA: tl.constexpr = tl.float16
    elif QUANT > 0:
        w = (w.to(tl.int16) + 0x6480).to(tl.int16).to(tl.float16, bitcast=True)
        if not FOLD:
            w = w - 1152.0
        MMA: tl.constexpr = tl.float16
    else:
        MMA: tl.constexpr = w.dtype
    if MODE == 0:
        xa = row0[:, None] * xs.to(MMA)[None, :]
        acc = tl.dot(xa, w.to(MMA), acc)
    elif MODE == 1:
        acc += w.to(tl.float32) * xs[:, None]
    else:
        acc += tl.sum(w.to(tl.float32) * xs[:, None], axis=0)
    return acc


@triton.jit
def _exp_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    tau_ptr,
    scale_ptr,
    zero_ptr,
    part_ptr,
    cnt_ptr,
    idx_ptr,
    xv_ptr,
    K,
    N,
    LB,
    K_PER,
    QUANT: tl.constexpr,
    SPLIT_K: tl.constexpr,
    SPLIT_P2: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MODE: tl.constexpr,
    LISTX: tl.constexpr,
    PREFETCH: tl.constexpr,
    FOLD: tl.constexpr,
    K_P2: tl.constexpr,
    PDL: tl.constexpr,
    HEAD: tl.constexpr,
    ABL: tl.constexpr,
):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if ABL == 4:  # launch floor: store only
        if pid_k == 0:
            tl.store(y_ptr + offs_n, tl.zeros((BLOCK_N,), dtype=tl.float32).to(y_ptr.dtype.element_ty))
        return
    if ABL == 3:  # launch + x load
        xx = tl.load(
            x_ptr + pid_k * K_PER + tl.arange(0, K_P2), mask=pid_k * K_PER + tl.arange(0, K_P2) < K, other=0.0
        ).to(tl.float32)
        if pid_k == 0:
            out = tl.zeros((BLOCK_N,), dtype=tl.float32) + tl.sum(xx, 0)
            tl.store(y_ptr + offs_n, out.to(y_ptr.dtype.element_ty))
        return
    blk = n0 // LB
    w_cols = w_ptr + blk * K * LB + (offs_n - blk * LB)
    tau = round_nearest_even(tl.load(tau_ptr), x_ptr.dtype.element_ty)
    if QUANT > 0:
        MMA: tl.constexpr = tl.float16
    else:
        MMA: tl.constexpr = w_ptr.dtype.element_ty
    if MODE == 0:
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    elif MODE == 1:
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row0 = (tl.arange(0, 16) == 0).to(MMA)
    k_lo = pid_k * K_PER
    k_hi = tl.minimum(k_lo + K_PER, K)
    offs = k_lo + tl.arange(0, K_P2)
    in_k = offs < k_hi
    d = tl.load(x_ptr + offs, mask=in_k, other=0.0)
    keep = in_k & ~(tl.abs(d.to(tl.float32)) <= tau)
    xq = tl.where(keep, d, 0.0).to(MMA).to(tl.float32)  # x' as the MMA sees it
    xsum = tl.sum(xq, axis=0)
    if HEAD:  # the first BLOCK_K rows straight from x (no list): their loads overlap the list building
        rh = k_lo + tl.arange(0, BLOCK_K)
        inh = rh < k_hi
        dh = tl.load(x_ptr + rh, mask=inh, other=0.0)
        keeph = inh & ~(tl.abs(dh.to(tl.float32)) <= tau)
        xsh = tl.where(keeph, dh, 0.0).to(MMA).to(tl.float32)
        wh = tl.load(w_cols[None, :] + rh[:, None] * LB, mask=keeph[:, None], other=0)
        keep = keep & (offs >= k_lo + BLOCK_K)
    pos = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    count = tl.sum(keep.to(tl.int32), axis=0)
    base = (pid_k * tl.num_programs(0) + pid_n) * K_P2
    if ABL != 2:
        tl.store(idx_ptr + base + pos, offs, mask=keep)
        if LISTX:
            tl.store(xv_ptr + base + pos, xq, mask=keep)
        tl.debug_barrier()
    r0 = tl.arange(0, BLOCK_K)
    if PREFETCH:
        valid = r0 < count
        rows = tl.load(idx_ptr + base + r0, mask=valid, other=0)
        if LISTX:
            xs = tl.load(xv_ptr + base + r0, mask=valid, other=0.0)
        else:
            xs = tl.load(x_ptr + rows, mask=valid, other=0.0).to(MMA).to(tl.float32)
        w = tl.load(w_cols[None, :] + rows[:, None] * LB, mask=valid[:, None], other=0)
        for i in range(BLOCK_K, count + BLOCK_K, BLOCK_K):
            r = i + r0
            valid2 = r < count
            rows2 = tl.load(idx_ptr + base + r, mask=valid2, other=0)
            if LISTX:
                xs2 = tl.load(xv_ptr + base + r, mask=valid2, other=0.0)
            else:
                xs2 = tl.load(x_ptr + rows2, mask=valid2, other=0.0).to(MMA).to(tl.float32)
            w2 = tl.load(w_cols[None, :] + rows2[:, None] * LB, mask=valid2[:, None], other=0)
            acc = _use(acc, w, xs, row0, QUANT, MODE, FOLD)
            w = w2
            xs = xs2
    else:
        for i in range(0, count, BLOCK_K):
            r = i + r0
            valid = r < count
            rows = tl.load(idx_ptr + base + r, mask=valid, other=0)
            if LISTX:
                xs = tl.load(xv_ptr + base + r, mask=valid, other=0.0)
            else:
                xs = tl.load(x_ptr + rows, mask=valid, other=0.0).to(MMA).to(tl.float32)
            acc = _tile(acc, w_cols, rows, xs, valid, LB, row0, QUANT, MODE, FOLD)
    if HEAD:
        acc = _use(acc, wh, xsh, row0, QUANT, MODE, FOLD)
    if MODE == 2:
        part = acc
    else:
        part = tl.sum(acc, axis=0)
    if QUANT > 0:
        if FOLD == 1:
            part -= 1152.0 * xsum
        part = (part - tl.load(zero_ptr + offs_n) * xsum) * tl.load(scale_ptr + offs_n)
    if ABL == 1:  # partials only, no reduction
        tl.store(part_ptr + pid_k * N + offs_n, part)
        return
    total, last = split_k_tail(part, pid_k, pid_n, offs_n, N, part_ptr, cnt_ptr, SPLIT_K, SPLIT_P2)
    if last:
        tl.store(y_ptr + offs_n, total.to(y_ptr.dtype.element_ty))


class Variant:
    def __init__(
        self,
        name,
        block_k=64,
        block_n=256,
        programs=2.0,
        warps=4,
        stages=3,
        mode=0,
        listx=1,
        prefetch=0,
        fold=0,
        layout=256,
        pdl=0,
        head=0,
        abl=0,
    ):
        self.layout, self.pdl, self.head, self.abl = layout, pdl, head, abl
        self.name, self.block_k, self.block_n, self.programs = name, block_k, block_n, programs
        self.warps, self.stages, self.mode = warps, stages, mode
        self.listx, self.prefetch, self.fold = listx, prefetch, fold
        self.compiled = None

    def split(self, k, n, sms):
        nb = n // self.block_n
        if self.programs in ("fit", "fit3"):  # at most 2 (3) programs per SM: one wave even at 255 (168) registers
            split = max(1, (3 if self.programs == "fit3" else 2) * sms // nb)
        else:
            split = max(1, round(self.programs * sms / nb))
        k_per = triton.cdiv(triton.cdiv(k, split), self.block_k) * self.block_k
        return triton.cdiv(k, k_per), k_per

    def run(self, x, p, y, ws, sms):
        k, n, lb = p.in_features, p.padded_out, p.layout_block
        split, k_per = self.split(k, n, sms)
        k_p2 = triton.next_power_of_2(k_per)
        nb = n // self.block_n
        part, cnt, idx, xv = ws(split * n, nb, nb * split * k_p2, x.device)
        quant = 0 if not p.quantized else 2
        c = _exp_kernel[(nb, split)](
            x,
            p.weight_t,
            y,
            p.threshold,
            p.scale if p.scale is not None else y,
            p.zero if p.zero is not None else y,
            part,
            cnt,
            idx,
            xv,
            k,
            n,
            lb,
            k_per,
            QUANT=quant,
            SPLIT_K=split,
            SPLIT_P2=triton.next_power_of_2(split),
            BLOCK_K=self.block_k,
            BLOCK_N=self.block_n,
            MODE=self.mode,
            LISTX=self.listx,
            PREFETCH=self.prefetch,
            FOLD=self.fold,
            K_P2=k_p2,
            PDL=self.pdl,
            HEAD=self.head,
            ABL=self.abl,
            num_warps=self.warps,
            num_stages=self.stages,
            **({"launch_pdl": True} if self.pdl else {}),
        )
        if self.compiled is None:
            self.compiled = c
        return y


_WS = {}


def workspace(n_part, n_cnt, n_idx, device="cuda"):
    key = (n_part, n_cnt, n_idx, str(device))
    if key not in _WS:
        _WS[key] = (
            torch.empty(n_part, dtype=torch.float32, device=device),
            torch.zeros(n_cnt, dtype=torch.int32, device=device),
            torch.empty(n_idx, dtype=torch.int32, device=device),
            torch.empty(n_idx, dtype=torch.float32, device=device),
        )
    return _WS[key]


def _sets():
    """The three sweeps run on the H100 (benchmarks/README.md); each: (variants, int8-only variants)."""
    V = Variant
    explore = (
        [
            V("dot-nolist", listx=0),
            V("dot"),
            V("dot-p1", programs=1.0),
            V("dot-p3", programs=3.0),
            V("dot-p4", programs=4.0),
            V("dot-w8", warps=8),
            V("dot-s2", stages=2),
            V("dot-s4", stages=4),
            V("dot-bk32", block_k=32),
            V("dot-bk128-w8", block_k=128, warps=8),
            V("dot-bn128", block_n=128),
            V("dot-pref", stages=1, prefetch=1),
            V("dot-pref-bk32", block_k=32, stages=1, prefetch=1),
            V("fma2d-bk16", block_k=16, mode=1),
            V("fma2d-bk32-w8", block_k=32, mode=1, warps=8),
            V("fma2d-bk16-pref", block_k=16, mode=1, stages=1, prefetch=1),
            V("fma2d-bk32-w8-pref", block_k=32, mode=1, warps=8, stages=1, prefetch=1),
            V("fma1d-bk32", block_k=32, mode=2),
            V("fma1d-bk64-w8", block_k=64, mode=2, warps=8),
            V("fma1d-bk32-w8-pref", block_k=32, mode=2, warps=8, stages=1, prefetch=1),
            V("dot-L512-bk32", block_k=32, block_n=512, layout=512, warps=8),
            V("fma1d-L512-bk32-w8", block_k=32, block_n=512, layout=512, mode=2, warps=8),
        ],
        [
            V("dot-fold", fold=1),
            V("dot-fold-pref", fold=1, stages=1, prefetch=1),
            V("fma2d-bk32-w8-fold", block_k=32, mode=1, warps=8, fold=1),
        ],
    )
    fit = (
        [
            V("dot-nolist", listx=0),
            V("fit", listx=0, programs="fit"),
            V("fit-pdl", listx=0, programs="fit", pdl=1),
            V("fit-bn128", listx=0, programs="fit", block_n=128),
            V("fit-bn128-pdl", listx=0, programs="fit", block_n=128, pdl=1),
            V("fit-s4", listx=0, programs="fit", stages=4),
            V("fit-bk32-s4", listx=0, programs="fit", block_k=32, stages=4),
        ],
        [
            V("fit-fold", listx=0, programs="fit", fold=1),
            V("fit-cvt", listx=0, programs="fit", fold=2),
            V("fit-cvt-w8", listx=0, programs="fit", fold=2, warps=8),
            V("fit-cvt-bk32", listx=0, programs="fit", fold=2, block_k=32),
            V("fit-cvt-bk128-w8", listx=0, programs="fit", fold=2, block_k=128, warps=8),
            V("fit-cvt-pdl", listx=0, programs="fit", fold=2, pdl=1),
            V("fit-cvt-bn128-pdl", listx=0, programs="fit", fold=2, block_n=128, pdl=1),
            V("p3-cvt-bk32", listx=0, programs=3.0, fold=2, block_k=32),
        ],
    )
    ablate = (
        [
            V("fit", listx=0, programs="fit"),
            V("fit-pdl", listx=0, programs="fit", pdl=1),
            V("fit-head", listx=0, programs="fit", head=1),
            V("fit-head-pdl", listx=0, programs="fit", head=1, pdl=1),
            V("fit-listx-pdl", listx=1, programs="fit", pdl=1),
            V("fit-L512-bk32", listx=0, programs="fit", block_k=32, block_n=512, layout=512),
            V("fit-L512-bk32-s4", listx=0, programs="fit", block_k=32, block_n=512, layout=512, stages=4),
            V("fit-L512-bk32-w8", listx=0, programs="fit", block_k=32, block_n=512, layout=512, warps=8),
            V("abl1-noreduce", listx=0, programs="fit", abl=1),
            V("abl2-nolist", listx=0, programs="fit", abl=2),
            V("abl3-xonly", listx=0, programs="fit", abl=3),
            V("abl4-empty", listx=0, programs="fit", abl=4),
            V("abl4-empty-pdl", listx=0, programs="fit", abl=4, pdl=1),
        ],
        [
            V("fit-fold-pdl", listx=0, programs="fit", fold=1, pdl=1),
            V("fit-fold-head-pdl", listx=0, programs="fit", fold=1, head=1, pdl=1),
        ],
    )
    unpack = (
        [V("fit", listx=0, programs="fit")],
        [
            V("fit-asm", listx=0, programs="fit", fold=3),
            V("fit-asm-s4", listx=0, programs="fit", fold=3, stages=4),
            V("fit-asm-w8", listx=0, programs="fit", fold=3, warps=8),
            V("fit-asm-bk128-w8", listx=0, programs="fit", fold=3, block_k=128, warps=8),
            V("fit-asm-bk32", listx=0, programs="fit", fold=3, block_k=32),
            V("p3-asm", listx=0, programs=3.0, fold=3),
            V("p4-asm-w8", listx=0, programs=4.0, fold=3, warps=8),
        ],
    )
    fit3 = (
        [
            V("fit", listx=0, programs="fit"),
            V("fit3", listx=0, programs="fit3"),
            V("fit3-s4", listx=0, programs="fit3", stages=4),
        ],
        [V("fit3-asm", listx=0, programs="fit3", fold=3)],
    )
    return {"explore": explore, "fit": fit, "ablate": ablate, "unpack": unpack, "fit3": fit3}


SETS = _sets()
VARIANTS, INT8_ONLY = SETS["ablate"]


def relayout(p, lb):
    """A copy of packed ``p`` blocked by ``lb`` columns (wider than pack() allows; one segment only)."""
    import dataclasses

    w = p.columns(0, p.padded_out)
    k, n = w.shape
    return dataclasses.replace(p, weight_t=w.reshape(k, n // lb, lb).permute(1, 0, 2).contiguous())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default="4096x14336,14336x4096,4096x4096")
    ap.add_argument("--sparsities", default="0,0.5,0.7,1.0")
    ap.add_argument("--only", default=None, help="comma list of variant names")
    ap.add_argument("--weights", default="fp16,int8")
    ap.add_argument("--set", default="ablate", choices=sorted(SETS), help="which sweep (see _sets)")
    args = ap.parse_args()
    all_variants, int8_only = SETS[args.set]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw:.0f} GB/s", flush=True)
    res = {"env": env_info(), "copy_gbs": bw, "rows": [], "compiled": {}}
    sparsities = [float(s) for s in args.sparsities.split(",")]
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        for wname, dtype, q in (("fp16", torch.float16, None), ("int8", torch.bfloat16, "int8")):
            if wname not in args.weights.split(","):
                continue
            case = Case(k, n, dtype, q)
            td = case.time_dense()
            variants = all_variants + (int8_only if q else [])
            if args.only:
                variants = [v for v in variants if v.name in args.only.split(",")]
            ys = [torch.empty(p.padded_out, dtype=dtype, device="cuda") for p in case.packed]
            wide = {v.layout: [relayout(p, v.layout) for p in case.packed] for v in variants if v.layout != 256}
            wide[256] = case.packed
            table = {}
            # correctness of each variant at 50% (no μ/bias here), then timings
            x0, p0 = case.x[0], case.packed[0]
            p0.threshold.fill_(torch.quantile(x0.float().abs(), 0.5).item())
            ref = tg.sparse_gemv_triton(x0, p0).double()
            ok = []
            for v in variants:
                v.compiled = None
                try:
                    y = v.run(x0, wide[v.layout][0], torch.full_like(ys[0], float("nan")), workspace, sms).double()
                    err = ((y - ref).norm() / ref.norm()).item()
                except Exception as e:  # noqa: BLE001
                    print(f"{v.name}: FAILED {repr(e)[:300]}", flush=True)
                    continue
                c = v.compiled
                info = dict(regs=c.n_regs, spills=c.n_spills, smem=c.metadata.shared, split=v.split(k, n, sms)[0])
                res["compiled"][f"{shape}/{wname}/{v.name}"] = info
                print(f"{shape} {wname} {v.name:>22}: err {err:.1e} {info}", flush=True)
                if v.abl:
                    ok.append(v)
                    continue
                if not err < 1e-2:
                    print("   -> wrong result, skipped", flush=True)
                    continue
                ok.append(v)
            for s in sparsities:
                kept = case.set_sparsity(s) if s < 1 else 0
                if s >= 1:
                    for p in case.packed:
                        p.threshold.fill_(math.inf)
                for ps in wide.values():  # thresholds are per packed copy
                    for p, p_ref in zip(ps, case.packed):
                        p.threshold.copy_(p_ref.threshold)
                sbytes = kept * case.wbytes_row + 2 * (k + n)
                tb = case.time_sparse()
                table[("base", s)] = tb
                sp = max(1, min(math.ceil(4 * sms / (n // 128)), k // 128))
                scan = tg.GemvConfig(64, 128, sp, 4, 1, True, False)
                scan = tg.GemvConfig(64, 128, math.ceil(k / scan.k_per(k)), 4, 1, True, False)
                table[("base-scan", s)] = case.time_sparse(scan)
                for v in ok:
                    if v.abl >= 2 and s < 1:
                        table[(v.name, s)] = float("nan")
                        continue
                    t = graph_time_us(
                        lambda i, v=v, case=case, wide=wide, ys=ys: v.run(
                            case.x[i % case.copies],
                            wide[v.layout][i % case.copies],
                            ys[i % case.copies],
                            workspace,
                            sms,
                        ),
                        4 * case.copies,
                    )
                    table[(v.name, s)] = t
                for name in ["base", "base-scan"] + [v.name for v in ok]:
                    t = table[(name, s)]
                    res["rows"].append(
                        dict(
                            k=k,
                            n=n,
                            w=wname,
                            s=s,
                            variant=name,
                            us=t,
                            dense_us=td,
                            pct_copy=100 * sbytes / (t * 1e-6) / 1e9 / bw,
                        )
                    )
            # DRAM granularity: 50% kept in runs of R consecutive rows instead of at random
            saved = [x.clone() for x in case.x]
            runs = {}
            for run in (1, 64):
                for x in case.x:
                    kk = torch.arange(x.numel(), device=x.device)
                    pat = ((kk // run) % 2 == 0) if run > 1 else (torch.rand(x.numel(), device=x.device) < 0.5)
                    x.copy_(torch.where(pat, x.sign() * (1.0 + x.abs()), x * 0.05))
                for ps in wide.values():
                    for p in ps:
                        p.threshold.fill_(0.9)
                runs[("base", run)] = case.time_sparse()
                for v in ok:
                    if v.name in ("fit", "fit-L512-bk32", "fit-cvt", "fit-bn128"):
                        runs[(v.name, run)] = graph_time_us(
                            lambda i, v=v, case=case, wide=wide, ys=ys: v.run(
                                case.x[i % case.copies],
                                wide[v.layout][i % case.copies],
                                ys[i % case.copies],
                                workspace,
                                sms,
                            ),
                            4 * case.copies,
                        )
            for x, x0 in zip(case.x, saved):
                x.copy_(x0)
            print(
                f"\n{shape} {wname}: 50% kept in runs of 1(random)/8/64 rows: "
                + ", ".join(f"{nm}@{r}={t:.1f}" for (nm, r), t in runs.items())
            )
            res["runs"] = res.get("runs", []) + [
                dict(k=k, n=n, w=wname, variant=nm, run=r, us=t) for (nm, r), t in runs.items()
            ]
            print(f"\n{shape} {wname}: dense {td:.1f} us; sparse us per variant at sparsity {sparsities}")
            for name in ["base", "base-scan"] + [v.name for v in ok]:
                print(f"  {name:>22} " + " ".join(f"{table[(name, s)]:7.1f}" for s in sparsities), flush=True)
            del case
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
