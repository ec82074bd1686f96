"""Batch-1 sparse GEMV vs dense cuBLAS (``F.linear``) on the same GPU, in the same run.

    python benchmarks/bench_gemv.py                      # the tables of benchmarks/README.md
    python benchmarks/bench_gemv.py --tune               # sweep launch configs (to set the rule)
    python benchmarks/bench_gemv.py --baseline OLD.py    # also time another kernel module, same run

Timing: each measured call sequence is captured in a CUDA graph (no launch gaps, no Python overhead),
replayed after warm-up, median over replays. Inputs rotate over enough weight copies (> 3× L2) that
every call streams its weights from HBM. Bytes counted for the sparse kernel: kept weight rows + x + y;
for dense: all weights + x + y. Copy bandwidth is measured in the same run (device-to-device copy,
bytes read + written).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import actsparse.kernels as K  # noqa: E402
from actsparse.kernels import cuda_gemv as cg  # noqa: E402
from actsparse.kernels import triton_gemv as tg  # noqa: E402

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336), (14336, 4096)]  # (in K, out N)
SPARSITIES = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def graph_time_us(fn, n_calls: int, replays: int = 15) -> float:
    """Median time per call of ``fn(i)`` for i in range(n_calls), captured once in a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(n_calls):  # warm-up: compile, allocate workspaces
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n_calls):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / n_calls)
    del g
    return statistics.median(times)


# what a decode step's kernels are, by name (the first pattern that matches; the rest is "other")
KERNEL_KINDS = (
    ("sparse GEMV", re.compile(r"sgemv_cluster|^_sparse_gemv_kernel")),
    ("RMSNorm", re.compile(r"^triton_\w*rsqrt")),  # (inductor's, with the residual add fused)
    ("attention", re.compile(r"^_split_kernel|^_combine_kernel|sdpa|flash_fprop|fmha")),
    ("dense GEMM", re.compile(r"nvjet|gemm|cutlass|splitKreduce|gemv2|gemvx")),
)


def kernel_kind(name: str) -> str:
    return next((kind for kind, pattern in KERNEL_KINDS if pattern.search(name)), "other")


def profile_replays(replay, steps: int = 4, top: int = 10) -> dict:
    """Kernels of ``steps`` calls of ``replay`` (a CUDA graph replay: CUPTI sees the kernels inside graphs):
    count, busy time and the gaps between kernels per step, the ``top`` kernel names by time, and count and
    µs per step by kind (:data:`KERNEL_KINDS`)."""
    replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            replay()
        torch.cuda.synchronize()
    ev = sorted(
        (
            e
            for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA
            and e.device_time_total > 0
            and "Memcpy" not in e.name
            and "Memset" not in e.name
        ),
        key=lambda e: e.time_range.start,
    )
    if not ev:
        return {}
    span = ev[-1].time_range.end - ev[0].time_range.start
    busy = sum(e.time_range.end - e.time_range.start for e in ev)
    by_name: dict[str, list] = {}
    for e in ev:
        v = by_name.setdefault(e.name[:80], [0, 0.0])
        v[0] += 1
        v[1] += e.time_range.end - e.time_range.start
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    kinds: dict[str, list] = {}
    for name, (count, t) in by_name.items():
        v = kinds.setdefault(kernel_kind(name), [0, 0.0])
        v[0] += count
        v[1] += t
    return dict(
        kernels_per_step=len(ev) / steps,
        busy_us_per_step=busy / steps,
        span_us_per_step=span / steps,
        gap_us_per_kernel=(span - busy) / max(len(ev) - 1, 1),
        top=[dict(name=k, per_step=c / steps, us_per_step=t / steps, us_each=t / c) for k, (c, t) in ranked],
        kinds={k: dict(per_step=c / steps, us_per_step=t / steps) for k, (c, t) in kinds.items()},
    )


def print_profile(label: str, pr: dict, lines: int = 6) -> None:
    if not pr:
        print(f"  {label}: profiler saw no kernels", flush=True)
        return
    print(
        f"  {label}: {pr['kernels_per_step']:.0f} kernels/step, busy {pr['busy_us_per_step']:.0f} us of "
        f"{pr['span_us_per_step']:.0f} us, {pr['gap_us_per_kernel']:.2f} us gap per kernel",
        flush=True,
    )
    print(
        "      by kind: "
        + ", ".join(f"{k} {v['per_step']:.0f}x {v['us_per_step']:.0f} us" for k, v in pr.get("kinds", {}).items()),
        flush=True,
    )
    for t in pr["top"][:lines]:
        print(
            f"      {t['us_per_step']:8.0f} us/step {t['per_step']:5.0f}x {t['us_each']:6.2f} us  {t['name']}",
            flush=True,
        )


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB (bytes read + written), GB/s: eager launches timed with events
    (a copy captured in a graph becomes a memcpy node that runs slower)."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    a.random_(0, 255)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(10):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.copy_(a)
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e-3)
    return 2 * n / statistics.median(times) / 1e9


BACKENDS = ("triton", "cuda")


class Case:
    """Weight copies + inputs for one (K, N, dtype, quantize) so that calls stream from HBM.

    ``backend`` is the kernel ``time_sparse``/``check`` run by default: ``"triton"`` (the Triton kernel, packed
    in its blocked layout) or ``"cuda"`` (the CUDA C++ kernel at its launch rule, plain layout)."""

    def __init__(self, k, n, dtype, quantize=None, l2_bytes=50e6, seed=0, layout=256, backend="triton"):
        if backend not in BACKENDS:
            raise ValueError(f"backend: one of {BACKENDS}, got {backend!r}")
        if backend == "cuda":
            layout = None
        torch.manual_seed(seed)
        self.k, self.n, self.dtype, self.quantize, self.backend = k, n, dtype, quantize, backend
        self.gemv = cg.sparse_gemv_cuda if backend == "cuda" else tg.sparse_gemv_triton  # (x, packed, cfg, out=)
        wbytes = k * n * (1 if quantize else torch.finfo(dtype).bits // 8)
        self.copies = max(2, math.ceil(3 * l2_bytes / wbytes))
        self.dense = [torch.randn(n, k, dtype=dtype, device="cuda") / math.sqrt(k) for _ in range(self.copies)]
        self.packed = [K.pack([w], quantize=quantize, layout_block=layout) for w in self.dense]
        self.x = [torch.randn(k, dtype=dtype, device="cuda") for _ in range(self.copies)]
        self.wbytes_row = n * (1 if quantize else self.x[0].element_size())

    def set_sparsity(self, s):
        kept = []
        for x, p in zip(self.x, self.packed):
            a = x.float().abs()
            tau = -math.inf if s <= 0 else torch.quantile(a, s).item()
            p.threshold.fill_(tau)
            kept.append(int((a.to(self.dtype) > torch.tensor(tau).to(self.dtype)).sum()) if s > 0 else self.k)
        return statistics.mean(kept)

    def time_sparse(self, cfg=None, calls=None, kernel=None):
        calls = calls or 4 * self.copies
        fn = self.gemv if kernel is None else kernel.sparse_gemv_triton
        y = [torch.empty(p.padded_out, dtype=self.dtype, device="cuda") for p in self.packed]
        return graph_time_us(
            lambda i: fn(self.x[i % self.copies], self.packed[i % self.copies], cfg, out=y[i % self.copies]), calls
        )

    def time_dense(self, calls=None):
        calls = calls or 4 * self.copies
        xs = [x.view(1, -1) for x in self.x]
        return graph_time_us(lambda i: F.linear(xs[i % self.copies], self.dense[i % self.copies]), calls)

    def time_dense_dobench(self):
        """µs per eager ``F.linear`` call by triton's ``do_bench`` (one launch each, L2-warm weights)."""
        import triton

        x2, w2 = self.x[0].view(1, -1), self.dense[0]
        return 1e3 * triton.testing.do_bench(lambda: F.linear(x2, w2), warmup=50, rep=200, return_mode="median")

    def check(self):
        x, p = self.x[0], self.packed[0]
        p.threshold.fill_(torch.quantile(x.float().abs(), 0.5).item())
        y = self.gemv(x, p)
        ref = K.sparse_gemv_reference(x, p)
        err = ((y.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err < 1e-2, f"kernel mismatch {err}"
        return err


def env_info():
    import triton

    p = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "sms": p.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def tune_configs(k, n, sms, quantized):
    """The sweep: tensor-core configs with and without the kept-row list."""
    out = []
    for compact in (True, False):
        for bn in (128, 256):
            for bk in (32, 64):
                for waves in (2, 4):
                    for warps in (4,):
                        for stages in (1, 3):
                            split = max(1, min(math.ceil(waves * sms / (n // bn)), k // (2 * bk)))
                            cfg = tg.GemvConfig(bk, bn, split, warps, stages, True, compact)
                            out.append(
                                (
                                    waves,
                                    tg.GemvConfig(bk, bn, math.ceil(k / cfg.k_per(k)), warps, stages, True, compact),
                                )
                            )
    return out


def tune(args):
    import triton

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for k, n in [(4096, 14336), (14336, 4096)]:
        for name, dtype, q in (("fp16", torch.float16, None), ("int8", torch.bfloat16, "int8")):
            case = Case(k, n, dtype, q)
            case.check()
            td = case.time_dense()
            x2, w = case.x[0].view(1, -1), case.dense[0]
            td_bench = triton.testing.do_bench(
                lambda x2=x2, w=w: F.linear(x2, w), warmup=50, rep=200, return_mode="median"
            )
            for s in (0.0, 0.5):
                kept = case.set_sparsity(s)
                best = {}
                for waves, cfg in tune_configs(k, n, sms, q is not None):
                    try:
                        t = case.time_sparse(cfg)
                    except Exception as e:  # noqa: BLE001
                        print("fail", cfg, repr(e)[:200])
                        continue
                    gbs = (kept * case.wbytes_row) / (t * 1e-6) / 1e9
                    rows.append(
                        dict(
                            k=k,
                            n=n,
                            w=name,
                            s=s,
                            cfg=cfg.__dict__,
                            waves=waves,
                            us=t,
                            gbs=gbs,
                            dense_us=td,
                            dense_dobench_us=td_bench * 1e3,
                        )
                    )
                    if cfg.compact not in best or t < best[cfg.compact][0]:
                        best[cfg.compact] = (t, cfg, gbs, waves)
                for compact, b in best.items():
                    print(
                        f"{k}x{n} {name} s={s} compact={compact}: dense {td:.1f}us (do_bench {td_bench * 1e3:.1f}us) "
                        f"best {b[0]:.1f}us {b[2]:.0f}GB/s waves={b[3]} {b[1]}",
                        flush=True,
                    )
            del case
            torch.cuda.empty_cache()
    return rows


def load_kernel_module(path):
    """A kernel module (a copy of ``triton_gemv.py``, e.g. an older version) loaded from a file path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_triton_gemv", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses and triton.jit look their module up there
    spec.loader.exec_module(mod)
    return mod


def launch_config(case) -> dict:
    """The launch configuration the case's backend picks for its first weight copy."""
    p = case.packed[0]
    if case.backend == "cuda":
        return cg.cuda_config(p, torch.device("cuda")).__dict__
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return tg.choose_config(case.k, p.padded_out, p.weight_t.element_size(), sms).__dict__


def sweep_case(case, name, td, td_bench, err, bw, baseline) -> list[dict]:
    """``case``'s kernel at each of SPARSITIES against dense ``td`` µs: one printed line and one row each."""
    k, n, backend = case.k, case.n, case.backend
    dense_bytes = k * n * case.x[0].element_size() + 2 * (k + n)
    rows = []
    for s in SPARSITIES:
        kept = case.set_sparsity(s)
        t = case.time_sparse()
        sbytes = kept * case.wbytes_row + 2 * (k + n)
        row = dict(
            k=k,
            n=n,
            weights=name,
            backend=backend,
            sparsity=s,
            kept_rows=kept,
            dense_us=td,
            sparse_us=t,
            ratio=td / t,
            sparse_gbs=sbytes / (t * 1e-6) / 1e9,
            dense_gbs=dense_bytes / (td * 1e-6) / 1e9,
            rel_err=err,
            config=launch_config(case),
        )
        row["pct_copy"] = 100 * row["sparse_gbs"] / bw
        row["dense_dobench_us"] = td_bench
        extra = ""
        if baseline is not None and backend == "triton":
            tb = case.time_sparse(kernel=baseline)
            row.update(before_us=tb, before_ratio=td / tb, before_pct_copy=100 * sbytes / (tb * 1e-6) / 1e9 / bw)
            extra = f" {tb:>9.1f} {td / tb:>6.2f}"
        rows.append(row)
        print(
            f"{k:>5}x{n:<6} {name:>5} {backend:>6} {s:>4.1f} {td:>9.1f} {t:>9.1f} {td / t:>6.2f} "
            f"{row['sparse_gbs']:>6.0f} {row['pct_copy']:>5.1f}%{extra}",
            flush=True,
        )
    return rows


def bench(args):

    baseline = load_kernel_module(args.baseline) if args.baseline else None
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw:.0f} GB/s", flush=True)
    results = {"env": env_info(), "copy_gbs": bw, "rows": [], "baseline": args.baseline}
    variants = [("fp16", torch.float16, None), ("bf16", torch.bfloat16, None), ("int8", torch.bfloat16, "int8")]
    print(
        f"{'shape KxN':>12} {'w':>5} {'kernel':>6} {'sp':>4} {'dense us':>9} {'sparse us':>9} {'ratio':>6} {'GB/s':>6} {'%copy':>6}"
        + (f" {'before us':>9} {'ratio':>6}" if baseline is not None else "")
    )
    shapes = [tuple(map(int, sh.split("x"))) for sh in args.shapes.split(",")] if args.shapes else SHAPES
    for k, n in shapes:
        for name, dtype, q in variants:
            if name not in args.variants:
                continue
            td = td_bench = None
            for backend in args.backends:
                case = Case(k, n, dtype, q, backend=backend)
                err = case.check()
                if td is None:  # dense once per shape and weights: every backend's ratio against the same number
                    td, td_bench = case.time_dense(), case.time_dense_dobench()
                results["rows"].extend(sweep_case(case, name, td, td_bench, err, bw, baseline))
                del case
                torch.cuda.empty_cache()
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--variants", default="fp16,bf16,int8")
    ap.add_argument("--shapes", default=None, help="comma list of KxN (default: the five of the tables)")
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument("--baseline", default=None, help="also time the Triton kernel module at this path (before/after)")
    ap.add_argument("--backends", default="triton,cuda", help="sparse kernels to time, comma-separated: triton,cuda")
    args = ap.parse_args()
    args.backends = args.backends.split(",")
    if set(args.backends) - set(BACKENDS) or not args.backends:
        sys.exit(f"--backends: comma-separated {', '.join(BACKENDS)}; got {','.join(args.backends)}")
    if not torch.cuda.is_available():
        sys.exit("bench_gemv needs a CUDA GPU")
    res = tune(args) if args.tune else bench(args)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
