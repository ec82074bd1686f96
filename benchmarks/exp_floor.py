"""Issue 17: where the CUDA kernel's fixed cost per GEMV goes, by probe kernels with its launch shape.

    python benchmarks/exp_floor.py     # ≈1 min on an H200; $OUT/exp_floor.json

At 100% sparsity the library kernel streams no weights, yet costs 3.2-8.4 µs per call (more blocks, more
µs: results/exp_cuda_sweep_llama3_h200.json). For each GEMV shape of Llama-2-7B / Llama-3-8B at the library's
launch rule config (grid N/BN x cluster, 256 threads), the same grid runs probe kernels that each add one part
of the kernel's prologue/epilogue, graph-timed in µs per call:

* ``empty``: no cluster, nothing (the launch and drain of that grid);
* ``cluster``: a cluster launch of the same grid, nothing (cluster scheduling);
* ``cluster-sync``: + one cluster barrier;
* ``x-test``: no cluster; each block loads its K-slice of x (8 values per thread, as the kernel), tests them
  against a threshold, counts kept rows by warp ballots, two block barriers (the kernel's compaction);
* ``x-test+push``: ``x-test`` in a cluster, + the DSMEM push of one value per thread and a cluster barrier;
* ``x-load``: no cluster; each block loads its K-slice of x and one thread writes their sum (the load latency
  without the compaction's ballots and barriers);
* ``cluster+x-test``: ``x-test`` launched as clusters (no push, no cluster barrier);
* ``library``: the library kernel at 100% sparsity.

Each twice: back to back (``…``), and after a small pointwise torch kernel as in a decode step
(``…/chained``: the pair's time minus the pointwise kernel's alone), since the decode loop's fixed cost (5.5 µs)
is ≈1.3 µs above the back-to-back one.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_gemv import Case, env_info, graph_time_us  # noqa: E402

from actsparse.kernels import cuda_gemv as CG  # noqa: E402

SHAPES = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096), (4096, 6144), (4096, 28672), (14336, 4096)]
PROBES = ("empty", "cluster", "cluster-sync", "x-test", "x-test+push", "x-load", "cluster+x-test")

SOURCE = r"""
#include <cooperative_groups.h>
#include <cuda_bf16.h>
namespace cg = cooperative_groups;
constexpr int NT = 256, JMAX = 8;

template <int KIND>
__global__ void __launch_bounds__(NT) probe(const __nv_bfloat16* x, float* y, int K, int k_per, float tau) {
  if constexpr (KIND == 2) cg::this_cluster().sync();
  if constexpr (KIND == 5) {
    const int k_lo = blockIdx.y * k_per, k_hi = min(k_lo + k_per, K);
    float v = 0.f;
#pragma unroll
    for (int j = 0; j < JMAX; ++j) {
      const int k = k_lo + j * NT + threadIdx.x;
      v += k < k_hi ? __bfloat162float(x[k]) : 0.f;
    }
    if (v == 12345.f) y[threadIdx.x] = v;  // keeps the loads alive; never true on the probe's x
    if (threadIdx.x == 0) y[blockIdx.x % 4096] = 1.f;
  }
  if constexpr (KIND == 3 || KIND == 4) {
    __shared__ int cnt[JMAX][NT / 32];
    __shared__ float slots[NT];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int k_lo = blockIdx.y * k_per, k_hi = min(k_lo + k_per, K);
    float xv[JMAX];
#pragma unroll
    for (int j = 0; j < JMAX; ++j) {
      const int k = k_lo + j * NT + threadIdx.x;
      xv[j] = k < k_hi ? __bfloat162float(x[k]) : 0.f;
    }
#pragma unroll
    for (int j = 0; j < JMAX; ++j) {
      const int k = k_lo + j * NT + threadIdx.x;
      const unsigned m = __ballot_sync(0xffffffffu, k < k_hi && !(fabsf(xv[j]) <= tau));
      if (lane == 0) cnt[j][warp] = __popc(m);
    }
    __syncthreads();
    int total = 0;
#pragma unroll
    for (int j = 0; j < JMAX; ++j)
      for (int q = 0; q < NT / 32; ++q) total += cnt[j][q];
    __syncthreads();
    float v = (float)total;
    if constexpr (KIND == 4) {
      cg::cluster_group cl = cg::this_cluster();
      cl.sync();
      cl.map_shared_rank(slots, 0)[threadIdx.x] = v;
      cl.sync();
      v = slots[threadIdx.x];
    }
    if (threadIdx.x == 0) y[blockIdx.x % 4096] = v;  // keeps the loads and the count alive
  }
}

template <int KIND>
int run(int gx, int gy, int cl, const void* x, float* y, int K, int k_per, cudaStream_t st) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(gx, gy, 1);
  cfg.blockDim = dim3(NT, 1, 1);
  cfg.stream = st;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = cl;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = cl > 0 ? 1 : 0;
  if (cl > 8) cudaFuncSetAttribute(probe<KIND>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  return (int)cudaLaunchKernelEx(&cfg, probe<KIND>, (const __nv_bfloat16*)x, y, K, k_per, 0.5f);
}

extern "C" int probe_launch(int kind, int gx, int gy, int cl, const void* x, float* y, int K, int k_per, void* s) {
  cudaStream_t st = (cudaStream_t)s;
  switch (kind) {
    case 0: return run<0>(gx, gy, 0, x, y, K, k_per, st);
    case 1: return run<0>(gx, gy, cl, x, y, K, k_per, st);
    case 2: return run<2>(gx, gy, cl, x, y, K, k_per, st);
    case 3: return run<3>(gx, gy, 0, x, y, K, k_per, st);
    case 4: return run<4>(gx, gy, cl, x, y, K, k_per, st);
    case 5: return run<5>(gx, gy, 0, x, y, K, k_per, st);
    case 6: return run<3>(gx, gy, cl, x, y, K, k_per, st);
  }
  return -1;
}
"""


def build() -> ctypes.CDLL:
    d = tempfile.mkdtemp()
    src, so = os.path.join(d, "probe.cu"), os.path.join(d, "probe.so")
    with open(src, "w") as f:
        f.write(SOURCE)
    major, minor = torch.cuda.get_device_capability()
    r = subprocess.run(
        [CG._nvcc() or "nvcc", *CG._FLAGS, f"-arch=sm_{major}{minor}", "-o", so, src], capture_output=True, text=True
    )
    if r.returncode:
        sys.exit(r.stderr)
    lib = ctypes.CDLL(so)
    lib.probe_launch.restype = ctypes.c_int
    lib.probe_launch.argtypes = [ctypes.c_int] * 4 + [ctypes.c_void_p] * 2 + [ctypes.c_int] * 2 + [ctypes.c_void_p]
    return lib


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("exp_floor needs a CUDA GPU")
    lib = build()
    side = torch.zeros(4096, device="cuda")  # the pointwise kernel of the chained timings
    y = torch.zeros(4096, device="cuda")
    rows = []
    for k, n in SHAPES:
        case = Case(k, n, torch.bfloat16, layout=None)
        case.set_sparsity(1.0)
        cfg = CG.cuda_config(case.packed[0], torch.device("cuda"))
        gx, gy = case.packed[0].padded_out // cfg.block_n, cfg.cluster
        k_per = -(-k // gy)
        x = case.x[0]
        m = case.copies
        ys = [torch.empty(p.padded_out, dtype=torch.bfloat16, device="cuda") for p in case.packed]

        def probe(kind: int, x=x, gx=gx, gy=gy, k=k, k_per=k_per):
            e = lib.probe_launch(
                kind, gx, gy, gy, x.data_ptr(), y.data_ptr(), k, k_per, torch.cuda.current_stream().cuda_stream
            )
            if e:
                raise RuntimeError(f"probe {PROBES[kind]} launch error {e}")

        calls = {name: (lambda i, kind=kind: probe(kind)) for kind, name in enumerate(PROBES)}
        calls["library"] = lambda i, case=case, m=m, ys=ys, cfg=cfg: CG.sparse_gemv_cuda(
            case.x[i % m], case.packed[i % m], cfg, out=ys[i % m]
        )
        pointwise = graph_time_us(lambda i: side.add_(1.0), 64)
        row = {"k": k, "n": n, "config": f"{cfg.block_n}/{cfg.cluster}", "blocks": gx * gy, "pointwise": pointwise}
        for name, fn in calls.items():
            row[name] = graph_time_us(fn, 64)
            row[f"{name}/chained"] = graph_time_us(lambda i, fn=fn: (side.add_(1.0), fn(i)), 64) - pointwise
        print(json.dumps({key: round(v, 3) if isinstance(v, float) else v for key, v in row.items()}), flush=True)
        rows.append(row)
        del case
        torch.cuda.empty_cache()
    names = [*PROBES, "library"]
    print(f"{'K x N':>13} {'cfg':>7} {'blocks':>6} " + " ".join(f"{v:>12}" for v in names))
    for r in rows:
        for suffix in ("", "/chained"):
            vals = " ".join(f"{r[v + suffix]:12.2f}" for v in names)
            print(f"{r['k']:>6}x{r['n']:<6} {r['config']:>7} {r['blocks']:>6} {vals} {suffix}")
    with open(os.path.join(os.environ.get("OUT", "."), "exp_floor.json"), "w") as f:
        json.dump({"env": env_info(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
