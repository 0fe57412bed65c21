// Distillation KL, torch side shared by the CPU (distill_kl.cpp) and CUDA (distill_kl_cuda.cpp)
// bindings: argument checks with messages that name the argument, and output allocation. The
// kernels themselves see only raw pointers (distill_kl_kernel.h).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <tuple>

namespace r2d2 {
namespace distill_kl {

// The device-specific part: fill row_loss [rows] and, when grad is non-null, grad [rows, cols].
// All tensors are contiguous and already checked.
using RunFn = void (*)(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                       double grad_scale, const at::Tensor& row_loss, const at::Tensor* grad);

inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Per-row losses accumulate in fp32 (fp64 for double inputs), and are returned that way.
inline at::ScalarType loss_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The gradient buffer the forward writes: float32 for float16 inputs, the inputs' dtype otherwise.
// It holds the gradient before any upstream scale (autograd multiplies by grad_output / rows in
// backward), and fp16's 5-bit exponent would flush its small elements to zero before a loss scale
// (GradScaler's 2^16) could lift them; bfloat16 has fp32's range, so it keeps the inputs' dtype.
inline at::ScalarType grad_dtype(at::ScalarType t) {
  return t == at::kHalf ? at::kFloat : t;
}

inline void check_inputs(const at::Tensor& student, const at::Tensor& teacher, double temperature) {
  TORCH_CHECK(student.sizes() == teacher.sizes(), "distill_kl: student_logits shape ",
              student.sizes(), " must equal teacher_logits shape ", teacher.sizes());
  TORCH_CHECK(student.dim() >= 1 && student.size(-1) > 0,
              "distill_kl: logits need a non-empty last (class) dimension, got shape ",
              student.sizes());
  TORCH_CHECK(student.device() == teacher.device(), "distill_kl: student_logits is on ",
              student.device(), " but teacher_logits is on ", teacher.device());
  TORCH_CHECK(supported_dtype(student.scalar_type()), "distill_kl: student_logits dtype ",
              student.scalar_type(), " is not supported; expected float32, float16, bfloat16 ",
              "or float64");
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), "distill_kl: teacher_logits dtype ",
              teacher.scalar_type(), " must equal student_logits dtype ", student.scalar_type());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0,
              "distill_kl: temperature must be a finite number > 0, got ", temperature);
}

inline void check_outputs(const at::Tensor& student, const at::Tensor& row_loss,
                          const at::Tensor& grad) {
  const int64_t rows = student.numel() / student.size(-1);
  TORCH_CHECK(row_loss.device() == student.device() && grad.device() == student.device(),
              "distill_kl_fwd_out: row_loss (", row_loss.device(), ") and grad (", grad.device(),
              ") must be on the inputs' device ", student.device());
  TORCH_CHECK(row_loss.numel() == rows && row_loss.is_contiguous() &&
                  row_loss.scalar_type() == loss_dtype(student.scalar_type()),
              "distill_kl_fwd_out: row_loss must be a contiguous ",
              loss_dtype(student.scalar_type()), " tensor of ", rows, " elements, got ",
              row_loss.scalar_type(), " of shape ", row_loss.sizes());
  TORCH_CHECK(grad.sizes() == student.sizes() && grad.is_contiguous() &&
                  grad.scalar_type() == grad_dtype(student.scalar_type()),
              "distill_kl_fwd_out: grad must be a contiguous ", grad_dtype(student.scalar_type()),
              " tensor of shape ", student.sizes(), ", got ", grad.scalar_type(), " of shape ",
              grad.sizes());
}

// distill_kl_fwd: returns (row_loss [rows], grad shaped like student in grad_dtype, or an empty [0]
// tensor when need_grad is false, so inference skips the gradient sweep and its write).
inline std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& student, const at::Tensor& teacher,
                                              double temperature, double grad_scale,
                                              bool need_grad, RunFn run) {
  check_inputs(student, teacher, temperature);
  const at::Tensor s = student.contiguous();
  const at::Tensor t = teacher.contiguous();
  const int64_t rows = s.numel() / s.size(-1);
  at::Tensor row_loss = at::empty({rows}, s.options().dtype(loss_dtype(s.scalar_type())));
  const auto gopt = s.options().dtype(grad_dtype(s.scalar_type()));
  at::Tensor grad = need_grad ? at::empty(s.sizes(), gopt) : at::empty({0}, gopt);
  run(s, t, temperature, grad_scale, row_loss, need_grad ? &grad : nullptr);
  return {row_loss, grad};
}

// distill_kl_fwd_out: the same into caller-owned buffers (tests poison them to catch unwritten
// elements; callers can reuse them).
inline void fwd_out(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                    double grad_scale, const at::Tensor& row_loss, const at::Tensor& grad,
                    RunFn run) {
  check_inputs(student, teacher, temperature);
  check_outputs(student, row_loss, grad);
  run(student.contiguous(), teacher.contiguous(), temperature, grad_scale, row_loss, &grad);
}

}  // namespace distill_kl
}  // namespace r2d2
