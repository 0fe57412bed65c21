// GCPR contrastive loss: plain launchers of the CUDA kernels (contrastive_kernel.cu), called by
// the torch binding (contrastive_cuda.cpp). No torch headers: nvcc compiles this with a CPU torch.
//
// One similarity per rank, S = s * Q K^T: rows Q = local images [b, D], columns K = texts [n, D].
// i2t is the softmax along a row, t2i along a column of the same S. The design is the Triton one
// (r2d2/kernels/contrastive_triton.py; autograd and gather / ring modes in contrastive_dist.py):
//   forward   grid R x C. Block (pr, pc) loops over the row blocks pr, pr + R, ... and the column
//             tiles of split pc (tpc tiles each). Row statistics live in registers (one warp per
//             row) and go to the row partial slot pc; each tile's column statistics are merged
//             into the block's own column partial slot pr (no other block touches it: no atomics).
//   merge     state [nf, n] <- merge(state, slots of partial [nf, P, n]).
//   backward  dlogit = cn (a (p - tgt) + bcoef_j (p' - tgt')), in fp32 throughout.
//               rows:  block = 16 rows [x split of the column tiles]; dq += s dlogit K, ds scalar
//               cols:  block = 16 columns [x split of the 64-row tiles]; dk += s dlogit^T Q,
//                      ds per column
//             Every tile's similarity is computed once per block; the gradient is accumulated
//             chunk by chunk (64 features) into the block's own fp32 output rows (each element
//             read-modify-written by one thread).
// Fields of a state / partial (fp32 [nf, ...]): m, l, hs, cnt, then tm, tl, tw with a teacher,
// then gv with negatives (nf = 4 + 3 teacher + neg); gi int32 alongside (negatives only).
//
// CUDA cores, fp32 math: 16 x 64 logit tiles in shared memory, the similarity built from 64-wide
// feature chunks staged (converted to fp32) in shared memory. No tensor cores (the Triton
// backend has them), so this is the plain twin of the same design.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#define R2D2_CONTRASTIVE_HD __host__ __device__
#else
typedef struct CUstream_st* cudaStream_t;  // only named in the declarations below
#define R2D2_CONTRASTIVE_HD
#endif

namespace r2d2 {
namespace contrastive {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kTileRows = 16;   // rows per forward tile / per rows-backward block
constexpr int kTileCols = 64;   // columns per forward tile / streamed by a rows-backward block
constexpr int kColOwn = 16;     // columns per cols-backward block (it streams kTileCols rows)
constexpr int kChunk = 64;      // feature-dim chunk (staging and gradient output width)
constexpr int kThreads = 256;

R2D2_CONTRASTIVE_HD inline int64_t cdiv(int64_t x, int64_t y) { return (x + y - 1) / y; }

struct FwdArgs {
  const void* q; const void* k;          // [b, D], [n, D]
  const void* tq; const void* tk;        // teacher rows / columns, or nullptr
  const int64_t* rid; const int64_t* cid;
  const float* scale;                    // [1]
  float* rp; int32_t* rgi;               // row partials [nf, C, b], [C, b] (written)
  float* cp; int32_t* cgi;               // column partials [nf, R, n], [R, n] (own slot RMW)
  int64_t b, n, D;
  int R, C, tpc;                         // grid and column tiles per split
  int64_t row_off, col_off;              // global index of row 0 / column 0
  uint32_t key_r, key_c;                 // Gumbel keys: i2t (row, col), t2i (col, row)
  bool neg;
};

struct MergeArgs {
  float* st; int32_t* sgi;               // state [nf, n], [n] (in / out)
  const float* p; const int32_t* pgi;    // partials [nf, P, n], [P, n]
  int64_t n;
  int P;
  bool teacher, neg, init;               // init: ignore the state's previous contents
};

struct BwdArgs {
  const void* q; const void* k;
  const void* tq; const void* tk;
  const int64_t* rid; const int64_t* cid;
  const float* scale;                    // [1]
  const float* rstat;                    // [3, b]: LSE, teacher LSE, 1 / count
  const float* cstat;                    // [3, n]
  const float* coef;                     // [2]: a, cn
  const float* bcoef;                    // [n]
  float alpha;
  float* out;                            // rows: dq [split, b, D]; cols: dk [split, n, D];
                                         // accumulated (+=), or nullptr
  float* ds;                             // rows: [nrb * split]; cols: [split, n] (written)
  int64_t b, n, D;
  int split, tps;                        // splits of the streamed tiles, tiles per split
};

// Each returns a cudaError_t as int (0 = success) so the binding reports launch errors by name.
int fwd_cuda(DType dtype, const FwdArgs& a, cudaStream_t stream);
int merge_cuda(const MergeArgs& a, cudaStream_t stream);
int bwd_rows_cuda(DType dtype, const BwdArgs& a, cudaStream_t stream);
int bwd_cols_cuda(DType dtype, const BwdArgs& a, cudaStream_t stream);

}  // namespace contrastive
}  // namespace r2d2
