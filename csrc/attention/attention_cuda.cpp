// Attention: op schemas and CUDA binding (torch.ops.r2d2.attention_fwd / attention_bwd).
// Checks arguments (messages name the argument), makes q/k/v/dO contiguous, allocates outputs and
// calls the raw-pointer launchers of attention_kernel.cu on the current stream.
//
// The schemas live here, not in a CPU .cpp: the ops have no CPU kernel (CPU attention is eager or
// SDPA), so a CPU-only build does not register them and dispatch reports the cuda backend as
// missing instead of failing at call time. Device guard and stream come from c10's device-generic
// interface for the reason given in csrc/distill_kl/distill_kl_cuda.cpp (check_nvcc.sh must
// syntax-check this file against a CPU torch wheel's headers).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "attention/attention_kernel.h"

namespace r2d2 {
namespace attention {
namespace {

DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "attention (cuda): q dtype ", t,
                  " is not supported; expected float16, bfloat16 or float32");
  }
}

void check_same(const at::Tensor& q, const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "attention (cuda): ", name, " must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.device() == q.device(), "attention (cuda): ", name, " is on ", x.device(),
              " but q is on ", q.device());
  TORCH_CHECK(x.scalar_type() == q.scalar_type(), "attention (cuda): ", name, " dtype ",
              x.scalar_type(), " must equal q dtype ", q.scalar_type());
}

// Returns a contiguous uint8 view of the mask, or an undefined tensor.
at::Tensor check_mask(const std::optional<at::Tensor>& mask, const at::Tensor& q, int64_t Lk) {
  if (!mask.has_value() || !mask->defined()) return at::Tensor();
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.scalar_type() == at::kBool, "attention (cuda): key_padding_mask must be bool "
              "(True = attend), got ", m.scalar_type());
  TORCH_CHECK(m.dim() == 2 && m.size(0) == q.size(0) && m.size(1) == Lk,
              "attention (cuda): key_padding_mask must be [B=", q.size(0), ", Lk=", Lk, "], got ",
              m.sizes());
  TORCH_CHECK(m.device() == q.device(), "attention (cuda): key_padding_mask is on ", m.device(),
              " but q is on ", q.device());
  return m.contiguous().view(at::kByte);
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, double scale, double dropout_p,
                     int64_t seed, int64_t offset, bool causal) {
  TORCH_CHECK(q.dim() == 4, "attention (cuda): q must be [B, H, Lq, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) &&
                  k.size(3) == q.size(3),
              "attention (cuda): k must be [B, H, Lk, D] matching q ", q.sizes(), ", got ",
              k.sizes());
  TORCH_CHECK(q.size(3) <= kMaxHeadDim, "attention (cuda): head dim D=", q.size(3),
              " exceeds the supported maximum ", kMaxHeadDim);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "attention (cuda): dropout_p must be in [0, 1), "
              "got ", dropout_p);
  TORCH_CHECK(seed >= 0 && offset >= 0 && offset <= std::numeric_limits<uint32_t>::max(),
              "attention (cuda): seed must be >= 0 and offset in [0, 2^32), got ", seed, ", ",
              offset);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(q.size(0) * q.size(1) <= kIntMax && q.size(2) <= kIntMax && k.size(2) <= kIntMax,
              "attention (cuda): B*H, Lq and Lk must each fit in int32, got ", q.sizes(), " and ",
              k.sizes());
  TORCH_CHECK(q.size(2) <= kMaxSeqLen && k.size(2) <= kMaxSeqLen,
              "attention (cuda): Lq and Lk must each be <= ", kMaxSeqLen,
              " (one grid row of blocks per 32 rows), got Lq=", q.size(2), ", Lk=", k.size(2),
              "; use backend='sdpa' or 'triton'");
  TORCH_CHECK(dropout_p == 0.0 ||
                  q.size(0) * q.size(1) * q.size(2) * k.size(2) < (int64_t{1} << 32),
              "attention (cuda): dropout draws one Philox offset per score and needs "
              "B*H*Lq*Lk < 2^32");
  return Problem{static_cast<int>(q.size(0)), static_cast<int>(q.size(1)),
                 static_cast<int>(q.size(2)), static_cast<int>(k.size(2)),
                 static_cast<int>(q.size(3)), static_cast<float>(scale),
                 static_cast<float>(dropout_p), static_cast<uint64_t>(seed),
                 static_cast<uint32_t>(offset), causal ? 1 : 0};
}

cudaStream_t current_stream(const at::Tensor& q) {
  const c10::Stream stream =
      c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(q.device());
  return static_cast<cudaStream_t>(stream.native_handle());
}

void check_launch(int err, const char* what) {
  const cudaError_t e = static_cast<cudaError_t>(err);
  TORCH_CHECK(err == 0, "attention (cuda): ", what, " launch failed: ", cudaGetErrorString(e),
              e == cudaErrorLaunchOutOfResources
                  ? " (most likely a block needs more shared memory than this GPU allows: the "
                    "kernels are sized for sm_80/sm_90, up to 116 KB; use backend='triton' or "
                    "'sdpa')"
                  : "");
}

std::tuple<at::Tensor, at::Tensor> fwd_op(const at::Tensor& q_in, const at::Tensor& k_in,
                                          const at::Tensor& v_in,
                                          const std::optional<at::Tensor>& mask_in, double scale,
                                          double dropout_p, int64_t seed, int64_t offset,
                                          bool causal) {
  TORCH_CHECK(q_in.is_cuda(), "attention (cuda): q must be a CUDA tensor, got ", q_in.device());
  check_same(q_in, k_in, "k");
  check_same(q_in, v_in, "v");
  TORCH_CHECK(v_in.sizes() == k_in.sizes(), "attention (cuda): v shape ", v_in.sizes(),
              " must equal k shape ", k_in.sizes());
  const Problem pr = make_problem(q_in, k_in, scale, dropout_p, seed, offset, causal);
  const DType dt = kernel_dtype(q_in.scalar_type());
  const at::Tensor mask = check_mask(mask_in, q_in, k_in.size(2));
  const c10::DeviceGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  at::Tensor o = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0) * q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (o.numel() == 0 && lse.numel() == 0) return {o, lse};
  if (pr.D == 0) {  // empty head dim: zero outputs, lse as for no attended key
    lse.fill_(std::numeric_limits<float>::infinity());
    return {o, lse};
  }
  check_launch(attention_fwd_cuda(dt, q.const_data_ptr(), k.const_data_ptr(), v.const_data_ptr(),
                                  mask.defined() ? mask.const_data_ptr<uint8_t>() : nullptr,
                                  o.mutable_data_ptr(), lse.mutable_data_ptr<float>(), pr,
                                  current_stream(q)),
               "forward");
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_op(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& o_in, const at::Tensor& lse_in,
    const std::optional<at::Tensor>& mask_in, double scale, double dropout_p, int64_t seed,
    int64_t offset, bool causal) {
  TORCH_CHECK(q_in.is_cuda(), "attention (cuda): q must be a CUDA tensor, got ", q_in.device());
  check_same(q_in, k_in, "k");
  check_same(q_in, v_in, "v");
  check_same(q_in, o_in, "out");
  check_same(q_in, dout_in, "grad_out");
  TORCH_CHECK(v_in.sizes() == k_in.sizes(), "attention (cuda): v shape ", v_in.sizes(),
              " must equal k shape ", k_in.sizes());
  TORCH_CHECK(o_in.sizes() == q_in.sizes() && dout_in.sizes() == q_in.sizes(),
              "attention (cuda): out and grad_out must have q's shape ", q_in.sizes(), ", got ",
              o_in.sizes(), " and ", dout_in.sizes());
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.dim() == 2 &&
                  lse_in.size(0) == q_in.size(0) * q_in.size(1) && lse_in.size(1) == q_in.size(2),
              "attention (cuda): lse must be float32 [B*H, Lq] from attention_fwd, got ",
              lse_in.scalar_type(), " ", lse_in.sizes());
  TORCH_CHECK(lse_in.device() == q_in.device(), "attention (cuda): lse is on ", lse_in.device(),
              " but q is on ", q_in.device());
  const Problem pr = make_problem(q_in, k_in, scale, dropout_p, seed, offset, causal);
  const DType dt = kernel_dtype(q_in.scalar_type());
  const at::Tensor mask = check_mask(mask_in, q_in, k_in.size(2));
  const c10::DeviceGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor o = o_in.contiguous(), dout = dout_in.contiguous(), lse = lse_in.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (pr.B * pr.H == 0 || pr.D == 0) return {dq, dk, dv};
  if (pr.Lq == 0 || pr.Lk == 0) {  // no score at all: every gradient is zero
    return {dq.zero_(), dk.zero_(), dv.zero_()};
  }
  at::Tensor delta = at::empty({q.size(0) * q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  check_launch(
      attention_bwd_cuda(dt, dout.const_data_ptr(), q.const_data_ptr(), k.const_data_ptr(),
                         v.const_data_ptr(), o.const_data_ptr(), lse.const_data_ptr<float>(),
                         mask.defined() ? mask.const_data_ptr<uint8_t>() : nullptr,
                         delta.mutable_data_ptr<float>(), dq.mutable_data_ptr(),
                         dk.mutable_data_ptr(), dv.mutable_data_ptr(), pr, current_stream(q)),
      "backward");
  return {dq, dk, dv};
}

}  // namespace
}  // namespace attention
}  // namespace r2d2

TORCH_LIBRARY_FRAGMENT(r2d2, m) {
  // out = softmax(scale * q k^T masked by key_padding_mask (True = attend) and, if causal, by
  // j <= i + Lk - Lq (bottom-right), dropout) v;
  // lse = log2-domain logsumexp per query, float32 [B*H, Lq], +inf for a query with no key.
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float scale, "
      "float dropout_p, int seed, int offset, bool causal=False) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? key_padding_mask, float scale, float dropout_p, int seed, int offset, "
      "bool causal=False) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}

TORCH_LIBRARY_IMPL(r2d2, CUDA, m) {
  m.impl("attention_fwd", &r2d2::attention::fwd_op);
  m.impl("attention_bwd", &r2d2::attention::bwd_op);
}
