// GCPR contrastive loss: op schemas and CUDA binding (torch.ops.r2d2.contrastive_fwd / _merge /
// _bwd_rows / _bwd_cols). The ops are the per-block steps of r2d2/kernels/contrastive_dist.py,
// which owns the allocation, the grid plan, the autograd and the gather / ring drivers; they
// mutate their partial-statistics / gradient buffers in place and return nothing (fake functions
// in r2d2/kernels/contrastive_cuda.py). The schemas live here rather than in a CPU
// contrastive.cpp because there is no CPU implementation (the eager reference is the CPU path),
// so only CUDA builds register them.
//
// Stream and device guard come from c10's device-generic interface; see distill_kl_cuda.cpp for
// why ATen/cuda/CUDAContext.h is avoided.
#include <c10/core/DeviceGuard.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
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

// A contiguous tensor of dtype dt and exactly the given sizes, on q's device.
void check_buf(const at::Tensor& t, const char* name, at::ScalarType dt, at::IntArrayRef sizes,
               const at::Tensor& q) {
  TORCH_CHECK(t.device() == q.device(), "contrastive (cuda): ", name, " must be on ", q.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dt && t.sizes() == sizes && t.is_contiguous(),
              "contrastive (cuda): ", name, " must be a contiguous ", dt, " tensor of shape ",
              sizes, ", got ", t.scalar_type(), " ", t.sizes());
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

void check_common(const at::Tensor& q, const at::Tensor& k, const OptT& tq, const OptT& tk,
                  const at::Tensor& rid, const at::Tensor& cid, const at::Tensor& scale) {
  // q's device is the reference of every other check, so it is checked on its own first; then
  // the ranks (size(0) of a 0-d tensor would throw an error that names no argument).
  TORCH_CHECK(q.is_cuda(), "contrastive (cuda): q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK(q.dim() == 2, "contrastive (cuda): q must be [b, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == 2, "contrastive (cuda): k must be [n, D], got ", k.sizes());
  const int64_t b = q.size(0), n = k.size(0);
  // The grid plans (and the kernels' "every tile has a real row / column") need both non-empty.
  TORCH_CHECK(b > 0 && n > 0, "contrastive (cuda): needs at least one row and one column, got b=",
              b, ", n=", n);
  check_feat(q, "q", q, b);
  check_feat(k, "k", q, n);
  check_teacher(tq, tk, q, n);
  check_buf(rid, "rid", at::kLong, {b}, q);
  check_buf(cid, "cid", at::kLong, {n}, q);
  check_buf(scale, "scale", at::kFloat, {1}, q);
  TORCH_CHECK(b + n < (int64_t{1} << 31), "contrastive (cuda): indices must fit in int32");
}

int64_t nfields(bool teacher, bool neg) { return 4 + 3 * teacher + neg; }

// A partial / state buffer [nf, slots..., n] and its gi buffer (checked only with negatives).
void check_stats(const at::Tensor& f, const at::Tensor& gi, const char* name,
                 at::IntArrayRef shape, bool teacher, bool neg, const at::Tensor& q) {
  std::vector<int64_t> fs{nfields(teacher, neg)};
  fs.insert(fs.end(), shape.begin(), shape.end());
  check_buf(f, name, at::kFloat, fs, q);
  if (neg) check_buf(gi, "gi", at::kInt, shape, q);
}

void fwd(const at::Tensor& q, const at::Tensor& k, const OptT& tq, const OptT& tk,
         const at::Tensor& rid, const at::Tensor& cid, const at::Tensor& scale,
         const at::Tensor& row_part, const at::Tensor& row_gi, const at::Tensor& col_part,
         const at::Tensor& col_gi, int64_t tpc, int64_t row_off, int64_t col_off, int64_t key_row,
         int64_t key_col, bool neg) {
  check_common(q, k, tq, tk, rid, cid, scale);
  const int64_t b = q.size(0), n = k.size(0);
  const bool teacher = tq.has_value();
  TORCH_CHECK(row_part.dim() == 3 && col_part.dim() == 3,
              "contrastive (cuda): row_part / col_part must be [nf, slots, b / n]");
  const int64_t C = row_part.size(1), R = col_part.size(1);
  const int64_t nrb = cdiv(b, kTileRows), nct = cdiv(n, kTileCols);
  // Every slot must be written: R row-programs each with a row block, C column splits each with
  // a tile (the merge reads all of them).
  TORCH_CHECK(R >= 1 && R <= nrb && R <= 65535, "contrastive (cuda): col_part has ", R,
              " slots; need 1 .. ", nrb, " (row blocks of ", kTileRows, ")");
  TORCH_CHECK(tpc >= 1 && C == cdiv(nct, tpc) && C <= 65535, "contrastive (cuda): row_part has ",
              C, " slots but ", nct, " column tiles of ", kTileCols, " at ", tpc,
              " per split make ", tpc >= 1 ? cdiv(nct, tpc) : 0);
  check_stats(row_part, row_gi, "row_part", {C, b}, teacher, neg, q);
  check_stats(col_part, col_gi, "col_part", {R, n}, teacher, neg, q);
  TORCH_CHECK(key_row >= 0 && key_row <= 0xFFFFFFFFll && key_col >= 0 && key_col <= 0xFFFFFFFFll,
              "contrastive (cuda): keys must be uint32");
  TORCH_CHECK(row_off >= 0 && col_off >= 0 && row_off + b < (int64_t{1} << 31) &&
                  col_off + n < (int64_t{1} << 31),
              "contrastive (cuda): global indices must fit in int32");
  const c10::DeviceGuard guard(q.device());
  FwdArgs a{q.const_data_ptr(), k.const_data_ptr(),
            tq ? tq->const_data_ptr() : nullptr, tk ? tk->const_data_ptr() : nullptr,
            rid.const_data_ptr<int64_t>(), cid.const_data_ptr<int64_t>(),
            scale.const_data_ptr<float>(),
            row_part.mutable_data_ptr<float>(), neg ? row_gi.mutable_data_ptr<int32_t>() : nullptr,
            col_part.mutable_data_ptr<float>(), neg ? col_gi.mutable_data_ptr<int32_t>() : nullptr,
            b, n, q.size(1), static_cast<int>(R), static_cast<int>(C),
            // tpc > nct means "all tiles" (C = 1); clamped so the int cast cannot truncate it.
            static_cast<int>(std::min(tpc, nct)),
            row_off, col_off, static_cast<uint32_t>(key_row), static_cast<uint32_t>(key_col),
            neg};
  const int err = fwd_cuda(kernel_dtype(q), a, stream_of(q));
  TORCH_CHECK(err == 0, "contrastive (cuda): forward launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

void merge(const at::Tensor& state, const at::Tensor& state_gi, const at::Tensor& part,
           const at::Tensor& part_gi, bool teacher, bool neg, bool init) {
  TORCH_CHECK(state.is_cuda() && state.dim() == 2 && part.dim() == 3,
              "contrastive (cuda): merge takes a CUDA state [nf, n] and partials [nf, P, n]");
  const int64_t n = state.size(1), P = part.size(1);
  TORCH_CHECK(P >= 1, "contrastive (cuda): merge needs at least one partial slot");
  check_stats(state, state_gi, "state", {n}, teacher, neg, state);
  check_stats(part, part_gi, "part", {P, n}, teacher, neg, state);
  const c10::DeviceGuard guard(state.device());
  MergeArgs a{state.mutable_data_ptr<float>(), neg ? state_gi.mutable_data_ptr<int32_t>() : nullptr,
              part.const_data_ptr<float>(), neg ? part_gi.const_data_ptr<int32_t>() : nullptr,
              n, static_cast<int>(P), teacher, neg, init};
  const int err = merge_cuda(a, stream_of(state));
  TORCH_CHECK(err == 0, "contrastive (cuda): merge launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

BwdArgs bwd_args(const at::Tensor& q, const at::Tensor& k, const OptT& tq, const OptT& tk,
                 const at::Tensor& rid, const at::Tensor& cid, const at::Tensor& scale,
                 const at::Tensor& rstat, const at::Tensor& cstat, const at::Tensor& coef,
                 const at::Tensor& bcoef, double alpha) {
  check_common(q, k, tq, tk, rid, cid, scale);
  const int64_t b = q.size(0), n = k.size(0);
  check_buf(rstat, "rstat", at::kFloat, {3, b}, q);
  check_buf(cstat, "cstat", at::kFloat, {3, n}, q);
  check_buf(coef, "coef", at::kFloat, {2}, q);
  check_buf(bcoef, "bcoef", at::kFloat, {n}, q);
  return BwdArgs{q.const_data_ptr(), k.const_data_ptr(),
                 tq ? tq->const_data_ptr() : nullptr, tk ? tk->const_data_ptr() : nullptr,
                 rid.const_data_ptr<int64_t>(), cid.const_data_ptr<int64_t>(),
                 scale.const_data_ptr<float>(), rstat.const_data_ptr<float>(),
                 cstat.const_data_ptr<float>(), coef.const_data_ptr<float>(),
                 bcoef.const_data_ptr<float>(), static_cast<float>(alpha), nullptr, nullptr,
                 b, n, q.size(1), 1, 1};
}

void bwd_rows(const at::Tensor& q, const at::Tensor& k, const OptT& tq, const OptT& tk,
              const at::Tensor& rid, const at::Tensor& cid, const at::Tensor& scale,
              const at::Tensor& rstat, const at::Tensor& cstat, const at::Tensor& coef,
              const at::Tensor& bcoef, double alpha, const OptT& dq, const at::Tensor& ds,
              int64_t tps) {
  BwdArgs a = bwd_args(q, k, tq, tk, rid, cid, scale, rstat, cstat, coef, bcoef, alpha);
  const int64_t nrb = cdiv(a.b, kTileRows), nct = cdiv(a.n, kTileCols);
  TORCH_CHECK(ds.dim() == 1 && nrb > 0 && ds.numel() % nrb == 0,
              "contrastive (cuda): ds must hold (row blocks of ", kTileRows, ") x splits = ", nrb,
              " x splits entries, got ", ds.sizes());
  const int64_t split = ds.numel() / nrb;
  TORCH_CHECK(tps >= 1 && split == cdiv(nct, tps) && split <= 65535, "contrastive (cuda): ",
              split, " splits do not cover ", nct, " column tiles of ", kTileCols, " at ", tps,
              " per split");
  check_buf(ds, "ds", at::kFloat, {nrb * split}, q);
  if (dq) check_buf(*dq, "dq", at::kFloat, {split, a.b, a.D}, q);
  a.out = dq ? dq->mutable_data_ptr<float>() : nullptr;
  a.ds = ds.mutable_data_ptr<float>();
  a.split = static_cast<int>(split);
  a.tps = static_cast<int>(std::min(tps, nct));  // tps > nct: one split of all tiles; no truncation
  const c10::DeviceGuard guard(q.device());
  const int err = bwd_rows_cuda(kernel_dtype(q), a, stream_of(q));
  TORCH_CHECK(err == 0, "contrastive (cuda): backward (rows) launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

void bwd_cols(const at::Tensor& q, const at::Tensor& k, const OptT& tq, const OptT& tk,
              const at::Tensor& rid, const at::Tensor& cid, const at::Tensor& scale,
              const at::Tensor& rstat, const at::Tensor& cstat, const at::Tensor& coef,
              const at::Tensor& bcoef, double alpha, const OptT& dk, const at::Tensor& dsc,
              int64_t tps) {
  BwdArgs a = bwd_args(q, k, tq, tk, rid, cid, scale, rstat, cstat, coef, bcoef, alpha);
  const int64_t nrt = cdiv(a.b, kTileCols);
  TORCH_CHECK(dsc.dim() == 2, "contrastive (cuda): dsc must be [splits, n], got ", dsc.sizes());
  const int64_t split = dsc.size(0);
  TORCH_CHECK(tps >= 1 && split == cdiv(nrt, tps) && split <= 65535, "contrastive (cuda): ",
              split, " splits do not cover ", nrt, " row tiles of ", kTileCols, " at ", tps,
              " per split");
  check_buf(dsc, "dsc", at::kFloat, {split, a.n}, q);
  if (dk) check_buf(*dk, "dk", at::kFloat, {split, a.n, a.D}, q);
  a.out = dk ? dk->mutable_data_ptr<float>() : nullptr;
  a.ds = dsc.mutable_data_ptr<float>();
  a.split = static_cast<int>(split);
  a.tps = static_cast<int>(std::min(tps, nrt));  // as in bwd_rows
  const c10::DeviceGuard guard(q.device());
  const int err = bwd_cols_cuda(kernel_dtype(q), a, stream_of(q));
  TORCH_CHECK(err == 0, "contrastive (cuda): backward (cols) launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

}  // namespace
}  // namespace contrastive
}  // namespace r2d2

TORCH_LIBRARY_FRAGMENT(r2d2, m) {
  m.def("contrastive_fwd(Tensor q, Tensor k, Tensor? tq, Tensor? tk, Tensor rid, Tensor cid, "
        "Tensor scale, Tensor(a!) row_part, Tensor(b!) row_gi, Tensor(c!) col_part, "
        "Tensor(d!) col_gi, int tpc, int row_off, int col_off, int key_row, int key_col, "
        "bool neg) -> ()");
  m.def("contrastive_merge(Tensor(a!) state, Tensor(b!) state_gi, Tensor part, Tensor part_gi, "
        "bool teacher, bool neg, bool init) -> ()");
  m.def("contrastive_bwd_rows(Tensor q, Tensor k, Tensor? tq, Tensor? tk, Tensor rid, "
        "Tensor cid, Tensor scale, Tensor rstat, Tensor cstat, Tensor coef, Tensor bcoef, "
        "float alpha, Tensor(a!)? dq, Tensor(b!) ds, int tps) -> ()");
  m.def("contrastive_bwd_cols(Tensor q, Tensor k, Tensor? tq, Tensor? tk, Tensor rid, "
        "Tensor cid, Tensor scale, Tensor rstat, Tensor cstat, Tensor coef, Tensor bcoef, "
        "float alpha, Tensor(a!)? dk, Tensor(b!) dsc, int tps) -> ()");
}

TORCH_LIBRARY_IMPL(r2d2, CUDA, m) {
  m.impl("contrastive_fwd", &r2d2::contrastive::fwd);
  m.impl("contrastive_merge", &r2d2::contrastive::merge);
  m.impl("contrastive_bwd_rows", &r2d2::contrastive::bwd_rows);
  m.impl("contrastive_bwd_cols", &r2d2::contrastive::bwd_cols);
}
