// actsparse: the CUDA C++ sparse GEMV for batch-1 decode (Hopper and later: thread-block clusters).
//
// Semantics: those of actsparse/kernels/packing.py (the torch reference defines them), for the plain layout
// W[K, N_pad] of the activations' dtype T (fp16 or bf16), or int8 codes q with W = (q - zero[n]) * scale[n].
// Per column tile (one packed layer, segment s):
//     d  = float(x[k]) - mu[s];  kept where not (|d| <= float(T(tau[s])))  (NaN is kept);  x' = float(T(d))
//     y[n] = T( sum over kept k of W[k, n] * x'  +  mu[s] * wsum[n]  +  bias[n] )   (fp32 sums)
// int8: sum_k q[k, n] x'_k is accumulated, then scale[n] * (that - zero[n] * sum_k x'_k) once per column.
// Gated input (gate != nullptr: a gated MLP's down projection): x[k] = T(T(silu(gate[k])) * up[k]) with up
// passed as x and silu(g) = g / (1 + exp(-g)) in fp32, as torch rounds act_fn(gate) * up; the elementwise
// kernel that would write it is gone.
// Normalized input (norm_w != nullptr: the projections after a Llama RMSNorm): x is the residual stream h and
// x[k] = T(norm_w[k] * T(h[k] * rstd)), rstd = rsqrt(sum_k h[k]^2 / K + eps) in fp32 (every block sums all K),
// as transformers' LlamaRMSNorm rounds it. Residual output (residual != nullptr): y[n] = T(residual[n] + y[n]),
// as residual + hidden_states rounds it (residual may be y itself).
//
// One thread block owns BN output columns and a k_per slice of the inputs; the cl blocks sharing a column
// tile form a thread-block cluster, so the split-K reduction runs through distributed shared memory:
//   1. every thread loads its 8 adjacent x values at once (one 16-byte load where the slice is aligned: one
//      memory latency) and tests them; the block lists its kept rows' indices and values in shared memory in
//      increasing k (a shuffle scan of the kept counts per warp, a prefix over the warps' totals);
//   2. the kept rows are streamed: a row's BN columns are BN/E lanes x 16 bytes (E = 8 fp16/bf16 or 16 int8
//      values; L1 bypassed), a warp covers 32/(BN/E) rows per step, U loads in flight per thread, fp32 sums;
//   3. lanes reduce over the rows of a warp (shuffles), warps through shared memory, then every block pushes
//      its partial sum of column c into the shared memory of the block that owns c (BN/cl columns each) by
//      st.async, which counts the bytes on an mbarrier there; an owner waits for its BN * 4 bytes (no cluster
//      barrier at the end), adds the cl partials in rank order and writes y: deterministic, one launch, no
//      workspace, no counters.
// Programmatic dependent launch (a no-op unless the launch asks for it): the kernel sets up its barriers, then
// waits for its predecessor before touching memory; it lets its successor launch once its weight stream is done,
// so the successor's launch overlaps the reduction tail without taking SM slots from the stream.
// Built at first use by actsparse/kernels/cuda_gemv.py (nvcc -> shared library, called through ctypes).

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace cg = cooperative_groups;

constexpr int WARPS = 8;
constexpr int NT = WARPS * 32;
constexpr int JMAX = 8;  // x values per thread: k_per <= JMAX * NT
// Build-time variants for benchmarks/exp_cuda.py (the library builds the defaults): ACTSPARSE_U loads of 16 bytes
// in flight per thread; ACTSPARSE_PIPELINE 1 issues the next U/2 rows' loads before the current U/2 rows' FMAs
// (double buffering); the _INT8 forms set the same for int8 codes (16 conversions and FMAs per load where fp16/bf16
// weights take 8: more work between loads), by default as for fp16/bf16; ACTSPARSE_MIN_BLOCKS caps
// registers so that many blocks fit an SM.
#ifndef ACTSPARSE_U
#define ACTSPARSE_U 8
#endif
#ifndef ACTSPARSE_U_INT8
#define ACTSPARSE_U_INT8 ACTSPARSE_U
#endif
#ifndef ACTSPARSE_PIPELINE
#define ACTSPARSE_PIPELINE 0
#endif
#ifndef ACTSPARSE_PIPELINE_INT8
#define ACTSPARSE_PIPELINE_INT8 ACTSPARSE_PIPELINE
#endif
// ACTSPARSE_INT8_CVT: how an int8 code becomes fp32: 0 (the default) a byte permute into 2^23's mantissa and an
// FADD, 1 the conversion instruction in place of the FADD (I2F, a slower unit but another pipe; the byte is still
// extracted), 2 half of the codes each way
#ifndef ACTSPARSE_INT8_CVT
#define ACTSPARSE_INT8_CVT 0
#endif
#ifndef ACTSPARSE_MIN_BLOCKS
#define ACTSPARSE_MIN_BLOCKS 1
#endif
// ACTSPARSE_VEC_X 1 (the default; 0 for benchmarks/exp_cuda.py --variants legacy, ballots): every thread holds
// 8 adjacent inputs, read by one 16-byte load where the slice allows it, and the kept list is built by a scan
// over threads (one shuffle scan per warp, one barrier); 0: thread t holds inputs t, t + NT, ..., eight warp
// ballots and an 8 x WARPS table of counts.
#ifndef ACTSPARSE_VEC_X
#define ACTSPARSE_VEC_X 1
#endif
// ACTSPARSE_MBAR_REDUCE 1 (the default; 0 for --variants legacy, cluster-sync): the partials travel by st.async,
// each completing bytes on an mbarrier in the owner's shared memory, and an owner waits for its BN * 4 bytes;
// 0: plain DSMEM stores and a cluster barrier after the push (every block waiting for every other).
// Together they took the 100%-sparse cost from 4.4-5.0 to 3.3-3.8 us per call on an H100 (benchmarks/README.md).
#ifndef ACTSPARSE_MBAR_REDUCE
#define ACTSPARSE_MBAR_REDUCE 1
#endif
// ACTSPARSE_PDL_EARLY 0 (the default; 1 for --variants pdl-early): the successor may launch after the weight
// stream; 1: at the kernel's start (as before 2026-12-07, fifth), so its blocks can sit on SMs the stream needs.
#ifndef ACTSPARSE_PDL_EARLY
#define ACTSPARSE_PDL_EARLY 0
#endif

__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <typename T> __device__ __forceinline__ float round_f(float v) { return to_f(from_f<T>(v)); }

// 16 bytes read once: L1 bypassed; predicated (no branch; zeros when !pred) so the U loads issue back to back
__device__ __forceinline__ uint4 ld_stream(const void* p, bool pred) {
  uint4 r;
  asm volatile(
      "{\n .reg .pred q;\n setp.ne.b32 q, %5, 0;\n mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n"
      " mov.b32 %3, 0;\n @q ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n}\n"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p), "r"((int)pred));
  return r;
}

// 16 bytes of weights times x into E accumulators: 8 fp16/bf16 values, or 16 int8 codes (Q > 0)
template <typename T, int Q>
__device__ __forceinline__ void fma16b(float (&acc)[Q ? 16 : 8], const uint4& w, float x) {
  if constexpr (Q == 0) {
    const T* p = reinterpret_cast<const T*>(&w);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = fmaf(to_f(p[i]), x, acc[i]);
  } else {  // q + 128 as the low byte of 2^23's mantissa: float(q) = that float - (2^23 + 128), exact
    const unsigned raw[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const unsigned word = raw[i] ^ 0x80808080u;
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        float q;
        if (ACTSPARSE_INT8_CVT == 1 || (ACTSPARSE_INT8_CVT == 2 && b % 2 == 1)) {  // the conversion unit's I2F
          q = (float)(signed char)((raw[i] >> (8 * b)) & 0xFFu);
        } else {  // one byte permute and one FADD (the FMA pipe)
          q = __uint_as_float(__byte_perm(word, 0x4B000000u, 0x7540u + b)) - 8388736.f;
        }
        acc[4 * i + b] = fmaf(q, x, acc[4 * i + b]);
      }
    }
  }
}

// one input as the kernel sees it: x, or norm_w[k] * x[k] * rstd, or silu(gate) * x, each rounded as torch does
template <typename T>
__device__ __forceinline__ float input_at(T xk, T gk, T nk, bool gated, bool normed, float rstd) {
  float v = to_f(xk);
  if (normed) v = round_f<T>(to_f(nk) * round_f<T>(v * rstd));  // (uniform over the launch, as gated)
  if (gated) {  // uniform over the launch: no divergence
    const float g = to_f(gk);
    v = round_f<T>(round_f<T>(g / (1.f + expf(-g))) * v);
  }
  return v;
}

// rows base + u * RPS + r0 (u < UB) of the kept list: their values and 16 bytes of weights each (0 past total)
template <int UB, int RPS>
__device__ __forceinline__ void load_rows(uint4 (&wv)[UB], float (&xk)[UB], int base, int r0, int total,
                                          const int* list, const float* vals, const char* wcol, size_t row_bytes) {
#pragma unroll
  for (int u = 0; u < UB; ++u) {
    const int i = base + u * RPS + r0;
    const bool ok = i < total;
    const int ic = ok ? i : 0;
    xk[u] = ok ? vals[ic] : 0.f;
    wv[u] = ld_stream(wcol + (size_t)list[ic] * row_bytes, ok);
  }
}

// Q: 0 = weights of dtype T, 1 = int8 codes with a scale per column, 2 = int8 codes with a scale and a zero point
template <typename T, int BN, int Q>
__global__ void __launch_bounds__(NT, ACTSPARSE_MIN_BLOCKS)
    sgemv_cluster(const T* __restrict__ x, const T* __restrict__ gate, const void* __restrict__ w, T* __restrict__ y,
                  const float* __restrict__ tau_p,
                  const float* __restrict__ mu_p, const float* __restrict__ wsum, const void* __restrict__ bias,
                  const float* __restrict__ scale, const float* __restrict__ zero, int bias_fp32, int K, int N,
                  int k_per, int c1, int c2, const T* __restrict__ norm_w, float norm_eps, const T* residual) {
  constexpr int E = Q ? 16 : 8;     // weights per 16-byte load
  constexpr int WB = Q ? 1 : 2;     // bytes per weight
  constexpr int LPR = BN / E;       // lanes per weight row
  constexpr int RPW = 32 / LPR;     // rows per warp per step
  constexpr int RPS = RPW * WARPS;  // rows per block per step
  constexpr int U = Q ? ACTSPARSE_U_INT8 : ACTSPARSE_U;  // 16-byte loads in flight per thread
  constexpr bool PIPE = Q ? ACTSPARSE_PIPELINE_INT8 : ACTSPARSE_PIPELINE;
  static_assert(U >= 1 && (!PIPE || U % 2 == 0), "double buffering takes an even number of loads in flight");
  __shared__ int list[JMAX * NT];
  __shared__ float vals[JMAX * NT];
  __shared__ float red[WARPS][BN];
  __shared__ float slots[BN];  // the cl partial sums of the BN / cl columns this block owns
  __shared__ float xsums[WARPS];  // int8 with zero points: the kept x' summed per warp

#if ACTSPARSE_PDL_EARLY
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  cg::cluster_group cluster = cg::this_cluster();
  const int cl = (int)cluster.num_blocks();
#if ACTSPARSE_MBAR_REDUCE
  __shared__ __align__(8) unsigned long long mbar;
  const unsigned mbar_a = (unsigned)__cvta_generic_to_shared(&mbar);
  // st.async needs a cluster of more than one block (PTX: undefined otherwise); cl == 1 reduces in place
  if (cl > 1 && threadIdx.x == 0) {  // one arrival (this one, expecting BN partials) + their bytes; cluster-visible
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(mbar_a) : "memory");
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(mbar_a), "r"(BN * 4) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
#endif
  // distributed shared memory may be written only once every block of the cluster runs: arrive now, wait
  // just before the push (the weight stream in between hides the wait)
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
#if !ACTSPARSE_PDL_EARLY
  asm volatile("griddepcontrol.wait;" ::: "memory");  // nothing above reads global memory
#endif
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n0 = blockIdx.x * BN;
  const int k_lo = blockIdx.y * k_per;
  const int k_hi = min(k_lo + k_per, K);
  const int seg = (n0 >= c1) + (n0 >= c2);  // which packed layer this tile belongs to
  const float tau = round_f<T>(tau_p[seg]);  // compared in the activation dtype, as SparseLinear does
  const float mu = mu_p != nullptr ? mu_p[seg] : 0.f;

  const bool normed = norm_w != nullptr;
  float rstd = 1.f;
  if (normed) {  // the mean square of all K inputs, summed in a fixed order: every block gets the same rstd
    __shared__ float norm_part[WARPS];
    const bool vec_all = reinterpret_cast<size_t>(x) % 16 == 0;
    float ss = 0.f;
#pragma unroll 4
    for (int k0 = JMAX * threadIdx.x; k0 < K; k0 += JMAX * NT) {
      if (vec_all && k0 + JMAX <= K) {
        const uint4 r = *reinterpret_cast<const uint4*>(x + k0);
        const T* p = reinterpret_cast<const T*>(&r);
#pragma unroll
        for (int j = 0; j < JMAX; ++j) ss = fmaf(to_f(p[j]), to_f(p[j]), ss);
      } else {
        for (int k = k0; k < min(k0 + JMAX, K); ++k) ss = fmaf(to_f(x[k]), to_f(x[k]), ss);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (lane == 0) norm_part[warp] = ss;
    __syncthreads();
    ss = 0.f;
#pragma unroll
    for (int q = 0; q < WARPS; ++q) ss += norm_part[q];
    rstd = rsqrtf(ss / (float)K + norm_eps);
  }
  float mine = 0.f;  // this thread's kept x' (their sum is needed with zero points)
  int total = 0;     // kept rows of the block
#if ACTSPARSE_VEC_X
  __shared__ int wtot[WARPS];
  float xv[JMAX];  // inputs kb .. kb + 7
  const int kb = k_lo + JMAX * threadIdx.x;
  const bool vec = ((reinterpret_cast<size_t>(x) | reinterpret_cast<size_t>(gate) | reinterpret_cast<size_t>(norm_w)) %
                        16 ==
                    0) &&
                   k_lo % JMAX == 0 && kb + JMAX <= k_hi;
  if (vec) {
    const uint4 rx = *reinterpret_cast<const uint4*>(x + kb);
    const uint4 rg = gate != nullptr ? *reinterpret_cast<const uint4*>(gate + kb) : rx;
    const uint4 rn = normed ? *reinterpret_cast<const uint4*>(norm_w + kb) : rx;
    const T* px = reinterpret_cast<const T*>(&rx);
    const T* pg = reinterpret_cast<const T*>(&rg);
    const T* pn = reinterpret_cast<const T*>(&rn);
#pragma unroll
    for (int j = 0; j < JMAX; ++j) xv[j] = input_at<T>(px[j], pg[j], pn[j], gate != nullptr, normed, rstd) - mu;
  } else {
#pragma unroll
    for (int j = 0; j < JMAX; ++j) {
      const int k = kb + j;
      xv[j] = k < k_hi ? input_at<T>(x[k], gate != nullptr ? gate[k] : x[k], normed ? norm_w[k] : x[k],
                                     gate != nullptr, normed, rstd) -
                             mu
                       : 0.f;
    }
  }
  unsigned bits = 0;
#pragma unroll
  for (int j = 0; j < JMAX; ++j) bits |= (kb + j < k_hi && !(fabsf(xv[j]) <= tau)) ? 1u << j : 0u;
  const int mine_n = __popc(bits);
  int incl = mine_n;  // inclusive scan of the kept counts over the warp's lanes
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const int t = __shfl_up_sync(0xffffffffu, incl, o);
    incl += lane >= o ? t : 0;
  }
  if (lane == 31) wtot[warp] = incl;
  __syncthreads();
  int pos = incl - mine_n;
#pragma unroll
  for (int q = 0; q < WARPS; ++q) {
    const int c = wtot[q];
    pos += (q < warp) ? c : 0;
    total += c;
  }
#pragma unroll
  for (int j = 0; j < JMAX; ++j) {  // kept rows in increasing k
    if (bits & (1u << j)) {
      list[pos] = kb + j;
      vals[pos] = round_f<T>(xv[j]);
      mine += vals[pos];
      ++pos;
    }
  }
#else
  __shared__ int cnt[JMAX][WARPS];
  float xv[JMAX];
#pragma unroll
  for (int j = 0; j < JMAX; ++j) {
    const int k = k_lo + j * NT + threadIdx.x;
    xv[j] = k < k_hi ? input_at<T>(x[k], gate != nullptr ? gate[k] : x[k], normed ? norm_w[k] : x[k],
                                   gate != nullptr, normed, rstd) -
                           mu
                     : 0.f;
  }
  unsigned keepm[JMAX];
#pragma unroll
  for (int j = 0; j < JMAX; ++j) {
    const int k = k_lo + j * NT + threadIdx.x;
    keepm[j] = __ballot_sync(0xffffffffu, (k < k_hi) && !(fabsf(xv[j]) <= tau));
    if (lane == 0) cnt[j][warp] = __popc(keepm[j]);
  }
  __syncthreads();
  const unsigned below = (1u << lane) - 1u;
  // kept rows in increasing k: j-major, then warp, then lane
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
      vals[pos] = round_f<T>(xv[j]);  // x' in the activation dtype (exact when mu = 0)
      mine += vals[pos];
    }
    total += all;
  }
#endif
  if (Q == 2) {
#pragma unroll
    for (int o = 16; o > 0; o /= 2) mine += __shfl_xor_sync(0xffffffffu, mine, o);
    if (lane == 0) xsums[warp] = mine;
  }
  __syncthreads();
  float xsum = 0.f;
  if (Q == 2) {
#pragma unroll
    for (int q = 0; q < WARPS; ++q) xsum += xsums[q];
  }

  const int lr = lane % LPR, rs = lane / LPR;
  const char* wcol = (const char*)w + (size_t)(n0 + lr * E) * WB;
  const size_t row_bytes = (size_t)N * WB;
  float acc[E];
#pragma unroll
  for (int i = 0; i < E; ++i) acc[i] = 0.f;
  const int r0 = warp * RPW + rs;
  if constexpr (PIPE) {
    constexpr int UB = U / 2;
    uint4 wa[UB];
    float xa[UB];
    load_rows<UB, RPS>(wa, xa, 0, r0, total, list, vals, wcol, row_bytes);
    for (int base = 0; base < total; base += RPS * UB) {
      uint4 wb[UB];
      float xb[UB];
      load_rows<UB, RPS>(wb, xb, base + RPS * UB, r0, total, list, vals, wcol, row_bytes);
#pragma unroll
      for (int u = 0; u < UB; ++u) fma16b<T, Q>(acc, wa[u], xa[u]);
#pragma unroll
      for (int u = 0; u < UB; ++u) {
        wa[u] = wb[u];
        xa[u] = xb[u];
      }
    }
  } else {
    for (int base = 0; base < total; base += RPS * U) {
      uint4 wv[U];
      float xk[U];
      load_rows<U, RPS>(wv, xk, base, r0, total, list, vals, wcol, row_bytes);
#pragma unroll
      for (int u = 0; u < U; ++u) fma16b<T, Q>(acc, wv[u], xk[u]);
    }
  }
#pragma unroll
  for (int s = LPR; s < 32; s *= 2) {  // lanes lr, lr + LPR, ... hold the same columns
#pragma unroll
    for (int i = 0; i < E; ++i) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], s);
  }
  if (rs == 0) {
#pragma unroll
    for (int i = 0; i < E; ++i) red[warp][lr * E + i] = acc[i];
  }
  __syncthreads();
#if !ACTSPARSE_PDL_EARLY
  asm volatile("griddepcontrol.launch_dependents;");  // the weights are read: the successor may launch
#endif
  const int rank = (int)cluster.block_rank();
  const int per = BN / cl;
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
  for (int c = threadIdx.x; c < BN; c += NT) {
    float s = 0.f;
#pragma unroll
    for (int q = 0; q < WARPS; ++q) s += red[q][c];
    if (Q == 2) s -= zero[n0 + c] * xsum;  // this block's share of zero * sum x'
#if ACTSPARSE_MBAR_REDUCE
    if (cl == 1) {  // this block owns every column: no other block, no st.async
      slots[c] = s;
      continue;
    }
    unsigned dst, bar;
    const unsigned src = (unsigned)__cvta_generic_to_shared(&slots[rank * per + c % per]);
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(dst) : "r"(src), "r"(c / per));
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(bar) : "r"(mbar_a), "r"(c / per));
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];" ::"r"(dst),
                 "r"(__float_as_uint(s)), "r"(bar)
                 : "memory");
#else
    cluster.map_shared_rank(slots, c / per)[rank * per + c % per] = s;
#endif
  }
#if ACTSPARSE_MBAR_REDUCE
  if (cl == 1) {
    __syncthreads();
  } else {  // every partial of this block's columns has landed (phase 0 completes with the last byte); acquire at
            // cluster scope, the scope of the senders' release (st.async's complete_tx)
    unsigned done = 0;
    while (!done) {
      asm volatile(
          "{\n .reg .pred p;\n mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], 0;\n"
          " selp.u32 %0, 1, 0, p;\n}\n"
          : "=r"(done)
          : "r"(mbar_a)
          : "memory");
    }
  }
#else
  cluster.sync();  // release/acquire: every pushed partial is visible to its owner
#endif
  for (int c = threadIdx.x; c < per; c += NT) {
    const int col = n0 + rank * per + c;
    float s = 0.f;
    for (int q = 0; q < cl; ++q) s += slots[q * per + c];
    if (Q > 0) s *= scale[col];
    if (mu_p != nullptr) s += mu * wsum[col];
    if (bias != nullptr) s += bias_fp32 ? ((const float*)bias)[col] : to_f(((const T*)bias)[col]);
    const T out = from_f<T>(s);
    y[col] = residual != nullptr ? from_f<T>(to_f(residual[col]) + to_f(out)) : out;
  }
}

template <typename T, int BN, int Q>
static int launch(const void* x, const void* gate, const void* w, void* y, const float* tau, const float* mu, const float* wsum,
                  const void* bias, const float* scale, const float* zero, int bias_fp32, int K, int N, int cl,
                  int c1, int c2, int pdl, cudaStream_t st, const void* norm_w,
                  float norm_eps, const void* residual) {
  if (cl < 1 || cl > 16 || BN % cl != 0) return -1;
  const int k_per = ((K + cl - 1) / cl + 7) / 8 * 8;  // slices start 16-byte aligned (8 inputs per thread)
  if (k_per > JMAX * NT || N % BN != 0) return -1;
  if (cl > 8) {  // more than 8 blocks per cluster is a non-portable opt-in, per device: set it on every call
    cudaError_t e =
        cudaFuncSetAttribute(sgemv_cluster<T, BN, Q>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (e != cudaSuccess) return (int)e;
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
  return (int)cudaLaunchKernelEx(&cfg, sgemv_cluster<T, BN, Q>, (const T*)x, (const T*)gate, w, (T*)y, tau, mu, wsum,
                                 bias, scale, zero, bias_fp32, K, N, k_per, c1, c2, (const T*)norm_w, norm_eps,
                                 (const T*)residual);
}

// dtype: 0 bf16, 1 fp16 (the activations'); quant: 0 weights of that dtype, 1 int8 + scale, 2 int8 + scale + zero.
// gate: nullptr, or the gate of a gated MLP (x is then its up projection). norm_w: nullptr, or the weight of the
// RMSNorm (eps norm_eps) that x goes through first (x is then the residual stream). residual: nullptr, or what y
// adds (may be y). Returns 0 or a cudaError_t code (-1: a shape/config the kernel does not take).
extern "C" int actsparse_sgemv(int dtype, int quant, int bn, int cl, int pdl, const void* x, const void* gate,
                               const void* w, void* y,
                               const float* tau, const float* mu, const float* wsum, const void* bias,
                               const float* scale, const float* zero, int bias_fp32, int K, int N, int c1, int c2,
                               void* stream, const void* norm_w, const void* residual, float norm_eps) {
  cudaStream_t st = (cudaStream_t)stream;
#define ACTSPARSE_CASE(T, BN, Q)                                                                            \
  if (bn == BN && quant == Q)                                                                               \
    return launch<T, BN, Q>(x, gate, w, y, tau, mu, wsum, bias, scale, zero, bias_fp32, K, N, cl, c1, c2, pdl, st,  \
                            norm_w, norm_eps, residual);
#define ACTSPARSE_TILES(T, Q) ACTSPARSE_CASE(T, 64, Q) ACTSPARSE_CASE(T, 128, Q) ACTSPARSE_CASE(T, 256, Q)
  if (dtype == 0) {
    ACTSPARSE_TILES(__nv_bfloat16, 0) ACTSPARSE_TILES(__nv_bfloat16, 1) ACTSPARSE_TILES(__nv_bfloat16, 2)
  } else if (dtype == 1) {
    ACTSPARSE_TILES(__half, 0) ACTSPARSE_TILES(__half, 1) ACTSPARSE_TILES(__half, 2)
  }
#undef ACTSPARSE_TILES
#undef ACTSPARSE_CASE
  return -1;
}
