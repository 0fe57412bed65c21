// GCPR contrastive loss: CUDA kernels (math, layout and grid in contrastive_kernel.h).
//
// Every kernel is a loop over logit tiles whose similarity is built by sim_tile: 64-wide feature
// chunks of both operands are converted to fp32 into shared memory (rows padded to 65 floats so
// that column-wise reads do not bank-conflict) and each of the 256 threads accumulates 4 outputs
// of the R x C tile in registers. Forward row statistics: one warp per row (2 rows a warp), lane
// l holding columns l and l + 32, shuffles for the reductions, so every lane holds the row's
// state. Forward column statistics: thread t takes column t % 64 over rows 4 (t / 64) .. + 3,
// and the four quarter partials are merged in order by the column's first 64 threads.
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
constexpr int kQuarters = kThreads / kTileCols;             // column-statistics row groups
constexpr int kRowsPerQuarter = kTileRows / kQuarters;
constexpr int kRowsPerWarp = kTileRows / (kThreads / 32);
static_assert(kTileRows * kTileCols == kPer * kThreads, "tile must be 4 outputs per thread");
static_assert(kColOwn * kTileCols == kPer * kThreads, "cols tile must be 4 outputs per thread");
static_assert(kTileCols * kChunk == 4 * kPer * kThreads, "staging loops assume 16 per thread");
static_assert(kTileCols == 64 && kRowsPerWarp == 2 && kRowsPerQuarter == 4, "layout constants");

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

// The counter-based noise of r2d2.kernels.contrastive.gumbel_noise (lowbias32 hash, then
// gumbel_from_bits: u = (2k + 1) 2^-25 exact below 1/2, v = 1 - u exact above, -log u by the
// atanh series there, so the noise is finite for every hash). setup.py builds with
// --use_fast_math, so logf / expf / division are the fast intrinsics: the series keeps u near 1
// away from __logf (absolute error ~2^-21 near 1, which would swamp -log u ~ 2^-25 there), and
// the remaining logs are of values away from 1 or only need absolute accuracy (~1e-6).
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
  const int32_t k = static_cast<int32_t>(h >> 8);
  float e;
  if (k >= (1 << 23)) {
    const float v = static_cast<float>(33554431 - 2 * k) * 2.9802322387695312e-08f;
    const float t = v / (2.f - v);
    const float t2 = t * t;
    float p = 0.058823529411764705f * t2 + 0.06666666666666667f;
    p = p * t2 + 0.07692307692307693f;
    p = p * t2 + 0.09090909090909091f;
    p = p * t2 + 0.1111111111111111f;
    p = p * t2 + 0.14285714285714285f;
    p = p * t2 + 0.2f;
    p = p * t2 + 0.3333333333333333f;
    p = p * t2 + 1.f;
    e = 2.f * t * p;
  } else {
    e = -logf(static_cast<float>(2 * k + 1) * 2.9802322387695312e-08f);
  }
  return -logf(e);
}

// dst[r][j] = src[r0 + r][k0 + j] for r < ROWS, j < kChunk (zero past nrows / D), as fp32.
// Element e = tid + it * kThreads of the row-major [ROWS, kChunk] chunk has j = tid % kChunk
// (kThreads is a multiple of kChunk) and r = tid / kChunk + it * (kThreads / kChunk): the column
// and its bounds test are the thread's own, so only the row advances.
template <typename T, int ROWS>
__device__ __forceinline__ void stage_rows(float* dst, const T* __restrict__ src, int64_t r0,
                                           int64_t nrows, int64_t k0, int64_t D) {
  static_assert(kThreads % kChunk == 0 && (ROWS * kChunk) % kThreads == 0, "staging layout");
  constexpr int kStep = kThreads / kChunk;
  const int j = threadIdx.x % kChunk;
  const bool col_ok = k0 + j < D;
  int64_t row = r0 + threadIdx.x / kChunk;
  const T* p = src + row * D + k0 + j;
  float* d = dst + (threadIdx.x / kChunk) * kPad + j;
#pragma unroll 4
  for (int it = 0; it < ROWS / kStep; ++it) {
    d[it * kStep * kPad] = col_ok && row < nrows ? to_f(*p) : 0.f;
    row += kStep;
    p += kStep * D;
  }
}

// acc[i] = A[a0 + r] . B[b0 + c] over the full feature dim, for idx = tid + i * kThreads,
// r = idx / C, c = idx % C; rows past na / nb read as zeros. sA [R][kPad], sB [C][kPad]. Every
// thread of the block must call it (it synchronises).
template <typename T, int R, int C>
__device__ void sim_tile(const T* __restrict__ A, int64_t a0, int64_t na, const T* __restrict__ B,
                         int64_t b0, int64_t nb, int64_t D, float* sA, float* sB, float acc[kPer]) {
  static_assert(R * C == kPer * kThreads, "tile must be 4 outputs per thread");
  const int tid = threadIdx.x;
#pragma unroll
  for (int i = 0; i < kPer; ++i) acc[i] = 0.f;
  for (int64_t k0 = 0; k0 < D; k0 += kChunk) {
    stage_rows<T, R>(sA, A, a0, na, k0, D);
    stage_rows<T, C>(sB, B, b0, nb, k0, D);
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

// Max of (value, index) with the lower index winning ties (torch.argmax's rule); the -1 of "no
// candidate" only ever meets -inf, which never wins.
__device__ __forceinline__ bool takes(float v2, int32_t i2, float v, int32_t i) {
  return v2 > v || (v2 == v && i2 < i);
}

__device__ __forceinline__ void warp_argmax(float& v, int32_t& i) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int32_t oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (takes(ov, oi, v, i)) { v = ov; i = oi; }
  }
}

// One row's or column's streaming statistics (fields as in the header).
struct Stat {
  float m, l, hs, cnt, tm, tl, tw, gv;
  int32_t gi;
};

__device__ __forceinline__ Stat stat_empty() {
  return Stat{-INFINITY, 0.f, 0.f, 0.f, -INFINITY, 0.f, 0.f, -INFINITY, -1};
}

// Online-softmax merge of (m, l) pairs, safe when both maxima are -inf; returns the factors.
__device__ __forceinline__ void merge_ml(float& m, float& l, float m2, float l2, float& f1,
                                         float& f2) {
  const float mn = fmaxf(m, m2);
  const float ref = mn > -INFINITY ? mn : 0.f;
  f1 = expf(m - ref);
  f2 = expf(m2 - ref);
  l = l * f1 + l2 * f2;
  m = mn;
}

__device__ __forceinline__ void stat_merge(Stat& a, const Stat& b, bool teacher, bool neg) {
  float f1, f2;
  merge_ml(a.m, a.l, b.m, b.l, f1, f2);
  a.hs += b.hs;
  a.cnt += b.cnt;
  if (teacher) {
    merge_ml(a.tm, a.tl, b.tm, b.tl, f1, f2);
    a.tw = a.tw * f1 + b.tw * f2;
  }
  if (neg && takes(b.gv, b.gi, a.gv, a.gi)) { a.gv = b.gv; a.gi = b.gi; }
}

// Load / store field-major statistics: field f of entry o at base[f * fs + o].
__device__ __forceinline__ Stat stat_load(const float* base, const int32_t* gi, int64_t fs,
                                          int64_t o, bool teacher, bool neg) {
  Stat s = stat_empty();
  s.m = base[o]; s.l = base[fs + o]; s.hs = base[2 * fs + o]; s.cnt = base[3 * fs + o];
  if (teacher) { s.tm = base[4 * fs + o]; s.tl = base[5 * fs + o]; s.tw = base[6 * fs + o]; }
  if (neg) { s.gv = base[(teacher ? 7 : 4) * fs + o]; s.gi = gi[o]; }
  return s;
}

__device__ __forceinline__ void stat_store(float* base, int32_t* gi, int64_t fs, int64_t o,
                                           const Stat& s, bool teacher, bool neg) {
  base[o] = s.m; base[fs + o] = s.l; base[2 * fs + o] = s.hs; base[3 * fs + o] = s.cnt;
  if (teacher) { base[4 * fs + o] = s.tm; base[5 * fs + o] = s.tl; base[6 * fs + o] = s.tw; }
  if (neg) { base[(teacher ? 7 : 4) * fs + o] = s.gv; gi[o] = s.gi; }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) fwd_kernel(FwdArgs a) {
  __shared__ float sA[kTileRows * kPad];
  __shared__ float sB[kTileCols * kPad];
  __shared__ float S[kTileRows * kTileCols];
  __shared__ float TS[kTileRows * kTileCols];
  __shared__ int64_t cid_s[kTileCols];
  __shared__ int64_t rid_s[kTileRows];
  __shared__ Stat quarter[kQuarters][kTileCols];
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const bool teacher = a.tq != nullptr;
  const float s = *a.scale;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int pr = blockIdx.x, pc = blockIdx.y;
  const int64_t nrb = cdiv(a.b, kTileRows), nct = cdiv(a.n, kTileCols);
  const int64_t ct0 = static_cast<int64_t>(pc) * a.tpc;
  const int64_t ct1 = ct0 + a.tpc < nct ? ct0 + a.tpc : nct;
  const int64_t rfs = static_cast<int64_t>(a.C) * a.b, cfs = static_cast<int64_t>(a.R) * a.n;
  for (int64_t rb = pr; rb < nrb; rb += a.R) {
    const int64_t r0 = rb * kTileRows;
    if (tid < kTileRows) rid_s[tid] = r0 + tid < a.b ? a.rid[r0 + tid] : 0;
    Stat row[kRowsPerWarp];
#pragma unroll
    for (int w = 0; w < kRowsPerWarp; ++w) row[w] = stat_empty();
    for (int64_t ct = ct0; ct < ct1; ++ct) {
      const int64_t c0 = ct * kTileCols;
      if (tid < kTileCols) cid_s[tid] = c0 + tid < a.n ? a.cid[c0 + tid] : 0;
      float acc[kPer];
      sim_tile<T, kTileRows, kTileCols>(q, r0, a.b, k, c0, a.n, a.D, sA, sB, acc);
#pragma unroll
      for (int i = 0; i < kPer; ++i) S[tid + i * kThreads] = s * acc[i];
      if (teacher) {
        sim_tile<T, kTileRows, kTileCols>(static_cast<const T*>(a.tq), r0, a.b,
                                          static_cast<const T*>(a.tk), c0, a.n, a.D, sA, sB, acc);
#pragma unroll
        for (int i = 0; i < kPer; ++i) TS[tid + i * kThreads] = s * acc[i];
      }
      __syncthreads();
      // Rows: warp `warp` owns rows 2 warp and 2 warp + 1 of the tile.
#pragma unroll
      for (int w = 0; w < kRowsPerWarp; ++w) {
        const int rl = warp * kRowsPerWarp + w;
        if (r0 + rl >= a.b) continue;  // warp-uniform
        Stat& st = row[w];
        float x[2], t[2];
        bool valid[2], same[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int c = lane + 32 * h;
          valid[h] = c0 + c < a.n;
          x[h] = valid[h] ? S[rl * kTileCols + c] : -INFINITY;
          t[h] = valid[h] && teacher ? TS[rl * kTileCols + c] : -INFINITY;
          same[h] = valid[h] && cid_s[c] == rid_s[rl];
        }
        // Every tile has a real column, so the new max is finite: no exp(inf - inf).
        const float m_new = fmaxf(st.m, warp_max(fmaxf(x[0], x[1])));
        st.l = st.l * expf(st.m - m_new) + warp_sum(expf(x[0] - m_new) + expf(x[1] - m_new));
        st.m = m_new;
        st.hs += warp_sum((same[0] ? x[0] : 0.f) + (same[1] ? x[1] : 0.f));
        st.cnt += warp_sum(static_cast<float>(same[0]) + static_cast<float>(same[1]));
        if (teacher) {
          const float tm_new = fmaxf(st.tm, warp_max(fmaxf(t[0], t[1])));
          const float corr = expf(st.tm - tm_new);
          const float p0 = expf(t[0] - tm_new), p1 = expf(t[1] - tm_new);
          st.tl = st.tl * corr + warp_sum(p0 + p1);
          st.tw = st.tw * corr + warp_sum((valid[0] ? p0 * x[0] : 0.f) +
                                          (valid[1] ? p1 * x[1] : 0.f));
          st.tm = tm_new;
        }
        if (a.neg) {
          float zv = -INFINITY;
          int32_t zi = -1;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int64_t c = c0 + lane + 32 * h;
            if (valid[h] && !same[h]) {
              const float z = x[h] + gumbel(a.key_r, a.row_off + r0 + rl, a.col_off + c);
              const int32_t zc = static_cast<int32_t>(a.col_off + c);
              if (takes(z, zc, zv, zi)) { zv = z; zi = zc; }
            }
          }
          warp_argmax(zv, zi);
          if (takes(zv, zi, st.gv, st.gi)) { st.gv = zv; st.gi = zi; }
        }
      }
      // Columns: thread (quarter qt, column c) over rows 4 qt .. 4 qt + 3 of the tile.
      {
        const int c = tid % kTileCols, qt = tid / kTileCols;
        Stat cs = stat_empty();
        if (c0 + c < a.n) {
          float mx = -INFINITY, tmx = -INFINITY;
#pragma unroll
          for (int rr = 0; rr < kRowsPerQuarter; ++rr) {
            const int rl = qt * kRowsPerQuarter + rr;
            if (r0 + rl < a.b) {
              mx = fmaxf(mx, S[rl * kTileCols + c]);
              if (teacher) tmx = fmaxf(tmx, TS[rl * kTileCols + c]);
            }
          }
          if (mx > -INFINITY) {  // this quarter has a real row
            cs.m = mx;
            cs.tm = tmx;
#pragma unroll
            for (int rr = 0; rr < kRowsPerQuarter; ++rr) {
              const int rl = qt * kRowsPerQuarter + rr;
              if (r0 + rl >= a.b) continue;
              const float x = S[rl * kTileCols + c];
              const bool same = rid_s[rl] == cid_s[c];
              cs.l += expf(x - mx);
              if (same) { cs.hs += x; cs.cnt += 1.f; }
              if (teacher) {
                const float p = expf(TS[rl * kTileCols + c] - tmx);
                cs.tl += p;
                cs.tw += p * x;
              }
              if (a.neg && !same) {  // rows ascend, so a strict > keeps the lowest index
                const float z = x + gumbel(a.key_c, a.col_off + c0 + c, a.row_off + r0 + rl);
                if (z > cs.gv) { cs.gv = z; cs.gi = static_cast<int32_t>(a.row_off + r0 + rl); }
              }
            }
          }
        }
        quarter[qt][c] = cs;
      }
      __syncthreads();
      if (tid < kTileCols && c0 + tid < a.n) {
        const int64_t o = static_cast<int64_t>(pr) * a.n + c0 + tid;
        // The block's first row block starts its slot; later ones merge into it.
        Stat acc_c = rb == pr ? stat_empty() : stat_load(a.cp, a.cgi, cfs, o, teacher, a.neg);
#pragma unroll
        for (int qt = 0; qt < kQuarters; ++qt) stat_merge(acc_c, quarter[qt][tid], teacher, a.neg);
        stat_store(a.cp, a.cgi, cfs, o, acc_c, teacher, a.neg);
      }
      __syncthreads();  // S, TS, quarter and cid_s are rewritten by the next tile
    }
    if (lane == 0) {
#pragma unroll
      for (int w = 0; w < kRowsPerWarp; ++w) {
        const int64_t r = r0 + warp * kRowsPerWarp + w;
        if (r < a.b)
          stat_store(a.rp, a.rgi, rfs, static_cast<int64_t>(pc) * a.b + r, row[w], teacher,
                     a.neg);
      }
    }
    __syncthreads();  // rid_s is rewritten by the next row block
  }
}

__global__ void __launch_bounds__(kThreads) merge_kernel(MergeArgs a) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= a.n) return;
  const int64_t pfs = static_cast<int64_t>(a.P) * a.n;
  Stat st = a.init ? stat_empty() : stat_load(a.st, a.sgi, a.n, c, a.teacher, a.neg);
  for (int p = 0; p < a.P; ++p)
    stat_merge(st, stat_load(a.p, a.pgi, pfs, static_cast<int64_t>(p) * a.n + c, a.teacher,
                             a.neg),
               a.teacher, a.neg);
  stat_store(a.st, a.sgi, a.n, c, st, a.teacher, a.neg);
}

// The two dlogit terms of one element (zero outside the real tile): A = a (p - tgt) (i2t),
// Bt = bcoef_c (p' - tgt') (t2i); dlogit = cn (A + Bt).
__device__ __forceinline__ void dl_terms(const BwdArgs& a, float s, float coef_a, float sim,
                                         float tsim, int64_t r, int64_t c, bool teacher,
                                         float& A, float& Bt) {
  A = Bt = 0.f;
  if (r >= a.b || c >= a.n) return;
  const float S = s * sim;
  const bool same = a.rid[r] == a.cid[c];
  float tgt = same ? a.rstat[2 * a.b + r] : 0.f;
  float tgtc = same ? a.cstat[2 * a.n + c] : 0.f;
  if (teacher) {
    const float tS = s * tsim;
    tgt = (1.f - a.alpha) * tgt + a.alpha * expf(tS - a.rstat[a.b + r]);
    tgtc = (1.f - a.alpha) * tgtc + a.alpha * expf(tS - a.cstat[a.n + c]);
  }
  A = coef_a * (expf(S - a.rstat[r]) - tgt);
  Bt = a.bcoef[c] * (expf(S - a.cstat[c]) - tgtc);
}

// Deterministic block sum of one float per thread (kThreads a power of two).
__device__ float block_sum(float v, float* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (int o = kThreads / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) red[threadIdx.x] += red[threadIdx.x + o];
    __syncthreads();
  }
  const float t = red[0];
  __syncthreads();
  return t;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_rows_kernel(BwdArgs a) {
  __shared__ float sA[kTileRows * kPad];
  __shared__ float sB[kTileCols * kPad];
  __shared__ float DL[kTileRows * kTileCols];
  __shared__ float red[kThreads];
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const bool teacher = a.tq != nullptr;
  const float s = *a.scale, coef_a = a.coef[0], cn = a.coef[1];
  const int tid = threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int sp = blockIdx.y;
  const int64_t nct = cdiv(a.n, kTileCols);
  const int64_t ct0 = static_cast<int64_t>(sp) * a.tps;
  const int64_t ct1 = ct0 + a.tps < nct ? ct0 + a.tps : nct;
  float* out = a.out == nullptr ? nullptr : a.out + static_cast<int64_t>(sp) * a.b * a.D;
  float ds = 0.f;
  for (int64_t ct = ct0; ct < ct1; ++ct) {
    const int64_t c0 = ct * kTileCols;
    float acc[kPer], tacc[kPer] = {0.f, 0.f, 0.f, 0.f};
    sim_tile<T, kTileRows, kTileCols>(q, r0, a.b, k, c0, a.n, a.D, sA, sB, acc);
    if (teacher)
      sim_tile<T, kTileRows, kTileCols>(static_cast<const T*>(a.tq), r0, a.b,
                                        static_cast<const T*>(a.tk), c0, a.n, a.D, sA, sB, tacc);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int idx = tid + i * kThreads;
      float A, Bt;
      dl_terms(a, s, coef_a, acc[i], tacc[i], r0 + idx / kTileCols, c0 + idx % kTileCols,
               teacher, A, Bt);
      DL[idx] = A + Bt;
      ds += A * acc[i];
    }
    if (out == nullptr) continue;  // block-uniform; sim_tile's last sync already passed
    __syncthreads();
    for (int64_t d0 = 0; d0 < a.D; d0 += kChunk) {
      // Stage K[c0 .. c0 + 63, d0 .. d0 + 63] into sB (free: the similarity is done).
      for (int e = tid; e < kTileCols * kChunk; e += kThreads) {
        const int c = e / kChunk, j = e % kChunk;
        const bool ok = c0 + c < a.n && d0 + j < a.D;
        sB[c * kPad + j] = ok ? to_f(k[(c0 + c) * a.D + d0 + j]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int idx = tid + i * kThreads;
        const int rl = idx / kChunk, j = idx % kChunk;
        float v = 0.f;
#pragma unroll 16
        for (int c = 0; c < kTileCols; ++c) v = fmaf(DL[rl * kTileCols + c], sB[c * kPad + j], v);
        const int64_t r = r0 + rl, dj = d0 + j;
        if (r < a.b && dj < a.D) out[r * a.D + dj] += s * cn * v;  // only this thread's element
      }
      __syncthreads();
    }
  }
  const float total = block_sum(ds, red);
  if (tid == 0) a.ds[static_cast<int64_t>(blockIdx.x) * a.split + sp] = total * cn;
}

// Columns kernel: tiles of kTileCols rows x kColOwn columns; the block owns kColOwn columns and
// streams the row tiles of its split.
// Registers (nvcc 13.0, sm_80 / sm_90): without a minBlocks bound ptxas picked 64 registers and
// spilled 12/8 (fp16, bf16) and 24/32 (fp32) bytes on sm_80 inside the row-tile loop; with the
// restructuring above alone it aims for the shared-memory occupancy (25.3 KB static: 6 blocks
// per SM on sm_80, 8 on sm_90) and spills fp32 at 40 registers, and a cap of 64 (minBlocks 4)
// still spills 8/4 bytes for fp16. minBlocks 3 (cap 80 registers): 80 / 72 (fp16, bf16) and
// 80 / 80 (fp32) registers, no spills, 3 blocks (24 warps) per SM, one fewer than the 64-register
// build's 4.
template <typename T>
__global__ void __launch_bounds__(kThreads, 3) bwd_cols_kernel(BwdArgs a) {
  __shared__ float sA[kTileCols * kPad];
  __shared__ float sB[kColOwn * kPad];
  __shared__ float DL[kTileCols * kColOwn];
  __shared__ float red[kThreads];
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const bool teacher = a.tq != nullptr;
  const float s = *a.scale, coef_a = a.coef[0], cn = a.coef[1];
  const int tid = threadIdx.x;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kColOwn;
  const int sp = blockIdx.y;
  const int64_t nrt = cdiv(a.b, kTileCols);
  const int64_t rt0 = static_cast<int64_t>(sp) * a.tps;
  const int64_t rt1 = rt0 + a.tps < nrt ? rt0 + a.tps : nrt;
  float* out = a.out == nullptr ? nullptr : a.out + static_cast<int64_t>(sp) * a.n * a.D;
  // idx % kColOwn == tid % kColOwn for all four outputs (kThreads is a multiple of kColOwn), so
  // each thread's ds terms all belong to column tid % kColOwn.
  // The thread's ds partial lives in its own slot red[tid] (no other thread touches it before
  // the final sum), not in a register held across the whole row-tile loop.
  red[tid] = 0.f;
  for (int64_t rt = rt0; rt < rt1; ++rt) {
    const int64_t r0 = rt * kTileCols;
    float acc[kPer], tacc[kPer] = {0.f, 0.f, 0.f, 0.f};
    sim_tile<T, kTileCols, kColOwn>(q, r0, a.b, k, c0, a.n, a.D, sA, sB, acc);
    if (teacher)
      sim_tile<T, kTileCols, kColOwn>(static_cast<const T*>(a.tq), r0, a.b,
                                      static_cast<const T*>(a.tk), c0, a.n, a.D, sA, sB, tacc);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int idx = tid + i * kThreads;
      float A, Bt;
      dl_terms(a, s, coef_a, acc[i], tacc[i], r0 + idx / kColOwn, c0 + idx % kColOwn, teacher,
               A, Bt);
      DL[idx] = A + Bt;
      red[tid] += Bt * acc[i];
    }
    if (out == nullptr) continue;
    __syncthreads();
    for (int64_t d0 = 0; d0 < a.D; d0 += kChunk) {
      // Stage Q[r0 .. r0 + 63, d0 .. d0 + 63] into sA.
      stage_rows<T, kTileCols>(sA, q, r0, a.b, d0, a.D);
      __syncthreads();
      // Thread tid owns feature j = tid % kChunk of columns cl_i = tid / kChunk + i (kThreads /
      // kChunk), i < kPer: all four share sA[r][j], loaded once per r. Each v[i] is the same
      // in-order fmaf chain over r as a loop per output would give.
      static_assert(kThreads % kChunk == 0, "one feature column per thread");
      const int j = tid % kChunk, cl0 = tid / kChunk;
      float v[kPer] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 8
      for (int r = 0; r < kTileCols; ++r) {
        const float x = sA[r * kPad + j];
#pragma unroll
        for (int i = 0; i < kPer; ++i)
          v[i] = fmaf(DL[r * kColOwn + cl0 + i * (kThreads / kChunk)], x, v[i]);
      }
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int64_t c = c0 + cl0 + i * (kThreads / kChunk), dj = d0 + j;
        if (c < a.n && dj < a.D) out[c * a.D + dj] += s * cn * v[i];
      }
      __syncthreads();
    }
  }
  // Per column: the 16 threads t with t % kColOwn == c, summed in a fixed order.
  __syncthreads();
  if (tid < kColOwn) {
    float t = 0.f;
    for (int g = tid; g < kThreads; g += kColOwn) t += red[g];
    const int64_t c = c0 + tid;
    if (c < a.n) a.ds[static_cast<int64_t>(sp) * a.n + c] = t * cn;
  }
}

template <typename T>
int launch_fwd(const FwdArgs& a, cudaStream_t stream) {
  if (a.b == 0 || a.n == 0) return 0;
  fwd_kernel<T><<<dim3(a.R, a.C), kThreads, 0, stream>>>(a);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_bwd_rows(const BwdArgs& a, cudaStream_t stream) {
  if (a.b == 0 || a.n == 0) return 0;
  bwd_rows_kernel<T><<<dim3(static_cast<unsigned>(cdiv(a.b, kTileRows)), a.split), kThreads, 0,
                       stream>>>(a);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_bwd_cols(const BwdArgs& a, cudaStream_t stream) {
  if (a.b == 0 || a.n == 0) return 0;
  bwd_cols_kernel<T><<<dim3(static_cast<unsigned>(cdiv(a.n, kColOwn)), a.split), kThreads, 0,
                       stream>>>(a);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int fwd_cuda(DType dtype, const FwdArgs& a, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_fwd<float>(a, stream);
    case DType::kFloat16: return launch_fwd<__half>(a, stream);
    case DType::kBFloat16: return launch_fwd<__nv_bfloat16>(a, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int merge_cuda(const MergeArgs& a, cudaStream_t stream) {
  if (a.n == 0) return 0;
  merge_kernel<<<static_cast<unsigned>(cdiv(a.n, kThreads)), kThreads, 0, stream>>>(a);
  return static_cast<int>(cudaGetLastError());
}

int bwd_rows_cuda(DType dtype, const BwdArgs& a, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_bwd_rows<float>(a, stream);
    case DType::kFloat16: return launch_bwd_rows<__half>(a, stream);
    case DType::kBFloat16: return launch_bwd_rows<__nv_bfloat16>(a, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int bwd_cols_cuda(DType dtype, const BwdArgs& a, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_bwd_cols<float>(a, stream);
    case DType::kFloat16: return launch_bwd_cols<__half>(a, stream);
    case DType::kBFloat16: return launch_bwd_cols<__nv_bfloat16>(a, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace contrastive
}  // namespace r2d2
