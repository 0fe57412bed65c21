// Attention: CUDA kernels (flash-style forward, LSE-recompute backward) and their launchers.
//
// The math is that of r2d2/kernels/attention_triton.py (see its docstring): forward streams K/V
// tiles with an online softmax in the log2 domain, skipping tiles whose keys are all padding, and
// saves lse2; backward computes delta = rowsum(dO * O), then one kernel per key block for dK/dV
// (streaming query tiles) and one per query block for dQ (streaming key tiles), no atomics.
// Padded keys of a processed tile are loaded as zeros, so whatever a padding slot holds (NaN,
// Inf) cannot reach an output or a gradient.
//
// Tiling: a block of WARPS warps owns 16 * WARPS rows (queries in fwd/dq, keys in dkdv); each warp
// owns 16 of them and runs its matmuls on tensor cores through WMMA 16x16x16 fragments (fp16 and
// bf16 in, fp32 accumulate; the fp32 build runs the same code with scalar FMA warp matmuls).
// Operands are staged in shared memory with the head dim padded to DP (a multiple of 32, zero
// filled, so D = 80 runs as DP = 96), loaded with 16-byte vector loads when rows are 16-byte
// aligned (D a multiple of 8 halves / 4 floats), scalar loads otherwise. The shared-memory opt-in
// (cudaFuncSetAttribute) is made once per kernel instantiation and device, not per launch.
//
// What to expect: a tensor-core baseline meant to be correct, not a peak kernel. It compiles
// (csrc/check_nvcc.sh) but has not yet run on a GPU: the gpu-marked tests of
// tests/kernels/test_attention.py check it, benchmarks/bench_attention.py times it against SDPA,
// xformers and the Triton kernels. Given the costs below, expect it behind SDPA's flash/efficient
// kernels:
//   * accumulators (O, dK, dV, dQ) live in shared memory in fp32 (WMMA's register layout is
//     opaque and the forward rescales O row by row when the running max moves), so every
//     streamed tile loads and stores the accumulator tile once more;
//   * no cp.async double buffering: each K/V (or Q/dO) tile load is waited for before its math;
//   * shared memory per block (fp16/bf16, D = 64, 4 warps, 64-row tiles): forward 70.8 KB,
//     dK/dV 113.8 KB, dQ 96.8 KB, so on an H100 (228 KB per SM) 3, 1 and 2 blocks of 4 warps per
//     SM; on an A100 (164 KB) 2, 1 and 1. Low occupancy with no overlap of loads and math.
// The fix for all three is a hand-laid mma.sync kernel (accumulators in registers, ldmatrix,
// cp.async pipelining, as FlashAttention-2 does); it needs a GPU to be written safely. Until then
// ``auto`` only picks this backend for a shape class where it measured fastest.

#include "attention/attention_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <type_traits>

namespace r2d2 {
namespace attention {
namespace {

using namespace nvcuda;

constexpr float kLog2e = 1.4426950408889634f;
// Finite floor for the running max: exp2(floor - m) = 0 and exp2(floor - floor) = 1, never NaN.
constexpr float kFloor = -1.0e30f;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Warp-level C[16, N] (+)= A[16, K] B[K, N], all in shared memory. A is row-major; B is row-major
// (B_COL = false: B[k][n] = Bm[k * ldb + n]) or a transposed view of a row-major [N, K] tile
// (B_COL = true: B[k][n] = Bm[n * ldb + k]); C is fp32 row-major. N and K are multiples of 16.
template <typename T, bool B_COL>
struct WarpMM {
  __device__ static void run(const T* A, int lda, const T* Bm, int ldb, float* C, int ldc, int N,
                             int K, bool accumulate) {
    __syncwarp();
    for (int n = 0; n < N; n += 16) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
      if (accumulate) {
        wmma::load_matrix_sync(c, C + n, ldc, wmma::mem_row_major);
      } else {
        wmma::fill_fragment(c, 0.0f);
      }
      for (int kk = 0; kk < K; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, A + kk, lda);
        if constexpr (B_COL) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
          wmma::load_matrix_sync(b, Bm + n * ldb + kk, ldb);
          wmma::mma_sync(c, a, b, c);
        } else {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
          wmma::load_matrix_sync(b, Bm + kk * ldb + n, ldb);
          wmma::mma_sync(c, a, b, c);
        }
      }
      wmma::store_matrix_sync(C + n, c, ldc, wmma::mem_row_major);
    }
    __syncwarp();
  }
};

// fp32: IEEE FMA, one output element per lane at a time (a correctness path, not a fast one).
template <bool B_COL>
struct WarpMM<float, B_COL> {
  __device__ static void run(const float* A, int lda, const float* Bm, int ldb, float* C, int ldc,
                             int N, int K, bool accumulate) {
    __syncwarp();
    const int lane = threadIdx.x & 31;
    for (int idx = lane; idx < 16 * N; idx += 32) {
      const int r = idx / N, n = idx % N;
      float acc = accumulate ? C[r * ldc + n] : 0.0f;
      for (int kk = 0; kk < K; ++kk) {
        acc = fmaf(A[r * lda + kk], B_COL ? Bm[n * ldb + kk] : Bm[kk * ldb + n], acc);
      }
      C[r * ldc + n] = acc;
    }
    __syncwarp();
  }
};

// Shared-memory geometry. Leading dims are padded (+8 halves / +4 floats) against bank conflicts
// and stay multiples of 8 / 4 as WMMA requires; every region starts 128-byte aligned.
template <typename T, int DP, int WARPS, int TILE>
struct Cfg {
  static constexpr int kRows = 16 * WARPS;  // rows a block owns
  static constexpr int kThreads = 32 * WARPS;
  static constexpr int kLdT = DP + 8;    // T tiles [*, DP]
  static constexpr int kLdS = TILE + 4;  // fp32 score tiles [kRows, TILE]
  static constexpr int kLdP = TILE + 8;  // T probability tiles [kRows, TILE]
  static constexpr int kLdO = DP + 4;    // fp32 accumulators [kRows, DP]
};

struct Bump {
  size_t off = 0;
  template <typename U>
  __host__ __device__ size_t take(size_t n) {
    const size_t o = (off + 127) & ~size_t{127};
    off = o + n * sizeof(U);
    return o;
  }
};

enum Kind : int { kFwd = 0, kDkdv = 1, kDq = 2 };

// One layout for the three main kernels: "own" rows [kRows, DP] (Q / K,V / Q,dO), streamed rows
// [TILE, DP] x2, fp32 score tiles, one T tile, fp32 accumulators, per-row statistics and
// per-key validity flags. The forward needs one own tile, one score tile and one accumulator
// (O); dK/dV two of each; dQ two own and score tiles but one accumulator. Unused regions take no
// bytes (shared memory per block is what limits blocks per SM here).
template <typename T, int DP, int WARPS, int TILE, int KIND>
struct Layout {
  using C = Cfg<T, DP, WARPS, TILE>;
  size_t own0, own1, str0, str1, s0, s1, p, acc0, acc1, stat0, stat1, kval, bytes;
  __host__ __device__ Layout() {
    Bump b;
    constexpr int two = KIND == kFwd ? 0 : 1;
    constexpr int two_acc = KIND == kDkdv ? 1 : 0;
    own0 = b.take<T>(C::kRows * C::kLdT);
    own1 = b.take<T>(two * C::kRows * C::kLdT);
    str0 = b.take<T>(TILE * C::kLdT);
    str1 = b.take<T>(TILE * C::kLdT);
    s0 = b.take<float>(C::kRows * C::kLdS);
    s1 = b.take<float>(two * C::kRows * C::kLdS);
    p = b.take<T>(C::kRows * C::kLdP);
    acc0 = b.take<float>(C::kRows * C::kLdO);
    acc1 = b.take<float>(two_acc * C::kRows * C::kLdO);
    stat0 = b.take<float>(TILE > C::kRows ? TILE : C::kRows);
    stat1 = b.take<float>(TILE > C::kRows ? TILE : C::kRows);
    kval = b.take<int>(TILE > C::kRows ? TILE : C::kRows);
    bytes = b.off;
  }
};

// Rows [r0, r0 + rows) of a contiguous [L, D] matrix into dst [rows, DP] (leading dim ld), zero
// padded. A row whose ok[r] is 0 (a padded key) is zero filled without being read: its p is 0,
// but 0 * (NaN or Inf left in a padding slot) would still poison p @ V and dS @ K.
// 16-byte loads (8 halves / 4 floats per thread) when every row start is 16-byte aligned: D a
// multiple of the vector width and src aligned (a torch allocation is; a sliced view may not
// be). Otherwise (e.g. D = 33) rows start misaligned and the scalar loop runs instead. dst rows
// are always aligned: region bases are 128-byte aligned and ld * sizeof(T) is a multiple of 16.
template <typename T, int DP>
__device__ void load_rows(T* dst, int ld, const T* __restrict__ src, int r0, int rows, int L,
                          int D, const int* ok = nullptr) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  static_assert(DP % kVec == 0, "DP must be a multiple of the 16-byte vector width");
  if (D % kVec == 0 && (reinterpret_cast<uintptr_t>(src) & 15) == 0) {
    constexpr int kChunks = DP / kVec;
    for (int i = threadIdx.x; i < rows * kChunks; i += blockDim.x) {
      const int r = i / kChunks, c = (i % kChunks) * kVec, g = r0 + r;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);  // all-zero bits: +0 in fp16, bf16 and fp32
      if (g < L && c < D && (ok == nullptr || ok[r])) {  // c < D implies c + kVec <= D here
        val = __ldg(reinterpret_cast<const uint4*>(src + static_cast<size_t>(g) * D + c));
      }
      *reinterpret_cast<uint4*>(dst + r * ld + c) = val;
    }
    return;
  }
  for (int i = threadIdx.x; i < rows * DP; i += blockDim.x) {
    const int r = i / DP, c = i % DP, g = r0 + r;
    const bool in = g < L && c < D && (ok == nullptr || ok[r]);
    dst[r * ld + c] = in ? src[static_cast<size_t>(g) * D + c] : from_f<T>(0.0f);
  }
}

__device__ __forceinline__ bool key_valid(const uint8_t* mask, int b, int key, int Lk) {
  return key < Lk && (mask == nullptr || mask[static_cast<size_t>(b) * Lk + key] != 0);
}

__device__ __forceinline__ bool keep(const Problem& pr, int bh, int row, int key) {
  const uint32_t off = pr.offset + (static_cast<uint32_t>(bh) * static_cast<uint32_t>(pr.Lq) +
                                    static_cast<uint32_t>(row)) * static_cast<uint32_t>(pr.Lk) +
                       static_cast<uint32_t>(key);
  return philox_uniform(pr.seed, off) >= pr.dropout_p;
}

// One block per 16*WARPS queries; streams TILE keys at a time, skipping padding tiles and (causal)
// the tiles above the block's diagonal.
// minBlocksPerSM = 1, as dkdv_kernel (see there). With the causal bounds added, ptxas (nvcc 13.0)
// spilled a loop invariant inside the key-tile loop without it (sm_90: fwd fp16 DP 128 8/12 B at
// 72 registers; dq fp16 DP 96, fp32 DP 96 and 128 8/8 B; sm_80: dq fp16 DP 128 12/20 B). With it
// no attention kernel spills on either arch (ptxas -v), at 59-136 registers a thread (fwd and dq,
// both archs): at most 17.4K registers a block of <= 128 threads, so registers allow >= 3 blocks
// per SM where shared memory (29-99 KB a block) allows 1-7: shared memory still bounds occupancy.
template <typename T, int DP, int WARPS, int TILE>
__global__ void __launch_bounds__(32 * WARPS, 1)
    fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
               const uint8_t* __restrict__ mask, T* __restrict__ o, float* __restrict__ lse,
               const Problem pr) {
  using C = Cfg<T, DP, WARPS, TILE>;
  extern __shared__ __align__(128) unsigned char smem[];
  const Layout<T, DP, WARPS, TILE, kFwd> L;
  T* Qs = reinterpret_cast<T*>(smem + L.own0);
  T* Ks = reinterpret_cast<T*>(smem + L.str0);
  T* Vs = reinterpret_cast<T*>(smem + L.str1);
  float* S = reinterpret_cast<float*>(smem + L.s0);
  T* P = reinterpret_cast<T*>(smem + L.p);
  float* O = reinterpret_cast<float*>(smem + L.acc0);
  float* row_m = reinterpret_cast<float*>(smem + L.stat0);
  float* row_l = reinterpret_cast<float*>(smem + L.stat1);
  int* kval = reinterpret_cast<int*>(smem + L.kval);

  const int bh = blockIdx.x, b = bh / pr.H, m0 = blockIdx.y * C::kRows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wr = warp * 16;
  const int Lq = pr.Lq, Lk = pr.Lk, D = pr.D;
  const T* kb = k + static_cast<size_t>(bh) * Lk * D;
  const T* vb = v + static_cast<size_t>(bh) * Lk * D;
  load_rows<T, DP>(Qs, C::kLdT, q + static_cast<size_t>(bh) * Lq * D, m0, C::kRows, Lq, D);
  for (int i = threadIdx.x; i < C::kRows * C::kLdO; i += C::kThreads) O[i] = 0.0f;
  for (int i = threadIdx.x; i < C::kRows; i += C::kThreads) {
    row_m[i] = kFloor;
    row_l[i] = 0.0f;
  }
  const float qk_scale = pr.scale * kLog2e;
  const float inv_keep = 1.0f / (1.0f - pr.dropout_p);
  const bool dropout = pr.dropout_p > 0.0f;
  // Two lanes per row of the warp's 16; each takes every other column.
  const int r = wr + (lane >> 1), half = lane & 1, row = m0 + r;
  // Causal: key tiles from n_end on are wholly above this block's diagonal and never visited;
  // only tiles reaching past the keys every row sees (n_full) test causality per element.
  const int n_end = pr.causal ? causal_key_end(m0, C::kRows, Lq, Lk) : Lk;
  const int n_full = pr.causal ? causal_key_full(m0, Lq, Lk) : INT_MAX;

  for (int n0 = 0; n0 < n_end; n0 += TILE) {
    __syncthreads();  // the previous tile's K/V are no longer read
    int any = 0;
    for (int j = threadIdx.x; j < TILE; j += C::kThreads) {
      kval[j] = key_valid(mask, b, n0 + j, Lk);
      any |= kval[j];
    }
    if (!__syncthreads_or(any)) continue;  // a tile of padding only: no loads, no math
    load_rows<T, DP>(Ks, C::kLdT, kb, n0, TILE, Lk, D, kval);
    load_rows<T, DP>(Vs, C::kLdT, vb, n0, TILE, Lk, D, kval);
    __syncthreads();
    WarpMM<T, true>::run(Qs + wr * C::kLdT, C::kLdT, Ks, C::kLdT, S + wr * C::kLdS, C::kLdS, TILE,
                         DP, false);
    const float* s = S + r * C::kLdS;
    const bool diag = n0 + TILE > n_full;  // straddles the diagonal: test each key
    float mx = kFloor;
    for (int j = half; j < TILE; j += 2) {
      if (kval[j] && (!diag || causal_sees(row, n0 + j, Lq, Lk))) {
        mx = fmaxf(mx, s[j] * qk_scale);
      }
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_old = row_m[r];
    const float m_new = fmaxf(m_old, mx);
    const float alpha = exp2f(m_old - m_new);
    float sum = 0.0f;
    T* p = P + r * C::kLdP;
    for (int j = half; j < TILE; j += 2) {
      const bool seen = kval[j] && (!diag || causal_sees(row, n0 + j, Lq, Lk));
      float pj = seen ? exp2f(s[j] * qk_scale - m_new) : 0.0f;
      sum += pj;  // the normaliser uses undropped weights
      if (dropout) pj = keep(pr, bh, row, n0 + j) ? pj * inv_keep : 0.0f;
      p[j] = from_f<T>(pj);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    float* orow = O + r * C::kLdO;
    for (int d = half; d < DP; d += 2) orow[d] *= alpha;
    __syncwarp();  // both lanes of the row have read row_m / row_l
    if (half == 0) {
      row_m[r] = m_new;
      row_l[r] = row_l[r] * alpha + sum;
    }
    WarpMM<T, false>::run(P + wr * C::kLdP, C::kLdP, Vs, C::kLdT, O + wr * C::kLdO, C::kLdO, DP,
                          TILE, true);
  }
  __syncthreads();
  if (row < Lq) {
    const float l = row_l[r];
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // no attended key: zeros
    T* orow = o + (static_cast<size_t>(bh) * Lq + row) * D;
    for (int d = half; d < D; d += 2) orow[d] = from_f<T>(O[r * C::kLdO + d] * inv);
    if (half == 0) {
      lse[static_cast<size_t>(bh) * Lq + row] = l > 0.0f ? row_m[r] + log2f(l) : INFINITY;
    }
  }
}

// delta[row] = sum_d dO[row, d] * O[row, d]; one warp per row.
template <typename T>
__global__ void delta_kernel(const T* __restrict__ dout, const T* __restrict__ o,
                             float* __restrict__ delta, int64_t rows, int D) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int lane = threadIdx.x & 31;
  float acc = 0.0f;
  for (int d = lane; d < D; d += 32) acc += to_f(dout[row * D + d]) * to_f(o[row * D + d]);
  for (int w = 16; w > 0; w >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, w);
  if (lane == 0) delta[row] = acc;
}

// One block per 16*WARPS keys; streams TILE queries at a time. Computes transposed tiles
// (keys x queries) so each warp's dK/dV rows are its own.
// minBlocksPerSM = 1: shared memory already bounds this kernel's occupancy (43.4 to 115.4 KB per
// block, plus 1 KB reserved: on sm_80 1 block per SM, 2 for fp32 DP 64, 3 for fp32 DP 32; on
// sm_90 1-2 for fp16/bf16, 1-5 for fp32), while its registers, even at 152 per thread, would
// allow 4 or more. Without the bound ptxas (nvcc 13.0) aimed for a higher occupancy on sm_90 and
// spilled loop invariants (shared-memory addresses; the Philox round keys, hoisted, take ~20
// registers) inside the query-tile loop: fp16 DP 128 96 registers / 20 B spilled, fp16 DP 96
// 80 / 4 B, fp32 DP 32, 96, 128 56-64 / 4 B. With it: 79-152 registers on both archs, no spills.
template <typename T, int DP, int WARPS, int TILE>
__global__ void __launch_bounds__(32 * WARPS, 1)
    dkdv_kernel(const T* __restrict__ dout, const T* __restrict__ q, const T* __restrict__ k,
                const T* __restrict__ v, const float* __restrict__ lse,
                const float* __restrict__ delta, const uint8_t* __restrict__ mask,
                T* __restrict__ dk, T* __restrict__ dv, const Problem pr) {
  using C = Cfg<T, DP, WARPS, TILE>;
  extern __shared__ __align__(128) unsigned char smem[];
  const Layout<T, DP, WARPS, TILE, kDkdv> L;
  T* Ks = reinterpret_cast<T*>(smem + L.own0);
  T* Vs = reinterpret_cast<T*>(smem + L.own1);
  T* Qs = reinterpret_cast<T*>(smem + L.str0);
  T* dOs = reinterpret_cast<T*>(smem + L.str1);
  float* St = reinterpret_cast<float*>(smem + L.s0);
  float* dPt = reinterpret_cast<float*>(smem + L.s1);
  T* Pt = reinterpret_cast<T*>(smem + L.p);
  float* dK = reinterpret_cast<float*>(smem + L.acc0);
  float* dV = reinterpret_cast<float*>(smem + L.acc1);
  float* lse_s = reinterpret_cast<float*>(smem + L.stat0);
  float* delta_s = reinterpret_cast<float*>(smem + L.stat1);
  int* kval = reinterpret_cast<int*>(smem + L.kval);

  const int bh = blockIdx.x, b = bh / pr.H, n0 = blockIdx.y * C::kRows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wr = warp * 16;
  const int Lq = pr.Lq, Lk = pr.Lk, D = pr.D;
  const size_t qoff = static_cast<size_t>(bh) * Lq * D, koff = static_cast<size_t>(bh) * Lk * D;
  int any = 0;
  for (int j = threadIdx.x; j < C::kRows; j += C::kThreads) {
    kval[j] = key_valid(mask, b, n0 + j, Lk);
    any |= kval[j];
  }
  for (int i = threadIdx.x; i < C::kRows * C::kLdO; i += C::kThreads) dK[i] = dV[i] = 0.0f;
  // Keys that are all padding get zero gradients without touching q or dO.
  if (__syncthreads_or(any)) {
    load_rows<T, DP>(Ks, C::kLdT, k + koff, n0, C::kRows, Lk, D, kval);
    load_rows<T, DP>(Vs, C::kLdT, v + koff, n0, C::kRows, Lk, D, kval);
    const float qk_scale = pr.scale * kLog2e;
    const float inv_keep = 1.0f / (1.0f - pr.dropout_p);
    const bool dropout = pr.dropout_p > 0.0f;
    // Causal: query tiles before m_begin see none of this block's keys and are never visited;
    // those starting at or after m_full see all of them (no per-element test).
    const int n_last = (n0 + C::kRows < Lk ? n0 + C::kRows : Lk) - 1;
    const int m_begin = pr.causal ? causal_first_query(n0, Lq, Lk) / TILE * TILE : 0;
    const int m_full = pr.causal ? causal_first_query(n_last, Lq, Lk) : 0;
    for (int m0 = m_begin; m0 < Lq; m0 += TILE) {
      __syncthreads();  // previous query tile no longer read
      load_rows<T, DP>(Qs, C::kLdT, q + qoff, m0, TILE, Lq, D);
      load_rows<T, DP>(dOs, C::kLdT, dout + qoff, m0, TILE, Lq, D);
      for (int i = threadIdx.x; i < TILE; i += C::kThreads) {
        const bool in = m0 + i < Lq;  // +inf LSE makes p = 0 for absent rows
        lse_s[i] = in ? lse[static_cast<size_t>(bh) * Lq + m0 + i] : INFINITY;
        delta_s[i] = in ? delta[static_cast<size_t>(bh) * Lq + m0 + i] : 0.0f;
      }
      __syncthreads();
      WarpMM<T, true>::run(Ks + wr * C::kLdT, C::kLdT, Qs, C::kLdT, St + wr * C::kLdS, C::kLdS,
                           TILE, DP, false);
      WarpMM<T, true>::run(Vs + wr * C::kLdT, C::kLdT, dOs, C::kLdT, dPt + wr * C::kLdS, C::kLdS,
                           TILE, DP, false);
      const bool diag = m0 < m_full;
      for (int idx = lane; idx < 16 * TILE; idx += 32) {
        const int r = wr + idx / TILE, j = idx % TILE;
        const bool seen = kval[r] && (!diag || causal_sees(m0 + j, n0 + r, Lq, Lk));
        const float p = seen ? exp2f(St[r * C::kLdS + j] * qk_scale - lse_s[j]) : 0.0f;
        float dp = dPt[r * C::kLdS + j], pd = p;
        if (dropout) {
          const bool kp = keep(pr, bh, m0 + j, n0 + r);
          pd = kp ? p * inv_keep : 0.0f;
          dp = kp ? dp * inv_keep : 0.0f;
        }
        Pt[r * C::kLdP + j] = from_f<T>(pd);
        St[r * C::kLdS + j] = p * (dp - delta_s[j]);  // dS^T, fp32
      }
      WarpMM<T, false>::run(Pt + wr * C::kLdP, C::kLdP, dOs, C::kLdT, dV + wr * C::kLdO, C::kLdO,
                            DP, TILE, true);
      for (int idx = lane; idx < 16 * TILE; idx += 32) {
        const int r = wr + idx / TILE, j = idx % TILE;
        Pt[r * C::kLdP + j] = from_f<T>(St[r * C::kLdS + j]);
      }
      WarpMM<T, false>::run(Pt + wr * C::kLdP, C::kLdP, Qs, C::kLdT, dK + wr * C::kLdO, C::kLdO,
                            DP, TILE, true);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < C::kRows * D; i += C::kThreads) {
    const int r = i / D, d = i % D, key = n0 + r;
    if (key >= Lk) continue;
    const size_t g = koff + static_cast<size_t>(key) * D + d;
    dk[g] = from_f<T>(dK[r * C::kLdO + d] * pr.scale);
    dv[g] = from_f<T>(dV[r * C::kLdO + d]);
  }
}

// One block per 16*WARPS queries; streams TILE keys at a time, skipping padding tiles and (causal)
// the tiles above the block's diagonal. minBlocksPerSM = 1: see fwd_kernel.
template <typename T, int DP, int WARPS, int TILE>
__global__ void __launch_bounds__(32 * WARPS, 1)
    dq_kernel(const T* __restrict__ dout, const T* __restrict__ q, const T* __restrict__ k,
              const T* __restrict__ v, const float* __restrict__ lse,
              const float* __restrict__ delta, const uint8_t* __restrict__ mask,
              T* __restrict__ dq, const Problem pr) {
  using C = Cfg<T, DP, WARPS, TILE>;
  extern __shared__ __align__(128) unsigned char smem[];
  const Layout<T, DP, WARPS, TILE, kDq> L;
  T* Qs = reinterpret_cast<T*>(smem + L.own0);
  T* dOs = reinterpret_cast<T*>(smem + L.own1);
  T* Ks = reinterpret_cast<T*>(smem + L.str0);
  T* Vs = reinterpret_cast<T*>(smem + L.str1);
  float* S = reinterpret_cast<float*>(smem + L.s0);
  float* dP = reinterpret_cast<float*>(smem + L.s1);
  T* dS = reinterpret_cast<T*>(smem + L.p);
  float* dQ = reinterpret_cast<float*>(smem + L.acc0);
  float* lse_s = reinterpret_cast<float*>(smem + L.stat0);
  float* delta_s = reinterpret_cast<float*>(smem + L.stat1);
  int* kval = reinterpret_cast<int*>(smem + L.kval);

  const int bh = blockIdx.x, b = bh / pr.H, m0 = blockIdx.y * C::kRows;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wr = warp * 16;
  const int Lq = pr.Lq, Lk = pr.Lk, D = pr.D;
  const size_t qoff = static_cast<size_t>(bh) * Lq * D, koff = static_cast<size_t>(bh) * Lk * D;
  load_rows<T, DP>(Qs, C::kLdT, q + qoff, m0, C::kRows, Lq, D);
  load_rows<T, DP>(dOs, C::kLdT, dout + qoff, m0, C::kRows, Lq, D);
  for (int i = threadIdx.x; i < C::kRows; i += C::kThreads) {
    const bool in = m0 + i < Lq;
    lse_s[i] = in ? lse[static_cast<size_t>(bh) * Lq + m0 + i] : INFINITY;
    delta_s[i] = in ? delta[static_cast<size_t>(bh) * Lq + m0 + i] : 0.0f;
  }
  for (int i = threadIdx.x; i < C::kRows * C::kLdO; i += C::kThreads) dQ[i] = 0.0f;
  const float qk_scale = pr.scale * kLog2e;
  const float inv_keep = 1.0f / (1.0f - pr.dropout_p);
  const bool dropout = pr.dropout_p > 0.0f;
  // Causal: the forward's bounds (tiles from n_end on never visited, per-element test only on
  // tiles reaching past n_full).
  const int n_end = pr.causal ? causal_key_end(m0, C::kRows, Lq, Lk) : Lk;
  const int n_full = pr.causal ? causal_key_full(m0, Lq, Lk) : INT_MAX;
  for (int n0 = 0; n0 < n_end; n0 += TILE) {
    __syncthreads();
    int any = 0;
    for (int j = threadIdx.x; j < TILE; j += C::kThreads) {
      kval[j] = key_valid(mask, b, n0 + j, Lk);
      any |= kval[j];
    }
    if (!__syncthreads_or(any)) continue;
    load_rows<T, DP>(Ks, C::kLdT, k + koff, n0, TILE, Lk, D, kval);
    load_rows<T, DP>(Vs, C::kLdT, v + koff, n0, TILE, Lk, D, kval);
    __syncthreads();
    WarpMM<T, true>::run(Qs + wr * C::kLdT, C::kLdT, Ks, C::kLdT, S + wr * C::kLdS, C::kLdS, TILE,
                         DP, false);
    WarpMM<T, true>::run(dOs + wr * C::kLdT, C::kLdT, Vs, C::kLdT, dP + wr * C::kLdS, C::kLdS,
                         TILE, DP, false);
    const bool diag = n0 + TILE > n_full;
    for (int idx = lane; idx < 16 * TILE; idx += 32) {
      const int r = wr + idx / TILE, j = idx % TILE;
      const bool seen = kval[j] && (!diag || causal_sees(m0 + r, n0 + j, Lq, Lk));
      const float p = seen ? exp2f(S[r * C::kLdS + j] * qk_scale - lse_s[r]) : 0.0f;
      float dp = dP[r * C::kLdS + j];
      if (dropout) dp = keep(pr, bh, m0 + r, n0 + j) ? dp * inv_keep : 0.0f;
      dS[r * C::kLdP + j] = from_f<T>(p * (dp - delta_s[r]));
    }
    WarpMM<T, false>::run(dS + wr * C::kLdP, C::kLdP, Ks, C::kLdT, dQ + wr * C::kLdO, C::kLdO, DP,
                          TILE, true);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < C::kRows * D; i += C::kThreads) {
    const int r = i / D, d = i % D, row = m0 + r;
    if (row < Lq) {
      dq[qoff + static_cast<size_t>(row) * D + d] = from_f<T>(dQ[r * C::kLdO + d] * pr.scale);
    }
  }
}

int ceil_div(int a, int b) { return (a + b - 1) / b; }

constexpr int kDeltaThreads = 256;  // delta_kernel's block

// Row blocks run along grid.y (<= 65535); the binding rejects L > kMaxSeqLen, this is a backstop.
bool grid_y_ok(int L, int rows_per_block) { return ceil_div(L, rows_per_block) <= 65535; }

// Block shape per element type: fp16/bf16 use 4 warps (2 for DP > 64, to stay within shared
// memory) and 64-row streamed tiles; fp32 uses 2 warps and 32-row tiles.
template <typename T, int DP>
struct Pick {
  static constexpr bool kF32 = sizeof(T) == 4;
  static constexpr int kWarps = kF32 ? 2 : (DP <= 64 ? 4 : 2);
  static constexpr int kTile = kF32 ? 32 : 64;
};

// Opting a kernel into > 48 KB of dynamic shared memory is a per-device driver call; it is made
// once per (kernel instantiation, device), not per launch. Each caller below launches one kernel
// instantiation with one fixed size, so a per-caller flag array keys it exactly.
constexpr int kMaxDevices = 64;  // devices past this simply set the attribute on every launch
constexpr cudaDeviceAttr kOptinAttr = cudaDevAttrMaxSharedMemoryPerBlockOptin;

// Over the device's opt-in maximum (fp16 D = 64 dK/dV, 113.8 KB, on a 99 KB sm_86/89 part) the
// binding words cudaErrorLaunchOutOfResources; cudaFuncSetAttribute would say "invalid argument".
template <typename Kernel>
cudaError_t prepare(Kernel kernel, size_t bytes, std::atomic<bool> (&ready)[kMaxDevices]) {
  int dev = 0;
  if (cudaError_t e = cudaGetDevice(&dev)) return e;  // the binding's device guard set it
  const bool known = dev >= 0 && dev < kMaxDevices;
  if (known && ready[dev].load(std::memory_order_acquire)) return cudaSuccess;
  int optin = 0;
  if (cudaError_t e = cudaDeviceGetAttribute(&optin, kOptinAttr, dev)) return e;
  if (bytes > static_cast<size_t>(optin)) return cudaErrorLaunchOutOfResources;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(bytes));
  if (e == cudaSuccess && known) ready[dev].store(true, std::memory_order_release);
  return e;  // concurrent first calls may both set it: idempotent
}

template <typename T, int DP>
int fwd_t(const void* q, const void* k, const void* v, const uint8_t* mask, void* o, float* lse,
          const Problem& pr, cudaStream_t stream) {
  constexpr int W = Pick<T, DP>::kWarps, TL = Pick<T, DP>::kTile;
  const Layout<T, DP, W, TL, kFwd> L;
  auto kern = fwd_kernel<T, DP, W, TL>;
  static std::atomic<bool> ready[kMaxDevices];  // zero-initialised: static storage
  if (!grid_y_ok(pr.Lq, 16 * W)) return cudaErrorInvalidConfiguration;
  if (cudaError_t e = prepare(kern, L.bytes, ready)) return e;
  const dim3 grid(pr.B * pr.H, ceil_div(pr.Lq, 16 * W));
  kern<<<grid, 32 * W, L.bytes, stream>>>(static_cast<const T*>(q), static_cast<const T*>(k),
                                          static_cast<const T*>(v), mask, static_cast<T*>(o), lse,
                                          pr);
  return cudaGetLastError();
}

template <typename T, int DP>
int bwd_t(const void* dout, const void* q, const void* k, const void* v, const void* o,
          const float* lse, const uint8_t* mask, float* delta, void* dq, void* dk, void* dv,
          const Problem& pr, cudaStream_t stream) {
  constexpr int W = Pick<T, DP>::kWarps, TL = Pick<T, DP>::kTile;
  const Layout<T, DP, W, TL, kDkdv> L_kv;
  const Layout<T, DP, W, TL, kDq> L_dq;
  static std::atomic<bool> ready_kv[kMaxDevices], ready_q[kMaxDevices];
  const T* dO = static_cast<const T*>(dout);
  const T* Q = static_cast<const T*>(q);
  const T* K = static_cast<const T*>(k);
  const T* V = static_cast<const T*>(v);
  if (!grid_y_ok(pr.Lq, 16 * W) || !grid_y_ok(pr.Lk, 16 * W)) return cudaErrorInvalidConfiguration;
  const int64_t rows = static_cast<int64_t>(pr.B) * pr.H * pr.Lq;
  constexpr int kRowsPerBlock = kDeltaThreads / 32;  // one warp per row
  delta_kernel<T><<<static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock),
                    kDeltaThreads, 0, stream>>>(
      dO, static_cast<const T*>(o), delta, rows, pr.D);
  if (cudaError_t e = cudaGetLastError()) return e;
  auto kdkdv = dkdv_kernel<T, DP, W, TL>;
  if (cudaError_t e = prepare(kdkdv, L_kv.bytes, ready_kv)) return e;
  kdkdv<<<dim3(pr.B * pr.H, ceil_div(pr.Lk, 16 * W)), 32 * W, L_kv.bytes, stream>>>(
      dO, Q, K, V, lse, delta, mask, static_cast<T*>(dk), static_cast<T*>(dv), pr);
  if (cudaError_t e = cudaGetLastError()) return e;
  auto kdq = dq_kernel<T, DP, W, TL>;
  if (cudaError_t e = prepare(kdq, L_dq.bytes, ready_q)) return e;
  kdq<<<dim3(pr.B * pr.H, ceil_div(pr.Lq, 16 * W)), 32 * W, L_dq.bytes, stream>>>(
      dO, Q, K, V, lse, delta, mask, static_cast<T*>(dq), pr);
  return cudaGetLastError();
}

// D is padded to DP in {32, 64, 96, 128}.
template <typename T, typename F>
int by_head_dim(int D, F&& f) {
  if (D <= 32) return f(std::integral_constant<int, 32>{});
  if (D <= 64) return f(std::integral_constant<int, 64>{});
  if (D <= 96) return f(std::integral_constant<int, 96>{});
  if (D <= kMaxHeadDim) return f(std::integral_constant<int, 128>{});
  return static_cast<int>(cudaErrorInvalidValue);
}

template <typename F>
int by_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

template <typename T>
const char* type_name();
template <>
const char* type_name<float>() { return "float"; }
template <>
const char* type_name<__half>() { return "__half"; }
template <>
const char* type_name<__nv_bfloat16>() { return "__nv_bfloat16"; }

struct ConfigSink {
  LaunchConfig* out;
  int cap, n;
  void add(const char* kernel, const char* type, int dp, int w, int tile, int threads,
           size_t bytes) {
    if (n < cap) {
      if (dp > 0) {
        snprintf(out[n].kernel, sizeof(out[n].kernel), "%s<%s, %d, %d, %d>", kernel, type, dp, w,
                 tile);
      } else {
        snprintf(out[n].kernel, sizeof(out[n].kernel), "%s<%s>", kernel, type);
      }
      out[n].threads = threads;
      out[n].smem_bytes = bytes;
    }
    ++n;
  }
};

// What fwd_t / bwd_t launch for (T, DP).
template <typename T, int DP>
void add_configs(ConfigSink& sink) {
  constexpr int W = Pick<T, DP>::kWarps, TL = Pick<T, DP>::kTile;
  const char* t = type_name<T>();
  sink.add("fwd_kernel", t, DP, W, TL, 32 * W, Layout<T, DP, W, TL, kFwd>().bytes);
  sink.add("dkdv_kernel", t, DP, W, TL, 32 * W, Layout<T, DP, W, TL, kDkdv>().bytes);
  sink.add("dq_kernel", t, DP, W, TL, 32 * W, Layout<T, DP, W, TL, kDq>().bytes);
}

}  // namespace

int attention_launch_configs(LaunchConfig* out, int cap) {
  ConfigSink sink{out, cap, 0};
  for (DType dt : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    by_dtype(dt, [&](auto tag) {
      using T = decltype(tag);
      sink.add("delta_kernel", type_name<T>(), 0, 0, 0, kDeltaThreads, 0);  // bwd_t's launch
      // One head dim per padded DP, through the launchers' own dispatch.
      for (int D : {32, 64, 96, kMaxHeadDim}) {
        by_head_dim<T>(D, [&](auto dp) {
          add_configs<T, decltype(dp)::value>(sink);
          return 0;
        });
      }
      return 0;
    });
  }
  return sink.n;
}

int attention_fwd_cuda(DType dtype, const void* q, const void* k, const void* v,
                       const uint8_t* mask, void* o, float* lse, const Problem& pr,
                       cudaStream_t stream) {
  if (pr.B * pr.H == 0 || pr.Lq == 0) return 0;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return by_head_dim<T>(pr.D, [&](auto dp) {
      return fwd_t<T, decltype(dp)::value>(q, k, v, mask, o, lse, pr, stream);
    });
  });
}

int attention_bwd_cuda(DType dtype, const void* dout, const void* q, const void* k, const void* v,
                       const void* o, const float* lse, const uint8_t* mask, float* delta,
                       void* dq, void* dk, void* dv, const Problem& pr, cudaStream_t stream) {
  if (pr.B * pr.H == 0) return 0;
  return by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return by_head_dim<T>(pr.D, [&](auto dp) {
      return bwd_t<T, decltype(dp)::value>(dout, q, k, v, o, lse, mask, delta, dq, dk, dv, pr,
                                           stream);
    });
  });
}

}  // namespace attention
}  // namespace r2d2
