// Distillation KL: plain interface shared by the CUDA kernel (distill_kl_kernel.cu), its torch
// binding (distill_kl_cuda.cpp) and the CPU implementation (distill_kl.cpp). No torch headers here:
// a CPU-only torch cannot compile CUDA translation units that include them.
//
// Per row r of C logits, with a = student/T, b = teacher/T, q = softmax(a), p = softmax(b):
//   row_loss[r] = T^2 * KL(p || q) = T^2 * ( sum_j p_j (b_j - a_j) + lse(a) - lse(b) )
//   grad[r, j]  = grad_scale * T * (q_j - p_j)          (d row_loss / d student, times grad_scale)
//
// One streaming pass keeps, for both distributions, a running max m and a sum of exponentials z
// relative to it, plus
//   w = sum_j exp(b_j - m_b) * ((b_j - m_b) - (a_j - m_a)),  so  KL = w / z_b + log z_a - log z_b.
// The differences are taken against the running maxima, not as b_j - a_j: with logits offset by
// ~1e4, b_j - a_j rounds at ulp(1e4) ~ 1e-3 and the KL (a small difference of large numbers)
// would be lost; shifted, every term is O(logit range) and exact to fp32 precision. When a max
// moves, w is corrected by z_b times the shift. States of disjoint column sets merge exactly,
// which lets GPU threads stream their own columns and then reduce across the block. Once lse(a)
// and lse(b) are known the gradient is written: from registers for rows that fit the block's
// registers (one read of the row), by a second sweep over the row for wider ones.
//
// Masked logits: a teacher logit of -inf has p_j = 0 and contributes nothing (not 0 * inf = NaN);
// a student logit of -inf where p_j > 0 gives +inf, which is the true KL. (Hence a state with
// z_b > 0 and m_a = -inf already has w = +inf, and its student shift can be skipped.) A NaN
// logit makes its row's loss NaN (merge carries it), as in the Triton kernel.
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
  acc_t w;         // sum exp(b - m_b) * ((b - m_b) - (a - m_a))

  R2D2_HD static State empty() {
    const acc_t ninf = neg_inf<acc_t>();
    return State{ninf, acc_t(0), ninf, acc_t(0), acc_t(0)};
  }

  // Add one column. Branchy on purpose: one exp per distribution per element (the branch that
  // raises a max rescales the old sum instead of exponentiating the new element).
  R2D2_HD void push(acc_t a, acc_t b) {
    const acc_t ninf = neg_inf<acc_t>();
    if (a > m_a) {
      if (z_b > acc_t(0) && m_a != ninf) w += z_b * (a - m_a);  // old terms' a-shift
      z_a = z_a * acc_exp(m_a - a) + acc_t(1);                   // exp(-inf) = 0 at the start
      m_a = a;
    } else if (a != ninf) {
      z_a += acc_exp(a - m_a);
    }
    if (b == ninf) return;  // p_j = 0
    // m_a >= a here whenever a is finite; a = -inf under teacher mass makes the KL +inf.
    const acc_t da = a == ninf ? ninf : a - m_a;
    if (b > m_b) {
      const acc_t s = acc_exp(m_b - b);
      w = s > acc_t(0) ? s * (w - z_b * (b - m_b)) : acc_t(0);  // z_b = 0 at the start
      z_b = z_b * s + acc_t(1);
      m_b = b;
      w -= da;  // this column's term: (b - m_b) - da = -da
    } else {
      const acc_t e = acc_exp(b - m_b);
      z_b += e;
      if (e > acc_t(0)) w += e * ((b - m_b) - da);  // underflowed p_j contributes 0
    }
  }

  // Merge the state of another, disjoint set of columns.
  R2D2_HD void merge(const State& o) {
    const acc_t ninf = neg_inf<acc_t>();
    const acc_t ma = m_a > o.m_a ? m_a : o.m_a;
    const acc_t mb = m_b > o.m_b ? m_b : o.m_b;
    // A side whose max is -inf has z = 0 (no column) or z = NaN (only NaN logits: NaN never
    // raises a max), and adds it as is, so a NaN logit anywhere makes the row's loss NaN.
    acc_t za = (m_a == ninf ? z_a : z_a * acc_exp(m_a - ma)) +
               (o.m_a == ninf ? o.z_a : o.z_a * acc_exp(o.m_a - ma));
    acc_t zb = acc_t(0), ww = acc_t(0);
    // Each side's terms move from its own maxima to (ma, mb); a side without teacher mass adds
    // nothing, and an underflowed one adds 0 (never 0 * inf). z_b is 0, > 0 or NaN (a NaN teacher
    // logit); the NaN is added, not skipped, so that it reaches the loss.
    const State* sides[2] = {this, &o};
    for (const State* x : sides) {
      if (!(x->z_b > acc_t(0))) {
        zb += x->z_b;
        continue;
      }
      const acc_t s = acc_exp(x->m_b - mb);
      if (!(s > acc_t(0))) continue;
      const acc_t shift = x->m_a == ninf ? acc_t(0) : (x->m_b - mb) - (x->m_a - ma);
      zb += s * x->z_b;
      ww += s * (x->w + x->z_b * shift);
    }
    m_a = ma;
    z_a = za;
    m_b = mb;
    z_b = zb;
    w = ww;
  }

  // softmax_j = exp((x_j - m) - log z): x_j - m is exact, whereas x_j - (m + log z) would round
  // log z away at the logits' magnitude (ulp(1e4) ~ 1e-3).
  R2D2_HD acc_t q(acc_t a, acc_t log_za) const { return acc_exp((a - m_a) - log_za); }
  R2D2_HD acc_t p(acc_t b, acc_t log_zb) const { return acc_exp((b - m_b) - log_zb); }

  // T^2 * KL(p || q).
  R2D2_HD acc_t row_loss(acc_t t_sq) const {
    return t_sq * (w / z_b + acc_log(z_a) - acc_log(z_b));
  }
};

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Launch the fused forward on `stream`. student/teacher: [rows, cols] contiguous, element type
// `dtype`. row_loss: [rows], float (double when dtype is kFloat64). grad: [rows, cols] of float
// when dtype is kFloat16 (its range would flush small gradients before a loss scale is applied)
// and of `dtype` otherwise, or nullptr to skip the gradient. Returns the launch status
// (cudaGetLastError()).
// Defined in distill_kl_kernel.cu; only a CUDA build links it.
int fwd_cuda(DType dtype, const void* student, const void* teacher, void* row_loss, void* grad,
             int64_t rows, int64_t cols, double temperature, double grad_scale,
             cudaStream_t stream);

}  // namespace distill_kl
}  // namespace r2d2
