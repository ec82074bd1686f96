// Issue 17, direction 3: a CUDA C++ sparse GEMV for batch-1 decode, measured against the Triton kernel.
//
//   y[n] = sum_k W[k, n] * x'[k],  x'[k] = x[k] if not (|x[k]| <= tau) else 0     (plain layout W[K, N_pad])
//
// One thread block owns BN output columns and a K_PER slice of the inputs; the CL blocks sharing a column
// block form a thread-block cluster (Hopper), so the split-K reduction runs through distributed shared
// memory: no global workspace, no counters, one launch, deterministic (fixed summation order).
//   1. every thread loads its x values at once (one memory latency), tests them, and the block writes the
//      kept rows' indices and values to shared memory in increasing k (warp ballots + a prefix over warps);
//   2. the kept rows are streamed: a row's BN columns are BN/8 lanes x 16 bytes, a warp covers 32/(BN/8) rows
//      per step, U steps are issued before any FMA (U x 16 bytes in flight per thread), fp32 accumulation;
//   3. lanes reduce over the rows of a warp (shuffles), warps through shared memory, then block r of the
//      cluster sums BN/CL columns over the CL blocks' partials (RED 0: read from each block's shared memory,
//      two cluster barriers; RED 1: pushed into the owner's shared memory, one barrier) and writes them.
// Optional programmatic dependent launch (pdl): the next kernel's launch overlaps this one's tail.
// Built with nvcc into a shared library and called through ctypes (benchmarks/exp_cuda.py).

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace cg = cooperative_groups;

constexpr int WARPS = 8;
constexpr int NT = WARPS * 32;
constexpr int JMAX = 8;  // x values per thread: K_PER <= JMAX * NT = 2048

__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

// 16 bytes, read once: bypass L1; predicated (no branch), zeros when !pred, so U loads issue back to back
__device__ __forceinline__ uint4 ld_stream(const void* p, bool pred) {
  uint4 r;
  asm volatile(
      "{\n .reg .pred q;\n setp.ne.b32 q, %5, 0;\n mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n"
      " mov.b32 %3, 0;\n @q ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n}\n"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p), "r"((int)pred));
  return r;
}

template <typename T>
__device__ __forceinline__ void fma8(float (&acc)[8], const uint4& w, float x) {
  const T* p = reinterpret_cast<const T*>(&w);
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = fmaf(to_f(p[i]), x, acc[i]);
}

template <typename T, int BN, int U, int RED>
__global__ void __launch_bounds__(NT) sgemv_cluster(const T* __restrict__ x, const float* __restrict__ tau_p,
                                                    const T* __restrict__ w, T* __restrict__ y, int K, int N,
                                                    int k_per, int cl) {
  constexpr int LPR = BN / 8;      // lanes per weight row
  constexpr int RPW = 32 / LPR;    // rows per warp per step
  constexpr int RPS = RPW * WARPS; // rows per block per step
  __shared__ int list[JMAX * NT];
  __shared__ float vals[JMAX * NT];
  __shared__ int cnt[JMAX][WARPS];
  __shared__ float red[WARPS][BN];
  __shared__ float part[BN];  // RED 0: this block's partial sums; RED 1: the CL partials of the columns it owns

  cg::cluster_group cluster = cg::this_cluster();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n0 = blockIdx.x * BN;
  const int k_lo = blockIdx.y * k_per;
  const int k_hi = min(k_lo + k_per, K);
  // tau compared in the activation dtype, as SparseLinear does (round to nearest even; -inf stays -inf)
  // programmatic dependent launch: wait for the kernel before us (no-op without the launch attribute), and
  // let the next kernel launch now; it waits in turn for all of this grid before reading what we wrote
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;");
  const float tau = to_f(from_f<T>(*tau_p));

  float xv[JMAX];
#pragma unroll
  for (int j = 0; j < JMAX; ++j) {
    const int k = k_lo + j * NT + threadIdx.x;
    xv[j] = (k < k_hi) ? to_f(x[k]) : 0.f;
  }
  unsigned keepm[JMAX];
#pragma unroll
  for (int j = 0; j < JMAX; ++j) {
    const int k = k_lo + j * NT + threadIdx.x;
    const bool keep = (k < k_hi) && !(fabsf(xv[j]) <= tau);  // NaN is kept, as in the reference
    keepm[j] = __ballot_sync(0xffffffffu, keep);
    if (lane == 0) cnt[j][warp] = __popc(keepm[j]);
  }
  __syncthreads();
  const unsigned below = (1u << lane) - 1u;
  int total = 0;  // kept rows in increasing k: j-major, then warp, then lane
#pragma unroll
  for (int j = 0; j < JMAX; ++j) {
    int before = 0, all = 0;
#pragma unroll
    for (int q = 0; q < WARPS; ++q) {
      const int c = cnt[j][q];
      before += (q < warp) ? c : 0;
      all += c;
    }
    if (keepm[j] & (1u << lane)) {
      const int pos = total + before + __popc(keepm[j] & below);
      list[pos] = k_lo + j * NT + threadIdx.x;
      vals[pos] = xv[j];
    }
    total += all;
  }
  __syncthreads();

  const int lr = lane % LPR, rs = lane / LPR;
  const T* wcol = w + n0 + lr * 8;
  float acc[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = 0.f;
  const int r0 = warp * RPW + rs;
  for (int base = 0; base < total; base += RPS * U) {
    uint4 wv[U];
    float xk[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = base + u * RPS + r0;
      const bool ok = i < total;
      const int ic = ok ? i : 0;
      xk[u] = ok ? vals[ic] : 0.f;
      wv[u] = ld_stream(wcol + (size_t)list[ic] * N, ok);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) fma8<T>(acc, wv[u], xk[u]);
  }
  // rows of a warp: lanes lr, lr + LPR, ... hold the same columns
#pragma unroll
  for (int s = LPR; s < 32; s *= 2) {
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], s);
  }
  if (rs == 0) {
#pragma unroll
    for (int i = 0; i < 8; ++i) red[warp][lr * 8 + i] = acc[i];
  }
  __syncthreads();
  const int rank = (int)cluster.block_rank();
  const int per = BN / cl;
  if (RED == 0) {  // pull: every block keeps its partials; block r reads its columns from all CL blocks
    for (int c = threadIdx.x; c < BN; c += NT) {
      float s = 0.f;
#pragma unroll
      for (int q = 0; q < WARPS; ++q) s += red[q][c];
      part[c] = s;
    }
    cluster.sync();  // every block's partial sums are in its shared memory
    for (int c = threadIdx.x; c < per; c += NT) {
      const int col = rank * per + c;
      float s = 0.f;
      for (int q = 0; q < cl; ++q) s += cluster.map_shared_rank(part, q)[col];
      y[n0 + col] = from_f<T>(s);
    }
    cluster.sync();  // nobody leaves while others still read its shared memory
  } else {  // push: block q writes column c's partial into slot q of the owner's shared memory, one barrier
    for (int c = threadIdx.x; c < BN; c += NT) {
      float s = 0.f;
#pragma unroll
      for (int q = 0; q < WARPS; ++q) s += red[q][c];
      cluster.map_shared_rank(part, c / per)[rank * per + c % per] = s;
    }
    cluster.sync();
    for (int c = threadIdx.x; c < per; c += NT) {
      float s = 0.f;
      for (int q = 0; q < cl; ++q) s += part[q * per + c];
      y[n0 + rank * per + c] = from_f<T>(s);
    }
  }
}

template <typename T, int BN, int U, int RED>
static int launch(const void* x, const float* tau, const void* w, void* y, int K, int N, int cl, int pdl,
                  cudaStream_t st) {
  const int k_per = (K + cl - 1) / cl;
  if (k_per > JMAX * NT || N % BN != 0 || BN % cl != 0 || cl > 16) return -1;
  static bool big_clusters = false;  // clusters of more than 8 blocks are a non-portable opt-in (set once)
  if (cl > 8 && !big_clusters) {
    cudaError_t e = cudaFuncSetAttribute(sgemv_cluster<T, BN, U, RED>,
                                         cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (e != cudaSuccess) return (int)e;
    big_clusters = true;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(N / BN, cl, 1);
  cfg.blockDim = dim3(NT, 1, 1);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = st;
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = cl;
  attr[0].val.clusterDim.z = 1;
  attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[1].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 2 : 1;
  cudaError_t e = cudaLaunchKernelEx(&cfg, sgemv_cluster<T, BN, U, RED>, (const T*)x, tau, (const T*)w, (T*)y, K,
                                     N, k_per, cl);
  return (int)e;
}

#define SGEMV_CASE(BN, U, RED) \
  if (bn == BN && u == U && red == RED) return launch<__nv_bfloat16, BN, U, RED>(x, tau, w, y, K, N, cl, pdl, st);

extern "C" int sgemv(const void* x, const float* tau, const void* w, void* y, int K, int N, int bn, int u, int cl,
                     int red, int pdl, void* stream) {
  cudaStream_t st = (cudaStream_t)stream;
  SGEMV_CASE(64, 4, 1) SGEMV_CASE(64, 8, 1) SGEMV_CASE(64, 4, 0)
  SGEMV_CASE(128, 4, 1) SGEMV_CASE(128, 8, 1) SGEMV_CASE(128, 4, 0)
  SGEMV_CASE(256, 4, 1) SGEMV_CASE(256, 8, 1) SGEMV_CASE(256, 4, 0)
  return -2;
}
