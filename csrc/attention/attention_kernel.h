// Attention: plain interface of the CUDA kernels (attention_kernel.cu) used by the torch binding
// (attention_cuda.cpp). No torch headers: a CPU-only torch cannot compile CUDA translation units
// that include them.
//
// Contract (same as r2d2/kernels/attention.py and the Triton kernels):
//   q [B, H, Lq, D], k/v [B, H, Lk, D], o [B, H, Lq, D], all contiguous, one dtype;
//   mask [B, Lk] uint8 (1 = attend) or null; lse [B*H, Lq] fp32 in the log2 domain
//   (lse2 = log2 sum_j 2^(s_j * scale * log2 e)), +inf for a query that has no attended key
//   (its output and gradients are zero).
// Causal (Problem::causal): query i attends key j only if j <= i + (Lk - Lq) (bottom-right
// aligned, as flash-attention >= 2.1), ANDed with the mask. Key tiles wholly above a query
// block's diagonal are never loaded (forward, dQ), query tiles wholly before a key block's first
// viewer are never loaded (dK/dV), and only tiles straddling the diagonal test it per element.
// Dropout keeps score (bh, i, j) when philox_uniform(seed, offset + (bh*Lq + i)*Lk + j) >= p,
// the same stream Triton's tl.rand draws (Philox4x32-10, first word, same float mapping), so the
// CUDA and Triton backends drop the same weights for the same (seed, offset).
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#define R2D2_ATTN_HD __host__ __device__ __forceinline__
#else
#define R2D2_ATTN_HD inline
typedef struct CUstream_st* cudaStream_t;  // only named in the launcher declarations below
#endif

namespace r2d2 {
namespace attention {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Largest head dim the kernels take (D is padded to a multiple of 32 up to this in shared memory).
constexpr int kMaxHeadDim = 128;
// Longest Lq / Lk the launchers take: blocks of query (or key) rows run along grid.y, which holds
// at most 65535 blocks, and the smallest block owns 32 rows (2 warps).
constexpr int kMaxSeqLen = 65535 * 32;

R2D2_ATTN_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// Philox4x32-10 with counter (offset, 0, 0, 0) and key (seed lo, seed hi); returns the first word.
// Mirrors triton.language.random.randint so both backends share one dropout stream.
R2D2_ATTN_HD uint32_t philox_first(uint64_t seed, uint32_t offset) {
  uint32_t c0 = offset, c1 = 0, c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = mulhi32(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Triton's uint_to_uniform_float: the int32 bit pattern folded onto [0, 2^31), times ~2^-31.
R2D2_ATTN_HD float philox_uniform(uint64_t seed, uint32_t offset) {
  int32_t x = static_cast<int32_t>(philox_first(seed, offset));
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

struct Problem {
  int B, H, Lq, Lk, D;
  float scale;      // multiplier of q.k
  float dropout_p;  // in [0, 1)
  uint64_t seed;
  uint32_t offset;
  int causal;  // 0 / 1: a runtime switch (uniform per launch), not a template parameter, so the
               // instantiations check_cuda_resources.py checks are the ones causal calls run
};

// Causal bounds, shared by the kernels (and checked on the host by the tests' formulas).
// Rows [m0, m0 + rows) see keys < causal_key_end: some row sees each of them, none sees more.
R2D2_ATTN_HD int causal_key_end(int m0, int rows, int Lq, int Lk) {
  const int e = m0 + rows + (Lk - Lq);
  return e < 0 ? 0 : (e > Lk ? Lk : e);
}
// Keys < causal_key_full are seen by every one of the rows from m0 on.
R2D2_ATTN_HD int causal_key_full(int m0, int Lq, int Lk) { return m0 + 1 + (Lk - Lq); }
// Whether query row i sees key j (tested per element on diagonal tiles only).
R2D2_ATTN_HD bool causal_sees(int i, int j, int Lq, int Lk) { return j <= i + (Lk - Lq); }
// The first query row that sees key n0 (0 if every row does).
R2D2_ATTN_HD int causal_first_query(int n0, int Lq, int Lk) {
  const int i = n0 - (Lk - Lq);
  return i < 0 ? 0 : i;
}

// Each returns 0 or a cudaError_t value. Pointers are device pointers; mask may be null.
int attention_fwd_cuda(DType dtype, const void* q, const void* k, const void* v,
                       const uint8_t* mask, void* o, float* lse, const Problem& pr,
                       cudaStream_t stream);

// delta [B*H, Lq] fp32 is scratch (rowsum(dO * O)); dq/dk/dv are written in full.
int attention_bwd_cuda(DType dtype, const void* dout, const void* q, const void* k, const void* v,
                       const void* o, const float* lse, const uint8_t* mask, float* delta,
                       void* dq, void* dk, void* dv, const Problem& pr, cudaStream_t stream);

// Launch geometry of every kernel instantiation the launchers above can pick (each dtype x padded
// head dim: forward, delta, dK/dV, dQ), computed by the same templates the launchers use (Pick,
// Layout), for scripts/check_cuda_resources.py to check against each arch's shared-memory limit.
// Host only: no CUDA call is made, so it runs on a machine without a GPU.
struct LaunchConfig {
  char kernel[64];    // the instantiation as c++filt names it, e.g. "fwd_kernel<__half, 64, 4, 64>"
  int threads;        // per block
  size_t smem_bytes;  // dynamic shared memory the launch requests
};
// Writes at most cap entries to out; returns how many there are.
int attention_launch_configs(LaunchConfig* out, int cap);

}  // namespace attention
}  // namespace r2d2
