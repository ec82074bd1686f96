"""Issue 17, direction 3 measured before building it into the library: a CUDA C++ sparse GEMV (cuda/sgemv.cu).

    python benchmarks/exp_cuda.py               # ≈2 min on an H200 (nvcc build included); $OUT/exp_cuda.json
    python benchmarks/exp_cuda.py --variants    # the library kernel's build variants; $OUT/exp_cuda_variants.json
    python benchmarks/exp_cuda.py --variants default,minblocks5    # only these of them
    python benchmarks/exp_cuda.py --sweep 4096x6144,4096x28672   # the library kernel's tiles x clusters
    python benchmarks/exp_cuda.py --int8    # int8 codes: the CUDA kernel vs the Triton one vs bf16 cuBLAS
    python benchmarks/exp_cuda.py --int8 --variants default,pipe-int8   # --sweep/--variants of int8 codes

The kernel (see the .cu file's header): in-block compaction from one round of x loads, 16-byte streaming loads
of the kept rows with U loads in flight per thread, and the split-K reduction through a thread-block
cluster's distributed shared memory (deterministic, no workspace, no counters). Built with nvcc into a shared
library, called through ctypes on torch's current stream (captured in the CUDA graph like any launch).

Columns, graph-timed µs per call, bf16, plain ``[K, N]`` layout, random weights, ``x`` thresholded at the
quantile ``s`` of ``|x|``: ``dense`` F.linear (cuBLAS), ``rule`` the library's Triton kernel, ``library`` the library's CUDA kernel
(actsparse/kernels/csrc/sgemv.cu, its launch rule), then each experimental CUDA
configuration ``bn/u/cl/red[/pdl]`` (columns per block, loads in flight per thread, blocks per cluster =
split-K, the cluster reduction, programmatic dependent launch between the timed calls).
Every configuration is checked against the torch reference at 0%, 50% and 100% first.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import json
import math
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_gemv import Case, env_info, graph_time_us  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME  # noqa: E402

from actsparse.kernels import cuda_gemv as CG  # noqa: E402
from actsparse.kernels import sparse_gemv_reference  # noqa: E402

SHAPES = [(4096, 12288), (4096, 22016), (4096, 4096), (11008, 4096), (14336, 4096)]
INT8_SHAPES = [(4096, 12288), (4096, 22016), (11008, 4096)]
SPARSITIES = (1.0, 0.7, 0.5, 0.0)
SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda", "sgemv.cu")


def build() -> tuple[ctypes.CDLL, str]:
    nvcc = os.path.join(CUDA_HOME or "/usr/local/cuda", "bin", "nvcc")
    so = os.path.join(tempfile.mkdtemp(), "sgemv.so")
    cmd = [nvcc, "-O3", "-std=c++17", "-arch=sm_90a", "-shared", "-Xcompiler", "-fPIC", "-Xptxas", "-v", "-o", so, SRC]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"nvcc failed:\n{r.stderr}")
    lib = ctypes.CDLL(so)
    lib.sgemv.restype = ctypes.c_int
    lib.sgemv.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 7 + [ctypes.c_void_p]
    ver = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    regs = [ln.strip() for ln in r.stderr.splitlines() if "registers" in ln]
    sass(so)
    return lib, ver + " | " + " ; ".join(regs[:12])


def configs(k: int, n: int) -> list[tuple[int, int, int, int, int]]:
    """(bn, u, cl, red, pdl): every tile/split with a sensible block count, u = 4 and 8 with the push
    reduction, and at u = 4 the pull reduction and PDL for comparison."""
    out = []
    for bn in (64, 128, 256):
        for cl in (2, 4, 8, 16):
            if math.ceil(k / cl) > 2048 or n % bn or bn % cl:
                continue
            if not 128 <= n // bn * cl <= 1100:
                continue
            out += [(bn, 4, cl, 1, 0), (bn, 8, cl, 1, 0), (bn, 4, cl, 0, 0), (bn, 4, cl, 1, 1)]
    return out


def label(c: tuple[int, int, int, int, int]) -> str:
    return f"{c[0]}/{c[1]}/{c[2]}/{'push' if c[3] else 'pull'}{'/pdl' if c[4] else ''}"


def sass(so: str) -> None:
    """SASS of one kernel to $OUT (to see whether the U loads issue back to back), where cuobjdump exists."""
    tool = os.path.join(CUDA_HOME or "/usr/local/cuda", "bin", "cuobjdump")
    if os.path.exists(tool):
        r = subprocess.run([tool, "-sass", so], capture_output=True, text=True)
        with open(os.path.join(os.environ.get("OUT", "."), "sgemv.sass"), "w") as f:
            f.write(r.stdout)


def _check_library(case) -> None:
    ref = sparse_gemv_reference(case.x[0], case.packed[0]).double()
    got = CG.sparse_gemv_cuda(case.x[0], case.packed[0]).double()
    err = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item() if ref.norm() > 0 else got.abs().max().item()
    assert err < 1e-2, (case.k, case.n, err)


def shape_row(call, k: int, n: int) -> dict:
    case = Case(k, n, torch.bfloat16, layout=None)
    m = case.copies
    ys = [torch.empty(p.weight_t.shape[1], dtype=torch.bfloat16, device="cuda") for p in case.packed]
    cfgs = configs(k, n)
    for s in (0.5, 0.0, 1.0):
        case.set_sparsity(s)
        ref = sparse_gemv_reference(case.x[0], case.packed[0]).double()
        for c in cfgs:
            ys[0].fill_(float("nan"))
            call(case.x[0], case.packed[0], ys[0], *c)
            torch.cuda.synchronize()
            got = ys[0].double()
            err = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item() if s < 1 else got.abs().max().item()
            assert err < 1e-2, (k, n, s, c, err)
    lib_cfg = CG.cuda_config(case.packed[0], torch.device("cuda"))
    row = {"k": k, "n": n, "dense": case.time_dense(), "library_config": str(lib_cfg)}
    for s in SPARSITIES:
        case.set_sparsity(s)
        row[f"rule@{s}"] = case.time_sparse()
        _check_library(case)
        row[f"library@{s}"] = _time_library(case, ys, None)
        for c in cfgs:
            row[f"{label(c)}@{s}"] = graph_time_us(
                lambda i, c=c: call(case.x[i % m], case.packed[i % m], ys[i % m], *c), 4 * m
            )
    return row


VARIANTS = {  # the library source built with its benchmark-only switches (csrc/sgemv.cu)
    "default": (),
    "minblocks4": ("-DACTSPARSE_MIN_BLOCKS=4",),
    "minblocks5": ("-DACTSPARSE_MIN_BLOCKS=5",),
    "pipe": ("-DACTSPARSE_PIPELINE=1",),
    "pipe+minblocks4": ("-DACTSPARSE_PIPELINE=1", "-DACTSPARSE_MIN_BLOCKS=4"),
    # the default is 8 adjacent inputs per thread with a scan-built kept list (VEC_X) and partials by st.async
    # onto the owner's mbarrier (MBAR_REDUCE); these builds take either or both back to what came before
    "ballots": ("-DACTSPARSE_VEC_X=0",),  # thread t holds inputs t, t + 256, ...; warp ballots, a table of counts
    "cluster-sync": ("-DACTSPARSE_MBAR_REDUCE=0",),  # DSMEM stores, then a cluster barrier
    "legacy": ("-DACTSPARSE_VEC_X=0", "-DACTSPARSE_MBAR_REDUCE=0"),  # both (the kernel before 2026-12-07, third)
    # PDL (when a launch asks for it): the successor launches at the kernel's start instead of after its stream
    "pdl-early": ("-DACTSPARSE_PDL_EARLY=1",),
    # int8 codes only (measure with --int8): 16 conversions and FMAs per 16-byte load, so more work between loads
    "pipe-int8": ("-DACTSPARSE_PIPELINE_INT8=1",),
    "u12-int8": ("-DACTSPARSE_U_INT8=12",),
    "u16-int8": ("-DACTSPARSE_U_INT8=16",),
    # codes to fp32 by I2F in place of the FADD (the bytes are still extracted); 168-178 registers: 1 block per SM
    "i2f-int8": ("-DACTSPARSE_INT8_CVT=1",),
    "i2f-int8-mb2": ("-DACTSPARSE_INT8_CVT=1", "-DACTSPARSE_MIN_BLOCKS=2"),  # capped for 2 blocks per SM
    "i2f-half-int8": ("-DACTSPARSE_INT8_CVT=2",),  # half of them each way (two pipes)
}


def build_library(name: str, flags: tuple[str, ...]):
    """The library source (csrc/sgemv.cu) built with ``flags``: its ``actsparse_sgemv`` entry point."""
    nvcc = os.path.join(CUDA_HOME or "/usr/local/cuda", "bin", "nvcc")
    major, minor = torch.cuda.get_device_capability()
    so = os.path.join(tempfile.mkdtemp(), "lib.so")
    cmd = [nvcc, *CG._FLAGS, f"-arch=sm_{major}{minor}", "-Xptxas", "-v", *flags, "-o", so, str(CG.SOURCE)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr)
    regs = sorted({ln.split("Used ")[1].split(" registers")[0] for ln in r.stderr.splitlines() if "Used " in ln})
    print(f"variant {name}: registers {','.join(regs)}", flush=True)
    lib = ctypes.CDLL(so)
    lib.actsparse_sgemv.restype = ctypes.c_int
    lib.actsparse_sgemv.argtypes = CG._ARGTYPES
    return lib.actsparse_sgemv


def library_variants(names: list[str], quantize: str | None = None) -> list[dict]:
    """The library kernel at its launch rule's config, built with each of ``names`` (keys of VARIANTS; PDL as the
    library launches it, ``cuda_gemv.PDL``, and also on for the default build and the pdl-* builds), graph-timed at 100%, 50% and 0%;
    checked against the reference first: a variant that misses it is reported (``error@s``) and not timed.
    ``quantize="int8"``: int8 codes (bf16 activations) on the three large shapes, ``dense`` still bf16 cuBLAS."""
    with concurrent.futures.ThreadPoolExecutor() as pool:  # (nvcc runs one process per build: in parallel)
        fns = dict(zip(names, pool.map(lambda name: build_library(name, VARIANTS[name]), names)))
    rows = []
    for k, n in INT8_SHAPES if quantize else SHAPES:
        case, ys = _case(k, n, quantize)
        cfg = CG.cuda_config(case.packed[0], torch.device("cuda"))
        row = {"k": k, "n": n, "config": str(cfg), "dense": _dense_us(case)}
        for s in (1.0, 0.5, 0.0):
            case.set_sparsity(s)
            ref = sparse_gemv_reference(case.x[0], case.packed[0]).double()
            for name, fn in fns.items():
                for pdl in (True, False) if name == "default" or name.startswith("pdl") else (CG.PDL,):
                    c = CG.CudaConfig(cfg.block_n, cfg.cluster, pdl)
                    use_build(fn, torch.device("cuda"))
                    got = CG.sparse_gemv_cuda(case.x[0], case.packed[0], c).double()
                    err = ((got - ref).norm() / ref.norm()).item() if s < 1 else got.abs().max().item()
                    if not err < 1e-2:
                        row[f"error@{s}"] = f"{name}: relative error {err:.3g}"
                        print(f"{k}x{n} s={s} {name}: relative error {err:.3g}, not timed", flush=True)
                        continue
                    row[f"{name}{'' if pdl else '/nopdl'}@{s}"] = _time_library(case, ys, c)
        use_build(None, torch.device("cuda"))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _time_library(case, ys, config) -> float:
    """Graph-timed µs per call of the library's CUDA kernel over ``case``'s weight copies (outputs into ``ys``)."""
    m = case.copies
    return graph_time_us(lambda i: CG.sparse_gemv_cuda(case.x[i % m], case.packed[i % m], config, out=ys[i % m]), 4 * m)


def _case(k: int, n: int, quantize: str | None = None):
    """bf16 activations, weights of bf16 or ``quantize``'s codes, plain layout; and an output per weight copy."""
    case = Case(k, n, torch.bfloat16, quantize=quantize, layout=None)
    return case, [torch.empty(p.weight_t.shape[1], dtype=torch.bfloat16, device="cuda") for p in case.packed]


def _dense_us(case) -> float:
    """bf16 cuBLAS on ``case``'s shape, over copies enough to stream from HBM (an int8 case keeps bf16 copies of
    its weights too: at least as many as a bf16 case would)."""
    return case.time_dense()


def library_sweep(shapes: list[tuple[int, int]], quantize: str | None = None) -> list[dict]:
    """The library kernel (its own build) at every (block_n, cluster) it takes on ``shapes``, PDL off, against
    its launch rule's choice and dense (bf16 cuBLAS): graph-timed µs at 100%, 50% and 0%; ``quantize="int8"``:
    of int8 codes."""
    rows = []
    for k, n in shapes:
        case, ys = _case(k, n, quantize)
        rule = CG.cuda_config(case.packed[0], torch.device("cuda"))
        row = {"k": k, "n": n, "rule": f"{rule.block_n}/{rule.cluster}", "dense": _dense_us(case)}
        cfgs = [
            CG.CudaConfig(bn, cl)
            for bn in CG.BLOCK_NS
            for cl in (1, 2, 4, 8, 16)
            if math.ceil(k / cl) <= CG.ROWS_PER_BLOCK and n % bn == 0 and bn % cl == 0 and 64 <= n // bn * cl <= 1100
        ]
        for s in (1.0, 0.5, 0.0):
            case.set_sparsity(s)
            _check_library(case)
            for c in cfgs:
                row[f"{c.block_n}/{c.cluster}@{s}"] = _time_library(case, ys, c)
        print(json.dumps(row), flush=True)
        rows.append(row)
    for r in rows:
        for s in (1.0, 0.5, 0.0):
            c = sorted((v, key.split("@")[0]) for key, v in r.items() if key.endswith(f"@{s}"))
            print(
                f"{r['k']}x{r['n']} s={s} dense {r['dense']:.2f} rule {r['rule']} {r[r['rule'] + f'@{s}']:.2f} | "
                + " ".join(f"{name}={v:.2f}" for v, name in c)
            )
    return rows


class _Lib:
    """Stands in for the library's loaded CDLL: the same entry point from another build."""

    def __init__(self, fn):
        self.actsparse_sgemv = fn


@functools.cache
def variant_build(name: str):
    """The entry point of the library source built as ``VARIANTS[name]`` (built once per process)."""
    return build_library(name, VARIANTS[name])


def use_variant(name: str, device: torch.device) -> None:
    """:func:`use_build` of ``VARIANTS[name]``; ``""``: the library's own build."""
    use_build(variant_build(name) if name else None, device)


def use_build(fn, device: torch.device) -> None:
    """From now on the library's CUDA GEMV calls on ``device`` launch ``fn`` (an entry point from
    :func:`build_library`); ``None``: the library's own build again (reloaded from its cache)."""
    arch = CG._arch(device)
    if fn is None:
        CG._LIBS.pop(arch, None)
    else:
        CG._LIBS[arch] = _Lib(fn)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("exp_cuda needs a CUDA GPU")
    quantize = "int8" if "--int8" in sys.argv else None  # with --sweep or --variants: int8 codes
    suffix = "_int8" if quantize else ""
    if "--sweep" in sys.argv:  # --sweep 4096x6144,4096x28672
        shapes = [tuple(int(v) for v in sh.split("x")) for sh in sys.argv[sys.argv.index("--sweep") + 1].split(",")]
        rows = library_sweep(shapes, quantize)  # type: ignore[arg-type]
        with open(os.path.join(os.environ.get("OUT", "."), f"exp_cuda_sweep{suffix}.json"), "w") as f:
            json.dump({"env": env_info(), "rows": rows}, f, indent=1)
        return
    if "--variants" in sys.argv:  # --variants [default,early,...] (all of VARIANTS without a list)
        i = sys.argv.index("--variants") + 1
        every = [v for v in VARIANTS if quantize or not v.endswith(("-int8", "-int8-mb2"))]  # (int8-only builds)
        names = sys.argv[i].split(",") if i < len(sys.argv) and not sys.argv[i].startswith("-") else every
        bad = [v for v in names if v not in VARIANTS]
        if bad or "default" not in names:
            sys.exit(f"--variants: unknown {bad} or no 'default' (choose from {', '.join(VARIANTS)})")
        rows = library_variants(names, quantize)
        names = [key.split("@")[0] for key in rows[0] if key.endswith("@1.0")]
        print(f"{'K x N':>13} {'s':>4} {'dense':>7} " + " ".join(f"{v:>15}" for v in names))
        for r in rows:
            for s in (1.0, 0.5, 0.0):
                vals = " ".join(f"{r[f'{v}@{s}']:15.2f}" for v in names)
                print(f"{r['k']:>6}x{r['n']:<6} {s:>4} {r['dense']:7.2f} {vals}")
        with open(os.path.join(os.environ.get("OUT", "."), f"exp_cuda_variants{suffix}.json"), "w") as f:
            json.dump({"env": env_info(), "rows": rows}, f, indent=1)
        return
    if "--int8" in sys.argv:  # int8 weights (asymmetric): the CUDA kernel vs the Triton one vs bf16 cuBLAS
        rows = []
        for k, n in INT8_SHAPES:
            case = Case(k, n, torch.bfloat16, quantize="int8", layout=None)
            m = case.copies
            ys = [torch.empty(p.weight_t.shape[1], dtype=torch.bfloat16, device="cuda") for p in case.packed]
            row = {"k": k, "n": n, "dense_bf16": Case(k, n, torch.bfloat16, layout=None).time_dense()}
            for s in (1.0, 0.5, 0.0):
                case.set_sparsity(s)
                _check_library(case)
                row[f"triton@{s}"] = case.time_sparse()
                row[f"cuda@{s}"] = graph_time_us(
                    lambda i, xs=case.x, ps=case.packed, ys=ys, m=m: CG.sparse_gemv_cuda(
                        xs[i % m], ps[i % m], out=ys[i % m]
                    ),
                    4 * m,
                )
            print(json.dumps(row), flush=True)
            rows.append(row)
        with open(os.path.join(os.environ.get("OUT", "."), "exp_cuda_int8.json"), "w") as f:
            json.dump({"env": env_info(), "rows": rows}, f, indent=1)
        return
    lib, nvcc_info = build()
    print(nvcc_info, flush=True)

    def call(x, p, y, bn, u, cl, red, pdl):
        e = lib.sgemv(
            x.data_ptr(), p.threshold.data_ptr(), p.weight_t.data_ptr(), y.data_ptr(), x.numel(),
            p.weight_t.shape[1], bn, u, cl, red, pdl, torch.cuda.current_stream().cuda_stream,
        )  # fmt: skip
        if e != 0:
            raise RuntimeError(f"sgemv launch error {e} ({label((bn, u, cl, red, pdl))})")

    rows = []
    for k, n in SHAPES:
        rows.append(shape_row(call, k, n))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()

    print(
        f"{'K x N':>13} {'s':>4} {'dense':>7} {'rule':>7} {'library':>7} {'best':>7} {'config':>16} {'no-pdl':>7} "
        f"{'config':>16}"
    )
    for r in rows:
        for s in SPARSITIES:
            cands = [(v, key.split("@")[0]) for key, v in r.items() if key.endswith(f"@{s}") and "/" in key]
            best, nopdl = min(cands), min(c for c in cands if "pdl" not in c[1])
            print(
                f"{r['k']:>6}x{r['n']:<6} {s:>4} {r['dense']:7.2f} {r[f'rule@{s}']:7.2f} {r[f'library@{s}']:7.2f} "
                f"{best[0]:7.2f} {best[1]:>16} "
                f"{nopdl[0]:7.2f} {nopdl[1]:>16}"
            )
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "exp_cuda.json"), "w") as f:
        json.dump({"env": env_info(), "nvcc": nvcc_info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
