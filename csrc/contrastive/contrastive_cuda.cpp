// GCPR contrastive loss: op schemas and CUDA binding (torch.ops.r2d2.contrastive_fwd_block /
// contrastive_bwd_block). The ops are the per-block steps of r2d2/kernels/contrastive_dist.py,
// which owns the autograd and the gather / ring drivers; they mutate the state / gradient
// accumulators in place. The schemas live here rather than in a CPU contrastive.cpp because
// there is no CPU implementation (the eager reference is the CPU path), so only CUDA builds
// register them.
//
// Stream and device guard come from c10's device-generic interface; see distill_kl_cuda.cpp for
// why ATen/cuda/CUDAContext.h is avoided.
#include <c10/core/DeviceGuard.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <optional>

#include "contrastive/contrastive_kernel.h"

namespace r2d2 {
namespace contrastive {
namespace {

using OptT = std::optional<at::Tensor>;

DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "contrastive (cuda): features must be float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
}

void check_feat(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t rows) {
  TORCH_CHECK(t.is_cuda() && t.device() == q.device(), "contrastive (cuda): ", name,
              " must be a CUDA tensor on ", q.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == q.size(1),
              "contrastive (cuda): ", name, " must be [", rows, ", ", q.size(1), "], got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "contrastive (cuda): ", name, " must be ",
              q.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "contrastive (cuda): ", name, " must be contiguous");
}

void check_vec(const at::Tensor& t, const char* name, at::ScalarType dt, int64_t n,
               const at::Tensor& q) {
  TORCH_CHECK(t.device() == q.device(), "contrastive (cuda): ", name, " must be on ", q.device());
  TORCH_CHECK(t.scalar_type() == dt && t.numel() == n && t.is_contiguous(),
              "contrastive (cuda): ", name, " must be a contiguous ", dt, " tensor of ", n,
              " elements, got ", t.scalar_type(), " ", t.sizes());
}

cudaStream_t stream_of(const at::Tensor& t) {
  const c10::Stream stream =
      c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(t.device());
  return static_cast<cudaStream_t>(stream.native_handle());
}

void check_teacher(const OptT& tq, const OptT& tk, const at::Tensor& q, int64_t n) {
  TORCH_CHECK(tq.has_value() == tk.has_value(),
              "contrastive (cuda): give both teacher tensors (tq, tk) or neither");
  if (tq.has_value()) {
    check_feat(*tq, "tq", q, q.size(0));
    check_feat(*tk, "tk", q, n);
  }
}

void fwd_block(const at::Tensor& q, const at::Tensor& k, const OptT& tq, const OptT& tk,
               const at::Tensor& rid, const at::Tensor& cid, const at::Tensor& scale,
               const at::Tensor& m, const at::Tensor& l, const at::Tensor& hs,
               const at::Tensor& cnt, const at::Tensor& tm, const at::Tensor& tl,
               const at::Tensor& tw, const at::Tensor& gv, const at::Tensor& gi, int64_t row_off,
               int64_t col_off, int64_t key, bool neg) {
  const int64_t b = q.size(0), n = k.size(0);
  check_feat(q, "q", q, b);
  check_feat(k, "k", q, n);
  check_teacher(tq, tk, q, n);
  check_vec(rid, "rid", at::kLong, b, q);
  check_vec(cid, "cid", at::kLong, n, q);
  check_vec(scale, "scale", at::kFloat, 1, q);
  const at::Tensor* state[] = {&m, &l, &hs, &cnt, &tm, &tl, &tw, &gv};
  for (const at::Tensor* t : state) check_vec(*t, "state", at::kFloat, b, q);
  check_vec(gi, "gi", at::kLong, b, q);
  TORCH_CHECK(key >= 0 && key <= 0xFFFFFFFFll, "contrastive (cuda): key must be a uint32");
  const c10::DeviceGuard guard(q.device());
  FwdArgs a{q.const_data_ptr(), k.const_data_ptr(),
            tq ? tq->const_data_ptr() : nullptr, tk ? tk->const_data_ptr() : nullptr,
            rid.const_data_ptr<int64_t>(), cid.const_data_ptr<int64_t>(),
            scale.const_data_ptr<float>(), m.mutable_data_ptr<float>(),
            l.mutable_data_ptr<float>(), hs.mutable_data_ptr<float>(),
            cnt.mutable_data_ptr<float>(), tm.mutable_data_ptr<float>(),
            tl.mutable_data_ptr<float>(), tw.mutable_data_ptr<float>(),
            gv.mutable_data_ptr<float>(), gi.mutable_data_ptr<int64_t>(), b, n, q.size(1),
            row_off, col_off, static_cast<uint32_t>(key), neg};
  const int err = fwd_block_cuda(kernel_dtype(q), a, stream_of(q));
  TORCH_CHECK(err == 0, "contrastive (cuda): forward launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

void bwd_block(const at::Tensor& q, const at::Tensor& k, const OptT& tq, const OptT& tk,
               const at::Tensor& rid, const at::Tensor& cid, const at::Tensor& scale,
               const at::Tensor& g, const at::Tensor& lse, const at::Tensor& tlse,
               const at::Tensor& icnt, double alpha, const OptT& dq, const OptT& dk,
               const at::Tensor& ds) {
  const int64_t b = q.size(0), n = k.size(0), d = q.size(1);
  check_feat(q, "q", q, b);
  check_feat(k, "k", q, n);
  check_teacher(tq, tk, q, n);
  check_vec(rid, "rid", at::kLong, b, q);
  check_vec(cid, "cid", at::kLong, n, q);
  check_vec(scale, "scale", at::kFloat, 1, q);
  check_vec(g, "g", at::kFloat, 1, q);
  check_vec(lse, "lse", at::kFloat, b, q);
  check_vec(tlse, "tlse", at::kFloat, b, q);
  check_vec(icnt, "icnt", at::kFloat, b, q);
  if (dq) check_vec(*dq, "dq", at::kFloat, b * d, q);
  if (dk) check_vec(*dk, "dk", at::kFloat, n * d, q);
  check_vec(ds, "ds", at::kFloat, (b + kTileRows - 1) / kTileRows, q);
  const c10::DeviceGuard guard(q.device());
  BwdArgs a{q.const_data_ptr(), k.const_data_ptr(),
            tq ? tq->const_data_ptr() : nullptr, tk ? tk->const_data_ptr() : nullptr,
            rid.const_data_ptr<int64_t>(), cid.const_data_ptr<int64_t>(),
            scale.const_data_ptr<float>(), g.const_data_ptr<float>(),
            lse.const_data_ptr<float>(), tlse.const_data_ptr<float>(),
            icnt.const_data_ptr<float>(), static_cast<float>(alpha),
            dq ? dq->mutable_data_ptr<float>() : nullptr,
            dk ? dk->mutable_data_ptr<float>() : nullptr, ds.mutable_data_ptr<float>(), b, n, d};
  const int err = bwd_block_cuda(kernel_dtype(q), a, stream_of(q));
  TORCH_CHECK(err == 0, "contrastive (cuda): backward launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

}  // namespace
}  // namespace contrastive
}  // namespace r2d2

TORCH_LIBRARY_FRAGMENT(r2d2, m) {
  m.def("contrastive_fwd_block(Tensor q, Tensor k, Tensor? tq, Tensor? tk, Tensor rid, "
        "Tensor cid, Tensor scale, Tensor(a!) m, Tensor(b!) l, Tensor(c!) hs, Tensor(d!) cnt, "
        "Tensor(e!) tm, Tensor(f!) tl, Tensor(g!) tw, Tensor(h!) gv, Tensor(i!) gi, int row_off, "
        "int col_off, int key, bool neg) -> ()");
  m.def("contrastive_bwd_block(Tensor q, Tensor k, Tensor? tq, Tensor? tk, Tensor rid, "
        "Tensor cid, Tensor scale, Tensor g, Tensor lse, Tensor tlse, Tensor icnt, float alpha, "
        "Tensor(a!)? dq, Tensor(b!)? dk, Tensor(c!) ds) -> ()");
}

TORCH_LIBRARY_IMPL(r2d2, CUDA, m) {
  m.impl("contrastive_fwd_block", &r2d2::contrastive::fwd_block);
  m.impl("contrastive_bwd_block", &r2d2::contrastive::bwd_block);
}
