// Distillation KL: CUDA binding. Converts checked, contiguous tensors to raw pointers and calls the
// plain launcher in distill_kl_kernel.cu on the current stream of the inputs' device.
//
// The device guard and current stream come from c10's device-generic interface (the CUDA
// implementation registered by torch_cuda), which returns the same stream as
// at::cuda::getCurrentCUDAStream(). Why not that call: ATen/cuda/CUDAContext.h needs the cuBLAS and
// cuSPARSE headers and c10/cuda/* needs a generated header that a CPU torch wheel does not ship,
// so csrc/check_nvcc.sh could not syntax-check this file on a machine without a CUDA torch.
#include <c10/core/DeviceGuard.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "distill_kl/distill_kl.h"
#include "distill_kl/distill_kl_kernel.h"

namespace r2d2 {
namespace distill_kl {
namespace {

DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kDouble:
      return DType::kFloat64;
    default:
      TORCH_CHECK(false, "distill_kl (cuda): unsupported dtype ", t);
  }
}

void run_cuda(const at::Tensor& s, const at::Tensor& t, double temperature, double grad_scale,
              const at::Tensor& row_loss, const at::Tensor* grad) {
  TORCH_CHECK(s.is_cuda(), "distill_kl (cuda): expected CUDA tensors, got ", s.device());
  const int64_t cols = s.size(-1);
  const int64_t rows = s.numel() / cols;
  TORCH_CHECK(rows < (int64_t{1} << 31), "distill_kl (cuda): ", rows,
              " rows exceed the grid limit of 2^31 - 1 (one block per row)");
  const c10::DeviceGuard guard(s.device());
  const c10::Stream stream =
      c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(s.device());
  const int err = fwd_cuda(kernel_dtype(s.scalar_type()), s.const_data_ptr(), t.const_data_ptr(),
                           row_loss.mutable_data_ptr(), grad ? grad->mutable_data_ptr() : nullptr,
                           rows, cols, temperature, grad_scale,
                           static_cast<cudaStream_t>(stream.native_handle()));
  TORCH_CHECK(err == 0, "distill_kl (cuda): kernel launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda_op(const at::Tensor& student,
                                               const at::Tensor& teacher, double temperature,
                                               double grad_scale, bool need_grad) {
  return fwd(student, teacher, temperature, grad_scale, need_grad, &run_cuda);
}

void fwd_out_cuda_op(const at::Tensor& student, const at::Tensor& teacher, double temperature,
                     double grad_scale, const at::Tensor& row_loss, const at::Tensor& grad) {
  fwd_out(student, teacher, temperature, grad_scale, row_loss, grad, &run_cuda);
}

}  // namespace
}  // namespace distill_kl
}  // namespace r2d2

TORCH_LIBRARY_IMPL(r2d2, CUDA, m) {
  m.impl("distill_kl_fwd", &r2d2::distill_kl::fwd_cuda_op);
  m.impl("distill_kl_fwd_out", &r2d2::distill_kl::fwd_out_cuda_op);
}
