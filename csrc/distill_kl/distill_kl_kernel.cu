// Distillation KL, CUDA: one thread block per row (math and state merging in distill_kl_kernel.h).
//
// Each thread streams a strided subset of the row's columns (16-byte vector loads when the row
// allows it), keeping one online State; the states are merged with warp shuffles and then across
// warps through shared memory, so every thread knows lse(student/T) and lse(teacher/T). Then it
// writes grad = grad_scale * T * (q - p) (float for half inputs, the input dtype otherwise).
// Accumulation is fp32 (fp64 for double inputs).
//
// Two variants, chosen per launch:
//   one pass   rows of at most kOnePassThreads * ITEMS packs (16384 bf16/fp16, 8192 fp32 or
//              2048 fp64 columns; 8192, 4096 and 2048 on the unvectorized path, taken when
//              a row is not a multiple of 16 bytes): each thread keeps its ITEMS packs of both
//              inputs in registers, so the row is read once and the gradient is written from
//              registers.
//   two pass   wider rows: a row no longer fits the block's registers (512 threads x 128 = 64K
//              registers, which a 32768-wide row of both inputs would fill alone), so the gradient
//              sweep reads the row a second time (mostly L2 hits for rows up to a few MB). Caching in
//              shared memory instead would cap the row at ~227 KB / 2 inputs and cut occupancy to
//              one block per SM, for rows that are already L2-resident.
// Both use the same column-to-thread assignment and merge order (replayed on the host by
// tests/cpp/distill_kl_block_reduce.cc), so they merge the same states in the same order.
//
// Memory: reads 2*rows*cols elements (one pass) or 4*rows*cols (two pass, half of them from L2)
// and writes rows*cols gradient elements; 4 exp per element. Limits: one block per row, so small C
// (< 32 elements) leaves most of each warp idle; rows must fit gridDim.x (< 2^31), which the
// binding checks.
#include "distill_kl/distill_kl_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace r2d2 {
namespace distill_kl {
namespace {

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ void from_acc(float* p, float x) { *p = x; }
__device__ __forceinline__ void from_acc(double* p, double x) { *p = x; }
__device__ __forceinline__ void from_acc(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

// N elements moved as aligned loads/stores: one 16-byte access for the input packs; a float
// gradient pack of 8 (half inputs) is 32 bytes, stored as two 16-byte halves, since the launcher
// only checks 16-byte alignment.
template <typename T, int N>
struct alignas(sizeof(T) * N < 16 ? sizeof(T) * N : 16) Pack {
  T v[N];
};

template <typename acc_t>
__device__ __forceinline__ State<acc_t> warp_reduce(State<acc_t> st) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    State<acc_t> o;
    o.m_a = __shfl_xor_sync(0xffffffffu, st.m_a, off);
    o.z_a = __shfl_xor_sync(0xffffffffu, st.z_a, off);
    o.m_b = __shfl_xor_sync(0xffffffffu, st.m_b, off);
    o.z_b = __shfl_xor_sync(0xffffffffu, st.z_b, off);
    o.w = __shfl_xor_sync(0xffffffffu, st.w, off);
    st.merge(o);
  }
  return st;
}

// Every thread returns the state of the whole row. blockDim.x is a multiple of 32 (launcher).
// Every warp reduces the per-warp states itself (the same states in the same order, so all get
// the bits warp 0 alone would), instead of warp 0 reducing and broadcasting through shared
// memory: the shuffles then run with the whole block converged, so ptxas emits no divergent
// shuffle subroutine, whose calling convention made it spill registers live across the
// reduction (fp32 and fp64 one-pass kernels, ptxas -v; scripts/check_cuda_resources.py checks).
// Called once per kernel: a second call could overwrite per_warp while a slower warp still
// reads the first call's states.
template <typename acc_t>
__device__ State<acc_t> block_reduce(State<acc_t> st) {
  __shared__ State<acc_t> per_warp[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  st = warp_reduce(st);
  if (lane == 0) per_warp[warp] = st;
  __syncthreads();
  return warp_reduce(lane < nwarps ? per_warp[lane] : State<acc_t>::empty());
}

template <typename T>
struct GradOf {  // the gradient's element type (grad_dtype in distill_kl.h says why)
  using type = T;
};
template <>
struct GradOf<__half> {
  using type = float;
};

constexpr int kOnePassThreads = 512;
// Packs each thread holds in registers on the one-pass path: 4 x 16 bytes per input when
// vectorized (2 x 16 bytes for double: with 4, ptxas 13.0 spilled the first pack of both inputs,
// 32-72 bytes on sm_80/sm_90, fp64 math needing register pairs), 32 bytes of single elements
// otherwise (16 half, 8 float, 4 double). Every instantiation compiles without spills
// (scripts/check_cuda_resources.py checks it for sm_80 and sm_90).
template <typename scalar_t, int VEC>
constexpr int one_pass_items() {
  return VEC > 1 ? (sizeof(scalar_t) == 8 ? 2 : 4) : 32 / static_cast<int>(sizeof(scalar_t));
}

// Per-element gradient of one pack, from the row's merged state.
template <typename scalar_t, int VEC, typename acc_t, typename grad_t>
__device__ __forceinline__ void write_grad(const State<acc_t>& st, acc_t log_za, acc_t log_zb,
                                           acc_t inv_t, acc_t coef, const Pack<scalar_t, VEC>& ps,
                                           const Pack<scalar_t, VEC>& pt, Pack<grad_t, VEC>* out) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const acc_t q = st.q(to_acc(ps.v[i]) * inv_t, log_za);
    const acc_t p = st.p(to_acc(pt.v[i]) * inv_t, log_zb);
    from_acc(&out->v[i], coef * (q - p));
  }
}

// Both kernels: student, teacher: [rows, cols] contiguous scalar_t; grad: [rows, cols] of
// GradOf<scalar_t> or nullptr; row_loss: [rows] acc_t. VEC divides cols, and every row start is
// 16-byte aligned when VEC > 1 (launcher checks).

// Two pass: any row width.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(1024) fwd_two_pass_kernel(
    const scalar_t* __restrict__ student, const scalar_t* __restrict__ teacher,
    typename AccOf<scalar_t>::type* __restrict__ row_loss,
    typename GradOf<scalar_t>::type* __restrict__ grad, int64_t cols,
    typename AccOf<scalar_t>::type inv_t, typename AccOf<scalar_t>::type t_sq,
    typename AccOf<scalar_t>::type coef) {
  using acc_t = typename AccOf<scalar_t>::type;
  using P = Pack<scalar_t, VEC>;
  using G = Pack<typename GradOf<scalar_t>::type, VEC>;
  const int64_t row = blockIdx.x;
  const P* s = reinterpret_cast<const P*>(student + row * cols);
  const P* t = reinterpret_cast<const P*>(teacher + row * cols);
  const int64_t npack = cols / VEC;

  State<acc_t> st = State<acc_t>::empty();
  for (int64_t k = threadIdx.x; k < npack; k += blockDim.x) {
    const P ps = s[k];
    const P pt = t[k];
#pragma unroll
    for (int i = 0; i < VEC; ++i) st.push(to_acc(ps.v[i]) * inv_t, to_acc(pt.v[i]) * inv_t);
  }
  st = block_reduce(st);
  if (threadIdx.x == 0) row_loss[row] = st.row_loss(t_sq);
  if (grad == nullptr) return;

  const acc_t log_za = acc_log(st.z_a);
  const acc_t log_zb = acc_log(st.z_b);
  G* g = reinterpret_cast<G*>(grad + row * cols);
  for (int64_t k = threadIdx.x; k < npack; k += blockDim.x) {
    G out;
    write_grad(st, log_za, log_zb, inv_t, coef, s[k], t[k], &out);
    g[k] = out;
  }
}

// One pass: npack <= blockDim.x * ITEMS. Thread k holds packs k, k + blockDim.x, ... in registers
// (the two-pass kernel's assignment and push order, so the merged state is the same).
template <typename scalar_t, int VEC, int ITEMS>
__global__ void __launch_bounds__(kOnePassThreads) fwd_one_pass_kernel(
    const scalar_t* __restrict__ student, const scalar_t* __restrict__ teacher,
    typename AccOf<scalar_t>::type* __restrict__ row_loss,
    typename GradOf<scalar_t>::type* __restrict__ grad, int64_t cols,
    typename AccOf<scalar_t>::type inv_t, typename AccOf<scalar_t>::type t_sq,
    typename AccOf<scalar_t>::type coef) {
  using acc_t = typename AccOf<scalar_t>::type;
  using P = Pack<scalar_t, VEC>;
  using G = Pack<typename GradOf<scalar_t>::type, VEC>;
  const int64_t row = blockIdx.x;
  const P* s = reinterpret_cast<const P*>(student + row * cols);
  const P* t = reinterpret_cast<const P*>(teacher + row * cols);
  const int64_t npack = cols / VEC;

  P ps[ITEMS], pt[ITEMS];
  State<acc_t> st = State<acc_t>::empty();
#pragma unroll
  for (int j = 0; j < ITEMS; ++j) {
    const int64_t k = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
    if (k < npack) {
      ps[j] = s[k];
      pt[j] = t[k];
#pragma unroll
      for (int i = 0; i < VEC; ++i)
        st.push(to_acc(ps[j].v[i]) * inv_t, to_acc(pt[j].v[i]) * inv_t);
    }
  }
  st = block_reduce(st);
  if (threadIdx.x == 0) row_loss[row] = st.row_loss(t_sq);
  if (grad == nullptr) return;

  const acc_t log_za = acc_log(st.z_a);
  const acc_t log_zb = acc_log(st.z_b);
  G* g = reinterpret_cast<G*>(grad + row * cols);
#pragma unroll
  for (int j = 0; j < ITEMS; ++j) {
    const int64_t k = threadIdx.x + static_cast<int64_t>(j) * blockDim.x;
    if (k < npack) {
      G out;
      write_grad(st, log_za, log_zb, inv_t, coef, ps[j], pt[j], &out);
      g[k] = out;
    }
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Rows of at most kOnePassThreads x one_pass_items packs take the one-pass kernel.
template <typename scalar_t, int VEC>
void launch_variant(const scalar_t* s, const scalar_t* t, typename AccOf<scalar_t>::type* loss,
                    typename GradOf<scalar_t>::type* g, int64_t rows, int64_t cols, int threads,
                    typename AccOf<scalar_t>::type inv_t, typename AccOf<scalar_t>::type t_sq,
                    typename AccOf<scalar_t>::type coef, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(rows));
  constexpr int kItems = one_pass_items<scalar_t, VEC>();
  if (threads <= kOnePassThreads && cols / VEC <= static_cast<int64_t>(threads) * kItems) {
    fwd_one_pass_kernel<scalar_t, VEC, kItems>
        <<<grid, threads, 0, stream>>>(s, t, loss, g, cols, inv_t, t_sq, coef);
  } else {
    fwd_two_pass_kernel<scalar_t, VEC>
        <<<grid, threads, 0, stream>>>(s, t, loss, g, cols, inv_t, t_sq, coef);
  }
}

template <typename scalar_t>
int launch(const void* student, const void* teacher, void* row_loss, void* grad, int64_t rows,
           int64_t cols, double temperature, double grad_scale, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  using grad_t = typename GradOf<scalar_t>::type;
  if (rows == 0 || cols == 0) return static_cast<int>(cudaSuccess);
  if (rows > 0x7fffffffLL) return static_cast<int>(cudaErrorInvalidConfiguration);
  constexpr int V = 16 / sizeof(scalar_t);
  // cols % V == 0 also makes every gradient row start 16-byte aligned (sizeof(grad_t) >= the
  // input's), given an aligned base.
  const bool vec = cols % V == 0 && aligned16(student) && aligned16(teacher) &&
                   (grad == nullptr || aligned16(grad));
  const int64_t work = vec ? cols / V : cols;
  // Enough threads that each handles a handful of packs; 1024 only for very long rows. Rows of up
  // to 512 threads x one_pass_items packs take the one-pass kernel (launch_variant).
  int threads = 32;
  const int cap = work > 16384 ? 1024 : 512;
  while (threads < cap && threads < work) threads <<= 1;

  const auto* s = static_cast<const scalar_t*>(student);
  const auto* t = static_cast<const scalar_t*>(teacher);
  auto* loss = static_cast<acc_t*>(row_loss);
  auto* g = static_cast<grad_t*>(grad);
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  const acc_t t_sq = static_cast<acc_t>(temperature * temperature);
  const acc_t coef = static_cast<acc_t>(grad_scale * temperature);
  if (vec) {
    launch_variant<scalar_t, V>(s, t, loss, g, rows, cols, threads, inv_t, t_sq, coef, stream);
  } else {
    launch_variant<scalar_t, 1>(s, t, loss, g, rows, cols, threads, inv_t, t_sq, coef, stream);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int fwd_cuda(DType dtype, const void* student, const void* teacher, void* row_loss, void* grad,
             int64_t rows, int64_t cols, double temperature, double grad_scale,
             cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch<float>(student, teacher, row_loss, grad, rows, cols, temperature, grad_scale,
                           stream);
    case DType::kFloat16:
      return launch<__half>(student, teacher, row_loss, grad, rows, cols, temperature,
                            grad_scale, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(student, teacher, row_loss, grad, rows, cols, temperature,
                                   grad_scale, stream);
    case DType::kFloat64:
      return launch<double>(student, teacher, row_loss, grad, rows, cols, temperature,
                            grad_scale, stream);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace distill_kl
}  // namespace r2d2
