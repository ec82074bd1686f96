"""What any batch-1 GEMV could reach on this GPU: bandwidth ceilings next to issue 7's targets, one run.

    python benchmarks/bounds.py --out $OUT/bounds_h100.json     # ≈4 min on an H100
    python benchmarks/bounds.py --models llama2-7b --backends cuda,triton   # the CUDA kernel, then Triton
    python benchmarks/bounds.py --skip-gemv --models llama2-7b --backends cuda,cuda@legacy   # kernel now vs before

Three measurements, all in one process on one GPU:

1. **Bandwidth and launch floors.** Copy bandwidth (1 GiB device-to-device, read + written, as in
   bench_gemv.py), *read* bandwidth (a Triton kernel that streams 1 GiB and sums it; the best of a few grid
   sizes), and the graph-replay time of an empty kernel with a GEMV-sized grid (what every extra launch in
   a CUDA graph costs at least).
2. **GEMV ceilings.** For the issue's shapes: dense ``F.linear`` (graph-timed, and ``do_bench``-timed as the
   issue's targets were), our kernel at 0/50/70%, and the best ratio a kernel could reach if it read only
   the kept weight rows at the measured read bandwidth, with and without one launch floor.
3. **Decode decomposition** (the gpt-fast loop of bench_decode.py, Llama-2-7B / Llama-3-8B shapes, bf16):
   the step with dense GEMVs, with our kernel at 0/50/70/100%, and with the GEMVs *removed* (each linear
   returns a fixed tensor; the norms, RoPE, cache writes, attention, residuals, lm_head and argmax stay).
   From these: the in-loop time of the GEMVs, our fixed cost per GEMV (100% sparse minus no GEMVs), the
   bandwidth the GEMVs reach inside the loop, and the decode speedup ceiling at each sparsity if the kept
   weights moved at read bandwidth, plus the bandwidth a 2.0× at 50% would need. ``--profile`` adds
   the kernels of each graph (torch.profiler/CUPTI): count per step, busy time, gaps, busiest kernels.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_decode import CONFIGS, GROUPS, Model, add_loop_args, calibrate, make_layer_fn, time_graph  # noqa: E402
from bench_gemv import Case, copy_bandwidth, env_info, graph_time_us, print_profile, profile_replays  # noqa: E402
from exp_cuda import VARIANTS, use_variant  # noqa: E402

import actsparse.kernels.cuda_gemv as CG  # noqa: E402

PDL_DEFAULT = CG.PDL  # the library's programmatic-dependent-launch default (cuda-nopdl turns it off)

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096)]


@triton.jit
def _read_kernel(x_ptr, out_ptr, n_per, BLOCK: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * n_per
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, n_per, BLOCK):
        acc += tl.load(x_ptr + base + i + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


@triton.jit
def _touch_kernel(y_ptr):
    tl.store(y_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), 0.0)


def _event_time_s(fn, reps=10):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return statistics.median(times)


def read_bandwidth() -> tuple[float, dict]:
    """GB/s of a streaming read of 1 GiB of bf16 (best grid), and each grid's figure."""
    n = 1 << 29
    x = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    per_grid = {}
    for programs in (264, 528, 1056, 2048, 4096, 8192):
        n_per = n // programs // 4096 * 4096
        out = torch.empty(programs, dtype=torch.float32, device="cuda")
        t = _event_time_s(lambda p=programs, o=out, m=n_per: _read_kernel[(p,)](x, o, m, BLOCK=4096, num_warps=8))
        per_grid[programs] = programs * n_per * 2 / t / 1e9
    per_grid["torch.sum"] = n * 2 / _event_time_s(lambda: x.sum(dtype=torch.float32)) / 1e9
    return max(per_grid.values()), per_grid


def launch_floor_us(grid=(56, 4), calls=200) -> float:
    """Graph-replay time per launch of an empty kernel (one store per program) with a GEMV-sized grid."""
    y = torch.empty(grid[0] * grid[1], dtype=torch.float32, device="cuda")
    return graph_time_us(lambda i: _touch_kernel[grid](y), calls)


def gemv_ceilings(read_gbs: float, floor_us: float, backends=("triton",)) -> list[dict]:
    """Each shape x weights: dense graph-timed and do_bench-timed, then each backend's kernel at 0/50/70%."""
    rows = []
    for k, n in SHAPES:
        for name, dtype, q in (
            ("fp16", torch.float16, None),
            ("bf16", torch.bfloat16, None),
            ("int8", torch.bfloat16, "int8"),
        ):
            dense = dense_db = None
            for backend in backends:
                case = Case(k, n, dtype, q, backend=backend)
                case.check()
                if dense is None:  # one dense measurement per shape and weights, shared by the backends
                    dense, dense_db = case.time_dense(), case.time_dense_dobench()
                for s in (0.0, 0.5, 0.7):
                    rows.append(ceiling_row(case, name, s, dense, dense_db, read_gbs, floor_us))
                del case
                torch.cuda.empty_cache()
    return rows


def ceiling_row(case, name, s, dense, dense_db, read_gbs, floor_us) -> dict:
    k, n, q, backend = case.k, case.n, case.quantize, case.backend
    kept = case.set_sparsity(s)
    ours = case.time_sparse()
    read_bytes = kept * case.wbytes_row + 2 * (k + n) + (8 * n if q else 0)
    ideal = read_bytes / (read_gbs * 1e3)  # µs at read bandwidth
    row = dict(
        k=k,
        n=n,
        weights=name,
        backend=backend,
        sparsity=s,
        dense_us=dense,
        dense_dobench_us=dense_db,
        ours_us=ours,
        ideal_us=ideal,
        ideal_plus_launch_us=ideal + floor_us,
        ours_ratio=dense / ours,
        ceiling_ratio=dense / ideal,
        ceiling_ratio_launch=dense / (ideal + floor_us),
        ceiling_ratio_dobench=dense_db / ideal,
        dense_pct_read=100 * (k * n * case.x[0].element_size()) / (dense * 1e3) / read_gbs,
    )
    row["pct_of_launch_ceiling"] = 100 * row["ours_ratio"] / row["ceiling_ratio_launch"]
    print(
        f"{k:>5}x{n:<6} {name:>5} {s:>4.0%}: dense {dense:5.1f} us (do_bench {dense_db:5.1f}, "
        f"{row['dense_pct_read']:4.0f}% of read bw)  {backend:>6} {ours:5.1f} (x{row['ours_ratio']:.2f})  "
        f"ideal {ideal:5.1f} (x{row['ceiling_ratio']:.2f}; +launch x{row['ceiling_ratio_launch']:.2f}, "
        f"ours at {row['pct_of_launch_ceiling']:.0f}% of it)",
        flush=True,
    )
    return row


class BoundsModel(Model):
    """bench_decode's model with a third variant, ``"null"``: every linear returns a fixed tensor."""

    def add_null(self):
        d, hd = self.cfg["dim"], self.cfg["dim"] // self.cfg["heads"]
        outs = {"qkv": d + 2 * self.cfg["kv_heads"] * hd, "o": d, "gate_up": 2 * self.cfg["inter"], "down": d}
        for L in self.layers:
            L.null = {g: torch.randn(1, 1, o, device="cuda", dtype=self.dtype) for g, o in outs.items()}

        def null_linear(h, lin, group):  # keeps the dependency on h (the norm still runs), no GEMV kernel
            return (lin[group] + h[..., :1] * 0,)

        self.fns["null"] = make_layer_fn(self.cfg, False, None, linear_fn=null_linear)

    def lin(self, L, variant):
        return L.null if variant == "null" else super().lin(L, variant)


def weight_bytes(cfg, dtype_bytes=2):
    d, i, hd = cfg["dim"], cfg["inter"], cfg["dim"] // cfg["heads"]
    kv = cfg["kv_heads"] * hd
    return {
        "qkv": d * (d + 2 * kv) * dtype_bytes,
        "o": d * d * dtype_bytes,
        "gate_up": d * 2 * i * dtype_bytes,
        "down": i * d * dtype_bytes,
    }


def kept_bytes(model, stats, wb):
    """Weight bytes the kernels read at the current thresholds (kept fraction of each layer's inputs)."""
    total = 0.0
    for li, L in enumerate(model.layers):
        for g in GROUPS:
            thr = L.packed[g].threshold[0].to(model.dtype).float()
            kept = (stats[li][g].to(model.dtype).float() > thr).float().mean().item()
            total += kept * wb[g]
    return total


def profile_graph(g, model, start_pos, steps=4) -> dict:
    """Kernels of ``steps`` replays of the loop's graph ``g`` from ``start_pos`` (see ``profile_replays``)."""

    def replay():
        model.pos.fill_(start_pos)
        g.replay()

    return profile_replays(replay, steps)


def profiled_fixed_cost(sparse100: dict, no_gemvs: dict) -> dict:
    """The 100%-sparse step's fixed cost per GEMV as the profiler sees it, next to the subtraction above.

    ``(sparse 100% - no GEMVs) / n`` also counts what the GEMVs cost their neighbours: without an opaque GEMV
    between them inductor fuses the norm, the stand-in projection and the rotary into fewer kernels. Here: the
    GEMV kernels' own mean duration, the mean gap between kernels, and the other kernels per step with and
    without GEMVs (from :func:`bench_gemv.profile_replays` results)."""
    g = sparse100["kinds"].get("sparse GEMV", {"per_step": 0, "us_per_step": 0.0})
    return dict(
        gemv_kernel_us=g["us_per_step"] / max(g["per_step"], 1),
        gap_us=sparse100["gap_us_per_kernel"],
        kernels_besides_gemvs=sparse100["kernels_per_step"] - g["per_step"],
        kernels_without_gemvs=no_gemvs["kernels_per_step"],
    )


def _base(backend: str) -> str:
    """The kernel of a --backends entry (cuda-nopdl, cuda@legacy, cuda-nopdl@legacy: cuda)."""
    return backend.partition("@")[0].removesuffix("-nopdl")


def decode_bounds(name, read_gbs, floor_us, sparsities, args):
    torch._dynamo.reset()  # every variant compiles the same layer code: keep each model under the recompile limit
    cfg = CONFIGS[name]
    model = BoundsModel(cfg, args.max_seq)
    model.pos.fill_(args.start_pos)
    stats = calibrate(model)
    model.pack(backend=_base(args.backends[0]))
    model.add_null()
    model.compile()
    wb = weight_bytes(cfg)
    gemv_bytes = cfg["layers"] * sum(wb.values())
    n_gemv = cfg["layers"] * len(GROUPS)
    t0 = time.time()
    g_dense, run_dense = time_graph(model, False, args.start_pos)
    dense = run_dense()
    g_null, run_null = time_graph(model, "null", args.start_pos)
    null = run_null()
    print(
        f"[{name}] graphs captured in {time.time() - t0:.0f}s: dense {dense:.3f} ms, no GEMVs {null:.3f} ms", flush=True
    )
    res = dict(
        model=name,
        dense_ms=dense,
        no_gemv_ms=null,
        gemv_bytes=gemv_bytes,
        n_gemv=n_gemv,
        dense_gemv_ms=dense - null,
        dense_gemv_pct_read=100 * gemv_bytes / ((dense - null) * 1e-3) / (read_gbs * 1e9),
        by_reduce={},
    )
    profiles = {}
    if args.profile:
        profiles["dense"] = profile_graph(g_dense, model, args.start_pos)
        profiles["no GEMVs"] = profile_graph(g_null, model, args.start_pos)
    # every split-K reduction with every backend; the first is the main result, the others same-run ablations
    variants = [(m, b, f) for f in args.fused for b in args.backends for m in args.reduce]
    for mode, backend, fused in variants:
        base, build = _base(backend), backend.partition("@")[2]  # cuda@legacy: the graph captures that build
        CG.PDL = PDL_DEFAULT and not backend.partition("@")[0].endswith("-nopdl")
        if model.packed_as != (None, base):
            model.pack(backend=base)
        use_variant(build, torch.device("cuda"))
        model.set_reduce(mode, fused=fused == "on")
        model.compile()
        g_sparse, run_sparse = time_graph(model, True, args.start_pos)
        tag = f"{backend}/fused-{fused}" if len(args.fused) > 1 or fused == "on" else backend
        for L in model.layers:
            for g in GROUPS:
                L.packed[g].threshold.fill_(math.inf)
        full = run_sparse()
        sub = dict(sparse100_ms=full, fixed_us_per_gemv=(full - null) * 1e3 / n_gemv, rows=[])
        print(
            f"[{name}] reduce={mode} backend={tag}: GEMVs in the dense step {dense - null:.3f} ms = "
            f"{res['dense_gemv_pct_read']:.0f}% of read bw; ours at 100%: {full:.3f} ms -> "
            f"{sub['fixed_us_per_gemv']:.2f} us fixed per GEMV ({n_gemv} GEMVs)",
            flush=True,
        )
        if args.profile:
            profiles[f"sparse 100% ({mode}/{tag})"] = pr = profile_graph(g_sparse, model, args.start_pos)
            sub.update(profiled_fixed_cost(pr, profiles["no GEMVs"]))
            print(
                f"[{name}] reduce={mode} backend={tag}: profiled at 100%, {sub['gemv_kernel_us']:.2f} us per GEMV "
                f"kernel + {sub['gap_us']:.2f} us gap; {sub['kernels_besides_gemvs']:.0f} other kernels per step where "
                f"the step without GEMVs has {sub['kernels_without_gemvs']:.0f} (the GEMVs as fusion boundaries)",
                flush=True,
            )
        for s in sparsities:
            model.set_sparsity(s, stats)
            ms = run_sparse()
            kb = kept_bytes(model, stats, wb)
            ideal = null + kb / (read_gbs * 1e9) * 1e3
            ideal_launch = ideal + n_gemv * floor_us * 1e-3
            need = dense / 2 - null  # ms the GEMVs may take for 2.0x
            row = dict(
                target=s,
                sparse_ms=ms,
                speedup=dense / ms,
                kept_bytes=kb,
                sparse_gemv_ms=ms - null,
                sparse_gemv_pct_read=100 * kb / ((ms - null) * 1e-3) / (read_gbs * 1e9),
                ceiling=dense / ideal,
                ceiling_launch=dense / ideal_launch,
                pct_read_for_2x=100 * kb / (need * 1e-3) / (read_gbs * 1e9) if need > 0 else math.inf,
            )
            sub["rows"].append(row)
            print(
                f"[{name}] reduce={mode} backend={tag} {s:.0%}: {ms:.3f} ms x{row['speedup']:.2f} (GEMVs {ms - null:.3f} ms, "
                f"{row['sparse_gemv_pct_read']:.0f}% of read bw incl. fixed costs); ceiling x{row['ceiling']:.2f}, "
                f"with one launch floor per GEMV x{row['ceiling_launch']:.2f}; 2.0x needs the GEMVs at "
                f"{row['pct_read_for_2x']:.0f}% of read bw",
                flush=True,
            )
            if args.profile and s == 0.5:
                profiles[f"sparse 50% ({mode}/{tag})"] = profile_graph(g_sparse, model, args.start_pos)
        res["by_reduce"][mode if (backend, fused) == variants[0][1:] else f"{mode}/{tag}"] = sub
        del g_sparse, run_sparse
    use_variant("", torch.device("cuda"))
    res.update(res["by_reduce"][args.reduce[0]])
    res["profiles"] = profiles
    for label, pr in profiles.items():
        print_profile(f"[{name}] {label}", pr)
    del model
    torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_loop_args(ap)
    ap.add_argument("--skip-gemv", action="store_true", help="only the floors and the decode decomposition")
    ap.add_argument("--profile", action="store_true", help="also profile the decode graphs (kernels, gaps)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--reduce", default="kernel", help="split-K reductions to time in the decode loop (bench_decode)")
    ap.add_argument(
        "--fused",
        default="off",
        help="the sparse loop's GEMVs with the Decoder's fusions (RMSNorms and gated input in their loads, residual "
        "adds in their epilogues: bench_decode.make_layer_fn(fused=True)): off, on, or off,on (both, one process)",
    )
    ap.add_argument(
        "--backends",
        default="triton",
        help="sparse GEMV kernels (the GEMV table and the decode loop), comma-separated: triton,cuda; cuda@NAME "
        "(decode loop only): the CUDA kernel built as exp_cuda.py's VARIANTS[NAME], e.g. cuda,cuda@legacy; cuda-nopdl "
        "(decode loop only): without programmatic dependent launch",
    )
    args = ap.parse_args()
    args.reduce = args.reduce.split(",")
    args.backends = args.backends.split(",")
    args.fused = args.fused.split(",")
    if set(args.fused) - {"on", "off"}:
        sys.exit(f"--fused: on, off or off,on, got {','.join(args.fused)}")
    bad = [
        b
        for b in args.backends
        if b not in ("triton", "cuda", "cuda-nopdl")
        and not (_base(b) == "cuda" and "@" in b and b.partition("@")[2] in VARIANTS)
    ]
    if bad:
        sys.exit(
            f"--backends: triton, cuda, cuda-nopdl or cuda@NAME (NAME one of {', '.join(VARIANTS)}), got {', '.join(bad)}"
        )
    if not torch.cuda.is_available():
        sys.exit("bounds needs a CUDA GPU")
    copy = copy_bandwidth()
    read, per_grid = read_bandwidth()
    floor = launch_floor_us()
    print(
        f"copy {copy:.0f} GB/s (read+write), read {read:.0f} GB/s "
        f"({', '.join(f'{k}: {v:.0f}' for k, v in per_grid.items())}), empty launch {floor:.2f} us",
        flush=True,
    )
    out = {
        "env": env_info(),
        "copy_gbs": copy,
        "read_gbs": read,
        "read_by_grid": {str(k): v for k, v in per_grid.items()},
        "launch_floor_us": floor,
        "gemv": [],
        "decode": [],
    }
    if not args.skip_gemv:
        out["gemv"] = gemv_ceilings(read, floor, [b for b in args.backends if b == _base(b)])
    sparsities = [float(v) for v in args.sparsities.split(",")]
    for name in args.models.split(","):
        if name:
            out["decode"].append(decode_bounds(name, read, floor, sparsities, args))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
