// GCPR contrastive loss: plain launchers of the CUDA kernels (contrastive_kernel.cu), called by
// the torch binding (contrastive_cuda.cpp). No torch headers: nvcc compiles this with a CPU torch.
//
// One direction = local rows Q [b, D] against a block of columns K [n, D], logit = s * Q K^T.
// The algorithm is the Triton one (r2d2/kernels/contrastive_triton.py), so both backends share the
// Python autograd and the gather / ring drivers (r2d2/kernels/contrastive_dist.py):
//   forward   per-row streaming state, read and written back (fp32 [b] each):
//               m, l      online max / sum-exp of the logits
//               hs, cnt   sum of logits over same-id columns, their count
//               tm, tl, tw  teacher online max / sum-exp, sum exp(tlogit - tm) * logit
//               gv, gi    max of logit + Gumbel(key, global row, global col) over other-id
//                         columns, and its global column index (int64)
//   backward  dlogit = g * (softmax - target), target = (1-alpha) [same id] / cnt + alpha p_t
//               rows:  dq[:, chunk] += s * dlogit @ K[:, chunk];  ds[row block] += sum dlogit*sim
//               cols:  dk[:, chunk] += s * dlogit^T @ Q[:, chunk]
//
// Design: straightforward and exact first. Tiles of 16 x 64 logits live in shared memory; the
// similarity is built from 64-wide feature chunks staged (converted to fp32) in shared memory and
// multiplied on CUDA cores with fp32 accumulation. No tensor cores (a bonus not yet taken), so
// the Triton backend is the fast one on the GPU; this is the CUDA twin of the same design.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#else
typedef struct CUstream_st* cudaStream_t;  // only named in the declarations below
#endif

namespace r2d2 {
namespace contrastive {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kTileRows = 16;   // rows per forward / rows-backward block
constexpr int kTileCols = 64;   // columns per streamed tile
constexpr int kChunk = 64;      // feature-dim chunk (staging and backward output width)
constexpr int kThreads = 256;

struct FwdArgs {
  const void* q; const void* k;          // [b, D], [n, D]
  const void* tq; const void* tk;        // teacher rows / columns, or nullptr
  const int64_t* rid; const int64_t* cid;
  const float* scale;                    // [1]
  float *m, *l, *hs, *cnt, *tm, *tl, *tw, *gv;
  int64_t* gi;
  int64_t b, n, D, row_off, col_off;
  uint32_t key;
  bool neg;
};

struct BwdArgs {
  const void* q; const void* k;
  const void* tq; const void* tk;
  const int64_t* rid; const int64_t* cid;
  const float* scale;                    // [1]
  const float* g;                        // [1] grad_loss / (2 b)
  const float *lse, *tlse, *icnt;        // [b]
  float alpha;
  float* dq;                             // [b, D] fp32 (+=) or nullptr
  float* dk;                             // [n, D] fp32 (+=) or nullptr
  float* ds;                             // [ceil(b / kTileRows)] fp32 (+=)
  int64_t b, n, D;
};

// Return a cudaError_t as int (0 = success) so the binding reports launch errors by name.
int fwd_block_cuda(DType dtype, const FwdArgs& a, cudaStream_t stream);
int bwd_block_cuda(DType dtype, const BwdArgs& a, cudaStream_t stream);

}  // namespace contrastive
}  // namespace r2d2
