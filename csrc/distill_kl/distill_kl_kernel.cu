// Distillation KL, CUDA: one thread block per row (math and state merging in distill_kl_kernel.h).
//
// Each thread streams a strided subset of the row's columns (16-byte vector loads when the row
// allows it), keeping one online State; the states are merged with warp shuffles and then across
// warps through shared memory, so every thread knows lse(student/T) and lse(teacher/T). A second
// sweep over the row writes grad = grad_scale * T * (q - p) in the input dtype. Accumulation is
// fp32 (fp64 for double inputs).
//
// Memory: reads 2*rows*cols elements in the first sweep and, with the gradient, the same again in
// the second (mostly L2 hits for rows up to a few MB) and writes rows*cols; 4 exp per element.
// Limits: one block per row, so small C (< 32 elements) leaves most of each warp idle; rows must
// fit gridDim.x (< 2^31), which the binding checks.
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
__device__ __forceinline__ void from_acc(__half* p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void from_acc(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

// N elements moved as one aligned load/store (N * sizeof(T) == 16 for the vector path).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
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
template <typename acc_t>
__device__ State<acc_t> block_reduce(State<acc_t> st) {
  __shared__ State<acc_t> per_warp[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  st = warp_reduce(st);
  if (lane == 0) per_warp[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < nwarps ? per_warp[lane] : State<acc_t>::empty();
    st = warp_reduce(st);
    if (lane == 0) per_warp[0] = st;
  }
  __syncthreads();
  return per_warp[0];
}

// student, teacher, grad: [rows, cols] contiguous, scalar_t; row_loss: [rows] acc_t.
// VEC divides cols and every row start is 16-byte aligned when VEC > 1 (launcher checks).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(1024)
    fwd_kernel(const scalar_t* __restrict__ student, const scalar_t* __restrict__ teacher,
               typename AccOf<scalar_t>::type* __restrict__ row_loss,
               scalar_t* __restrict__ grad, int64_t cols, typename AccOf<scalar_t>::type inv_t,
               typename AccOf<scalar_t>::type t_sq, typename AccOf<scalar_t>::type coef) {
  using acc_t = typename AccOf<scalar_t>::type;
  using P = Pack<scalar_t, VEC>;
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
  P* g = reinterpret_cast<P*>(grad + row * cols);
  for (int64_t k = threadIdx.x; k < npack; k += blockDim.x) {
    const P ps = s[k];
    const P pt = t[k];
    P out;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const acc_t q = st.q(to_acc(ps.v[i]) * inv_t, log_za);
      const acc_t p = st.p(to_acc(pt.v[i]) * inv_t, log_zb);
      from_acc(&out.v[i], coef * (q - p));
    }
    g[k] = out;
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename scalar_t>
int launch(const void* student, const void* teacher, void* row_loss, void* grad, int64_t rows,
           int64_t cols, double temperature, double grad_scale, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  if (rows == 0 || cols == 0) return static_cast<int>(cudaSuccess);
  if (rows > 0x7fffffffLL) return static_cast<int>(cudaErrorInvalidConfiguration);
  constexpr int V = 16 / sizeof(scalar_t);
  const bool vec = cols % V == 0 && aligned16(student) && aligned16(teacher) &&
                   (grad == nullptr || aligned16(grad));
  const int64_t work = vec ? cols / V : cols;
  // Enough threads that each streams a handful of packs; 1024 only for very long rows.
  int threads = 32;
  const int cap = work > 16384 ? 1024 : 512;
  while (threads < cap && threads < work) threads <<= 1;

  const auto* s = static_cast<const scalar_t*>(student);
  const auto* t = static_cast<const scalar_t*>(teacher);
  auto* loss = static_cast<acc_t*>(row_loss);
  auto* g = static_cast<scalar_t*>(grad);
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  const acc_t t_sq = static_cast<acc_t>(temperature * temperature);
  const acc_t coef = static_cast<acc_t>(grad_scale * temperature);
  const dim3 grid(static_cast<unsigned>(rows));
  if (vec) {
    fwd_kernel<scalar_t, V><<<grid, threads, 0, stream>>>(s, t, loss, g, cols, inv_t, t_sq, coef);
  } else {
    fwd_kernel<scalar_t, 1><<<grid, threads, 0, stream>>>(s, t, loss, g, cols, inv_t, t_sq, coef);
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
