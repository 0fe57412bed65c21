// Distillation KL: plain interface shared by the CUDA kernel (distill_kl_kernel.cu), its torch
// binding (distill_kl_cuda.cpp) and the CPU implementation (distill_kl.cpp). No torch headers here:
// a CPU-only torch cannot compile CUDA translation units that include them.
//
// Per row r of C logits, with a = student/T, b = teacher/T, q = softmax(a), p = softmax(b):
//   row_loss[r] = T^2 * KL(p || q) = T^2 * ( sum_j p_j (b_j - a_j) + lse(a) - lse(b) )
//   grad[r, j]  = grad_scale * T * (q_j - p_j)          (d row_loss / d student, times grad_scale)
//
// One streaming pass keeps, for both distributions, a running max m and a sum of exponentials z
// relative to it, plus w = sum_j exp(b_j - m_b) (b_j - a_j) relative to the teacher's max. States
// of disjoint column sets merge exactly (rescale each by exp(m_old - m_new)), which is what lets
// GPU threads stream their own columns and then reduce across the block. A second sweep, once
// lse(a) and lse(b) are known, writes the gradient.
//
// Masked logits: a teacher logit of -inf has p_j = 0 and contributes nothing (not 0 * inf = NaN);
// a student logit of -inf where p_j > 0 gives +inf, which is the true KL.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#define R2D2_HD __host__ __device__ __forceinline__
#else
#define R2D2_HD inline
typedef struct CUstream_st* cudaStream_t;  // only named in the launcher declaration below
#endif

namespace r2d2 {
namespace distill_kl {

// Float accumulators use expf/logf so nvcc --use_fast_math maps them to the SFU intrinsics.
R2D2_HD float acc_exp(float x) { return expf(x); }
R2D2_HD double acc_exp(double x) { return exp(x); }
R2D2_HD float acc_log(float x) { return logf(x); }
R2D2_HD double acc_log(double x) { return log(x); }
// INFINITY rather than std::numeric_limits: the latter is a host constexpr that device code may
// only call with --expt-relaxed-constexpr.
template <typename acc_t>
R2D2_HD acc_t neg_inf() { return -static_cast<acc_t>(INFINITY); }

template <typename acc_t>
struct State {
  acc_t m_a, z_a;  // student: running max of a, sum exp(a - m_a)
  acc_t m_b, z_b;  // teacher: running max of b, sum exp(b - m_b)
  acc_t w;         // sum exp(b - m_b) * (b - a)

  R2D2_HD static State empty() {
    const acc_t ninf = neg_inf<acc_t>();
    return State{ninf, acc_t(0), ninf, acc_t(0), acc_t(0)};
  }

  // Add one column. Branchy on purpose: one exp per distribution per element (the branch that
  // raises the max rescales the old sum instead of exponentiating the new element).
  R2D2_HD void push(acc_t a, acc_t b) {
    const acc_t ninf = neg_inf<acc_t>();
    if (a > m_a) {
      z_a = z_a * acc_exp(m_a - a) + acc_t(1);  // exp(-inf) = 0 on the first element
      m_a = a;
    } else if (a != ninf) {
      z_a += acc_exp(a - m_a);
    }
    if (b > m_b) {
      const acc_t s = acc_exp(m_b - b);
      z_b = z_b * s + acc_t(1);
      w = w * s + (b - a);
      m_b = b;
    } else if (b != ninf) {
      const acc_t e = acc_exp(b - m_b);
      z_b += e;
      if (e > acc_t(0)) w += e * (b - a);  // underflowed p_j contributes 0, even if a = -inf
    }
  }

  // Merge the state of another, disjoint set of columns.
  R2D2_HD void merge(const State& o) {
    const acc_t ninf = neg_inf<acc_t>();
    const acc_t ma = m_a > o.m_a ? m_a : o.m_a;
    if (ma != ninf) {
      z_a = (m_a == ninf ? acc_t(0) : z_a * acc_exp(m_a - ma)) +
            (o.m_a == ninf ? acc_t(0) : o.z_a * acc_exp(o.m_a - ma));
      m_a = ma;
    }
    const acc_t mb = m_b > o.m_b ? m_b : o.m_b;
    if (mb != ninf) {
      const acc_t s = m_b == ninf ? acc_t(0) : acc_exp(m_b - mb);
      const acc_t so = o.m_b == ninf ? acc_t(0) : acc_exp(o.m_b - mb);
      // A side with z == 0 contributes nothing; skip it so 0 * (w = anything) never forms NaN.
      z_b = (s > acc_t(0) ? z_b * s : acc_t(0)) + (so > acc_t(0) ? o.z_b * so : acc_t(0));
      w = (s > acc_t(0) ? w * s : acc_t(0)) + (so > acc_t(0) ? o.w * so : acc_t(0));
      m_b = mb;
    }
  }

  R2D2_HD acc_t lse_a() const { return m_a + acc_log(z_a); }
  R2D2_HD acc_t lse_b() const { return m_b + acc_log(z_b); }

  // T^2 * KL(p || q). The max difference is kept apart from the log-ratio of the sums so that
  // large common offsets of the logits cancel before they meet the small terms.
  R2D2_HD acc_t row_loss(acc_t t_sq) const {
    return t_sq * (w / z_b + (m_a - m_b) + acc_log(z_a) - acc_log(z_b));
  }
};

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Launch the fused forward on `stream`. student/teacher: [rows, cols] contiguous, element type
// `dtype`. row_loss: [rows], float (double when dtype is kFloat64). grad: [rows, cols] of `dtype`,
// or nullptr to skip the gradient sweep. Returns the launch status (cudaGetLastError()).
// Defined in distill_kl_kernel.cu; only a CUDA build links it.
int fwd_cuda(DType dtype, const void* student, const void* teacher, void* row_loss, void* grad,
             int64_t rows, int64_t cols, double temperature, double grad_scale,
             cudaStream_t stream);

}  // namespace distill_kl
}  // namespace r2d2
