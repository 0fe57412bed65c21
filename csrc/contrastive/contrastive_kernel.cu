// GCPR contrastive loss: CUDA kernels (math and layout in contrastive_kernel.h).
//
// Every kernel is a loop over logit tiles whose similarity is built by sim_tile: 64-wide feature
// chunks of both operands are converted to fp32 into shared memory (rows padded to 65 floats so
// that column-wise reads do not bank-conflict) and each of the 256 threads accumulates 4 outputs
// of the R x C tile in registers. Per-row reductions in the forward are done by one warp per row
// with shuffles, so every lane holds the row's state and no block-wide reduction is needed.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "contrastive/contrastive_kernel.h"

namespace r2d2 {
namespace contrastive {
namespace {

constexpr int kPad = kChunk + 1;
constexpr int kPer = 4;  // outputs per thread of a 1024-element tile
static_assert(kTileRows * kTileCols == kPer * kThreads, "tile must be 4 outputs per thread");

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

// The counter-based noise of r2d2.kernels.contrastive.gumbel_noise (lowbias32 hash). The two
// logs are taken in double and rounded to float each, as an accurate logf would: setup.py builds
// with --use_fast_math, which turns logf into __logf (absolute error ~2^-21 near 1), and u near 1
// (-log u down to 2^-25) is exactly where the largest, argmax-deciding Gumbel values come from;
// there __logf can be off by orders of magnitude, or give 0 / a positive value (noise +inf / NaN).
__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

__device__ __forceinline__ float gumbel(uint32_t key, int64_t row, int64_t col) {
  const uint32_t a = mix32(static_cast<uint32_t>(row) ^ key);
  const uint32_t h = mix32(a + static_cast<uint32_t>(col) * 0x9E3779B9u);
  const float u = (static_cast<float>(h >> 8) + 0.5f) * 5.9604644775390625e-08f;  // 2^-24
  const float e = static_cast<float>(-log(static_cast<double>(u)));
  return static_cast<float>(-log(static_cast<double>(e)));
}

// acc[i] = A[a0 + r] . B[b0 + c] over the full feature dim, for idx = tid + i * kThreads,
// r = idx / C, c = idx % C; rows past na / nb read as zeros. sA [R][kPad], sB [C][kPad].
template <typename T, int R, int C>
__device__ void sim_tile(const T* __restrict__ A, int64_t a0, int64_t na, const T* __restrict__ B,
                         int64_t b0, int64_t nb, int64_t D, float* sA, float* sB, float acc[kPer]) {
  const int tid = threadIdx.x;
#pragma unroll
  for (int i = 0; i < kPer; ++i) acc[i] = 0.f;
  for (int64_t k0 = 0; k0 < D; k0 += kChunk) {
    for (int e = tid; e < R * kChunk; e += kThreads) {
      const int r = e / kChunk, j = e % kChunk;
      const bool ok = a0 + r < na && k0 + j < D;
      sA[r * kPad + j] = ok ? to_f(A[(a0 + r) * D + k0 + j]) : 0.f;
    }
    for (int e = tid; e < C * kChunk; e += kThreads) {
      const int c = e / kChunk, j = e % kChunk;
      const bool ok = b0 + c < nb && k0 + j < D;
      sB[c * kPad + j] = ok ? to_f(B[(b0 + c) * D + k0 + j]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int idx = tid + i * kThreads;
      const float* ra = sA + (idx / C) * kPad;
      const float* rb = sB + (idx % C) * kPad;
      float s = 0.f;
#pragma unroll 16
      for (int j = 0; j < kChunk; ++j) s = fmaf(ra[j], rb[j], s);
      acc[i] += s;
    }
    __syncthreads();
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Max of (value, index) with the lower index winning ties (torch.argmax's and tl.argmax's rule).
__device__ __forceinline__ void warp_argmax(float& v, int64_t& i) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) fwd_kernel(FwdArgs a) {
  __shared__ float sA[kTileRows * kPad];
  __shared__ float sB[kTileCols * kPad];
  __shared__ float S[kTileRows * kTileCols];
  __shared__ float TS[kTileRows * kTileCols];
  __shared__ int64_t cid[kTileCols];
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const bool teacher = a.tq != nullptr;
  const float s = *a.scale;
  const float ninf = -INFINITY;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  constexpr int kRowsPerWarp = kTileRows / (kThreads / 32);
  // State of this warp's rows, replicated in every lane.
  float m[kRowsPerWarp], l[kRowsPerWarp], hs[kRowsPerWarp], cnt[kRowsPerWarp];
  float tm[kRowsPerWarp], tls[kRowsPerWarp], tw[kRowsPerWarp], gv[kRowsPerWarp];
  int64_t gi[kRowsPerWarp], rid[kRowsPerWarp];
#pragma unroll
  for (int w = 0; w < kRowsPerWarp; ++w) {
    const int64_t r = r0 + warp * kRowsPerWarp + w;
    const bool ok = r < a.b;
    m[w] = ok ? a.m[r] : ninf; l[w] = ok ? a.l[r] : 0.f;
    hs[w] = ok ? a.hs[r] : 0.f; cnt[w] = ok ? a.cnt[r] : 0.f;
    tm[w] = ok ? a.tm[r] : ninf; tls[w] = ok ? a.tl[r] : 0.f; tw[w] = ok ? a.tw[r] : 0.f;
    gv[w] = ok ? a.gv[r] : ninf; gi[w] = ok ? a.gi[r] : -1;
    rid[w] = ok ? a.rid[r] : -1;
  }
  for (int64_t c0 = 0; c0 < a.n; c0 += kTileCols) {
    if (threadIdx.x < kTileCols) {
      const int64_t c = c0 + threadIdx.x;
      cid[threadIdx.x] = c < a.n ? a.cid[c] : -2;
    }
    float acc[kPer];
    sim_tile<T, kTileRows, kTileCols>(q, r0, a.b, k, c0, a.n, a.D, sA, sB, acc);
#pragma unroll
    for (int i = 0; i < kPer; ++i) S[threadIdx.x + i * kThreads] = s * acc[i];
    if (teacher) {
      sim_tile<T, kTileRows, kTileCols>(static_cast<const T*>(a.tq), r0, a.b,
                                        static_cast<const T*>(a.tk), c0, a.n, a.D, sA, sB, acc);
#pragma unroll
      for (int i = 0; i < kPer; ++i) TS[threadIdx.x + i * kThreads] = s * acc[i];
    }
    __syncthreads();
#pragma unroll
    for (int w = 0; w < kRowsPerWarp; ++w) {
      const int rl = warp * kRowsPerWarp + w;
      const int64_t r = r0 + rl;
      if (r >= a.b) continue;  // warp-uniform
      float x[2], t[2];
      bool valid[2], same[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int c = lane + 32 * h;
        valid[h] = c0 + c < a.n;
        x[h] = valid[h] ? S[rl * kTileCols + c] : ninf;
        t[h] = valid[h] ? TS[rl * kTileCols + c] : ninf;
        same[h] = valid[h] && cid[c] == rid[w];
      }
      // Every tile has a real column, so the new max is finite and exp never sees inf - inf.
      const float m_new = fmaxf(m[w], warp_max(fmaxf(x[0], x[1])));
      l[w] = l[w] * expf(m[w] - m_new) + warp_sum(expf(x[0] - m_new) + expf(x[1] - m_new));
      m[w] = m_new;
      hs[w] += warp_sum((same[0] ? x[0] : 0.f) + (same[1] ? x[1] : 0.f));
      cnt[w] += warp_sum(static_cast<float>(same[0]) + static_cast<float>(same[1]));
      if (teacher) {
        const float tm_new = fmaxf(tm[w], warp_max(fmaxf(t[0], t[1])));
        const float corr = expf(tm[w] - tm_new);
        const float p0 = expf(t[0] - tm_new), p1 = expf(t[1] - tm_new);
        tls[w] = tls[w] * corr + warp_sum(p0 + p1);
        const float pw = (valid[0] ? p0 * x[0] : 0.f) + (valid[1] ? p1 * x[1] : 0.f);
        tw[w] = tw[w] * corr + warp_sum(pw);
        tm[w] = tm_new;
      }
      if (a.neg) {
        float zv = ninf;
        int64_t zi = -1;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t c = c0 + lane + 32 * h;
          if (valid[h] && !same[h]) {
            const float z = x[h] + gumbel(a.key, a.row_off + r, a.col_off + c);
            if (z > zv) { zv = z; zi = a.col_off + c; }
          }
        }
        warp_argmax(zv, zi);
        if (zv > gv[w]) { gv[w] = zv; gi[w] = zi; }
      }
    }
    __syncthreads();
  }
  if (lane == 0) {
#pragma unroll
    for (int w = 0; w < kRowsPerWarp; ++w) {
      const int64_t r = r0 + warp * kRowsPerWarp + w;
      if (r >= a.b) continue;
      a.m[r] = m[w]; a.l[r] = l[w]; a.hs[r] = hs[w]; a.cnt[r] = cnt[w];
      if (teacher) { a.tm[r] = tm[w]; a.tl[r] = tls[w]; a.tw[r] = tw[w]; }
      if (a.neg) { a.gv[r] = gv[w]; a.gi[r] = gi[w]; }
    }
  }
}

// dlogit of one element; rows / cols out of range give 0.
__device__ __forceinline__ float dlogit(const BwdArgs& a, float s, float g, float sim, float tsim,
                                        int64_t r, int64_t c, int64_t rid_r, int64_t cid_c,
                                        bool teacher) {
  if (r >= a.b || c >= a.n) return 0.f;
  const float p = expf(s * sim - a.lse[r]);
  float tgt = rid_r == cid_c ? a.icnt[r] : 0.f;
  if (teacher) tgt = (1.f - a.alpha) * tgt + a.alpha * expf(s * tsim - a.tlse[r]);
  return g * (p - tgt);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_rows_kernel(BwdArgs a) {
  __shared__ float sA[kTileRows * kPad];
  __shared__ float sB[kTileCols * kPad];
  __shared__ float sK[kTileCols * kPad];
  __shared__ float DL[kTileRows * kTileCols];
  __shared__ float ds_row[kTileRows];
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const bool teacher = a.tq != nullptr;
  const float s = *a.scale, g = *a.g;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kChunk;
  const int tid = threadIdx.x;
  if (tid < kTileRows) ds_row[tid] = 0.f;
  float out[kPer] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t c0 = 0; c0 < a.n; c0 += kTileCols) {
    float acc[kPer], tacc[kPer] = {0.f, 0.f, 0.f, 0.f};
    sim_tile<T, kTileRows, kTileCols>(q, r0, a.b, k, c0, a.n, a.D, sA, sB, acc);
    if (teacher)
      sim_tile<T, kTileRows, kTileCols>(static_cast<const T*>(a.tq), r0, a.b,
                                        static_cast<const T*>(a.tk), c0, a.n, a.D, sA, sB, tacc);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int idx = tid + i * kThreads;
      const int64_t r = r0 + idx / kTileCols, c = c0 + idx % kTileCols;
      const int64_t rid_r = r < a.b ? a.rid[r] : -1, cid_c = c < a.n ? a.cid[c] : -2;
      const float dl = dlogit(a, s, g, acc[i], tacc[i], r, c, rid_r, cid_c, teacher);
      DL[idx] = dl;
      if (blockIdx.y == 0 && dl != 0.f) atomicAdd(&ds_row[idx / kTileCols], dl * acc[i]);
    }
    for (int e = tid; e < kTileCols * kChunk; e += kThreads) {
      const int c = e / kChunk, j = e % kChunk;
      const bool ok = c0 + c < a.n && d0 + j < a.D;
      sK[c * kPad + j] = ok ? to_f(k[(c0 + c) * a.D + d0 + j]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int idx = tid + i * kThreads;
      const int rl = idx / kChunk, j = idx % kChunk;
      float v = 0.f;
      for (int c = 0; c < kTileCols; ++c) v = fmaf(DL[rl * kTileCols + c], sK[c * kPad + j], v);
      out[i] += v;
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int idx = tid + i * kThreads;
    const int64_t r = r0 + idx / kChunk, j = d0 + idx % kChunk;
    if (r < a.b && j < a.D) a.dq[r * a.D + j] += s * out[i];
  }
  if (blockIdx.y == 0 && tid == 0) {
    float t = 0.f;
    for (int i = 0; i < kTileRows; ++i) t += ds_row[i];
    a.ds[blockIdx.x] += t;
  }
}

// Columns kernel: logit tiles are [kColTileRows rows] x [kTileRows columns] so the block owns
// kTileRows columns and streams the rows.
constexpr int kColTileRows = kTileCols;
constexpr int kColTileCols = kTileRows;

template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_cols_kernel(BwdArgs a) {
  __shared__ float sA[kColTileRows * kPad];
  __shared__ float sB[kColTileCols * kPad];
  __shared__ float sQ[kColTileRows * kPad];
  __shared__ float DL[kColTileRows * kColTileCols];
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const bool teacher = a.tq != nullptr;
  const float s = *a.scale, g = *a.g;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kColTileCols;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kChunk;
  const int tid = threadIdx.x;
  float out[kPer] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t r0 = 0; r0 < a.b; r0 += kColTileRows) {
    float acc[kPer], tacc[kPer] = {0.f, 0.f, 0.f, 0.f};
    sim_tile<T, kColTileRows, kColTileCols>(q, r0, a.b, k, c0, a.n, a.D, sA, sB, acc);
    if (teacher)
      sim_tile<T, kColTileRows, kColTileCols>(static_cast<const T*>(a.tq), r0, a.b,
                                              static_cast<const T*>(a.tk), c0, a.n, a.D, sA, sB,
                                              tacc);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int idx = tid + i * kThreads;
      const int64_t r = r0 + idx / kColTileCols, c = c0 + idx % kColTileCols;
      const int64_t rid_r = r < a.b ? a.rid[r] : -1, cid_c = c < a.n ? a.cid[c] : -2;
      DL[idx] = dlogit(a, s, g, acc[i], tacc[i], r, c, rid_r, cid_c, teacher);
    }
    for (int e = tid; e < kColTileRows * kChunk; e += kThreads) {
      const int r = e / kChunk, j = e % kChunk;
      const bool ok = r0 + r < a.b && d0 + j < a.D;
      sQ[r * kPad + j] = ok ? to_f(q[(r0 + r) * a.D + d0 + j]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int idx = tid + i * kThreads;
      const int cl = idx / kChunk, j = idx % kChunk;
      float v = 0.f;
      for (int r = 0; r < kColTileRows; ++r)
        v = fmaf(DL[r * kColTileCols + cl], sQ[r * kPad + j], v);
      out[i] += v;
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int idx = tid + i * kThreads;
    const int64_t c = c0 + idx / kChunk, j = d0 + idx % kChunk;
    if (c < a.n && j < a.D) a.dk[c * a.D + j] += s * out[i];
  }
}

int64_t cdiv(int64_t x, int64_t y) { return (x + y - 1) / y; }

template <typename T>
int launch_fwd(const FwdArgs& a, cudaStream_t stream) {
  if (a.b == 0 || a.n == 0) return 0;
  fwd_kernel<T><<<dim3(cdiv(a.b, kTileRows)), kThreads, 0, stream>>>(a);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_bwd(const BwdArgs& a, cudaStream_t stream) {
  // D == 0: nothing to add (sim = 0, so ds gets 0 too), and a 0-sized grid.y would not launch.
  if (a.b == 0 || a.n == 0 || a.D == 0) return 0;
  const unsigned nd = static_cast<unsigned>(cdiv(a.D, kChunk));
  if (a.dq != nullptr) {
    bwd_rows_kernel<T><<<dim3(cdiv(a.b, kTileRows), nd), kThreads, 0, stream>>>(a);
    if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return static_cast<int>(e);
  }
  if (a.dk != nullptr) {
    bwd_cols_kernel<T><<<dim3(cdiv(a.n, kColTileCols), nd), kThreads, 0, stream>>>(a);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int fwd_block_cuda(DType dtype, const FwdArgs& a, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_fwd<float>(a, stream);
    case DType::kFloat16: return launch_fwd<__half>(a, stream);
    case DType::kBFloat16: return launch_fwd<__nv_bfloat16>(a, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int bwd_block_cuda(DType dtype, const BwdArgs& a, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_bwd<float>(a, stream);
    case DType::kFloat16: return launch_bwd<__half>(a, stream);
    case DType::kBFloat16: return launch_bwd<__nv_bfloat16>(a, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace contrastive
}  // namespace r2d2
