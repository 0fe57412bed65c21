// r2d2._C: the Python module object. Ops are registered through TORCH_LIBRARY_FRAGMENT(r2d2, ...)
// in each op's own file (csrc/<op>/<op>.cpp for schema + CPU, <op>_cuda.cpp for CUDA), so adding an
// op never touches this file. Importing the module runs those static registrations.
#include <torch/extension.h>

static bool cuda_built() {
#ifdef R2D2_WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "r2d2 compiled kernels (ops live under torch.ops.r2d2)";
  m.def("cuda_built", &cuda_built, "whether this build contains the CUDA kernels");
}
