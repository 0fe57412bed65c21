// Distillation KL: op schemas (torch.ops.r2d2.distill_kl_fwd / distill_kl_fwd_out) and the CPU
// implementation. It runs the same per-row algorithm as the CUDA kernel (State in
// distill_kl_kernel.h), sequentially within a row and in parallel over rows, so the binding path
// and the algorithm are both exercised on machines without a GPU. Scalar code: no SIMD exp, so it
// is a correctness path rather than a fast one. Unlike the GPU kernels it always re-reads the row
// for the gradient: one row (at most a few hundred KB) is still in this core's cache by then.
#include "distill_kl/distill_kl.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>

#include "distill_kl/distill_kl_kernel.h"

namespace r2d2 {
namespace distill_kl {
namespace {

constexpr int64_t kChunk = 256;

// grad_t: float for Half inputs, scalar_t otherwise (grad_dtype in distill_kl.h says why).
template <typename scalar_t, typename grad_t>
void rows_cpu(const scalar_t* student, const scalar_t* teacher, at::opmath_type<scalar_t>* loss,
              grad_t* grad, int64_t rows, int64_t cols, double temperature, double grad_scale) {
  using acc_t = at::opmath_type<scalar_t>;  // float for half/bfloat16/float, double for double
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  const acc_t t_sq = static_cast<acc_t>(temperature * temperature);
  const acc_t coef = static_cast<acc_t>(grad_scale * temperature);
  // Rows are independent; a grain of ~32K elements keeps small problems on one thread.
  const int64_t grain = std::max<int64_t>(1, 32768 / cols);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* s = student + r * cols;
      const scalar_t* t = teacher + r * cols;
      // Chunks of kChunk columns get their own state, merged into the row's: like the CUDA
      // threads' partial states, this keeps the fp32 sums short (one running sum over 1e5
      // columns would lose ~1e-5 relative).
      State<acc_t> st = State<acc_t>::empty();
      for (int64_t j0 = 0; j0 < cols; j0 += kChunk) {
        const int64_t j1 = std::min(cols, j0 + kChunk);
        State<acc_t> part = State<acc_t>::empty();
        for (int64_t j = j0; j < j1; ++j) {
          part.push(static_cast<acc_t>(s[j]) * inv_t, static_cast<acc_t>(t[j]) * inv_t);
        }
        st.merge(part);
      }
      loss[r] = st.row_loss(t_sq);
      if (grad == nullptr) continue;
      const acc_t log_za = acc_log(st.z_a);
      const acc_t log_zb = acc_log(st.z_b);
      grad_t* g = grad + r * cols;
      for (int64_t j = 0; j < cols; ++j) {
        const acc_t q = st.q(static_cast<acc_t>(s[j]) * inv_t, log_za);
        const acc_t p = st.p(static_cast<acc_t>(t[j]) * inv_t, log_zb);
        g[j] = static_cast<grad_t>(coef * (q - p));
      }
    }
  });
}

void run_cpu(const at::Tensor& s, const at::Tensor& t, double temperature, double grad_scale,
             const at::Tensor& row_loss, const at::Tensor* grad) {
  TORCH_CHECK(s.device().is_cpu(), "distill_kl (cpu): expected CPU tensors, got ", s.device());
  const int64_t cols = s.size(-1);
  const int64_t rows = s.numel() / cols;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "distill_kl_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using grad_t = std::conditional_t<std::is_same_v<scalar_t, at::Half>, float, scalar_t>;
    rows_cpu<scalar_t, grad_t>(s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
                               row_loss.mutable_data_ptr<acc_t>(),
                               grad ? grad->mutable_data_ptr<grad_t>() : nullptr, rows, cols,
                               temperature, grad_scale);
  });
}

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                           double temperature, double grad_scale,
                                           bool need_grad) {
  return fwd(student, teacher, temperature, grad_scale, need_grad, &run_cpu);
}

void fwd_out_cpu(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                 double grad_scale, const at::Tensor& row_loss, const at::Tensor& grad) {
  fwd_out(student, teacher, temperature, grad_scale, row_loss, grad, &run_cpu);
}

}  // namespace
}  // namespace distill_kl
}  // namespace r2d2

TORCH_LIBRARY_FRAGMENT(r2d2, m) {
  // row_loss[r] = T^2 KL(softmax(teacher[r]/T) || softmax(student[r]/T)) over the last dim
  // (fp32; fp64 for double inputs); grad = grad_scale * d row_loss / d student, float32 for
  // float16 inputs and the inputs' dtype otherwise (empty when need_grad is false).
  m.def(
      "distill_kl_fwd(Tensor student, Tensor teacher, float temperature, float grad_scale=1.0, "
      "bool need_grad=True) -> (Tensor row_loss, Tensor grad)");
  m.def(
      "distill_kl_fwd_out(Tensor student, Tensor teacher, float temperature, float grad_scale, "
      "Tensor(a!) row_loss, Tensor(b!) grad) -> ()");
}

TORCH_LIBRARY_IMPL(r2d2, CPU, m) {
  m.impl("distill_kl_fwd", &r2d2::distill_kl::fwd_cpu);
  m.impl("distill_kl_fwd_out", &r2d2::distill_kl::fwd_out_cpu);
}
