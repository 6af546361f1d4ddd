// Module init for robustops._C.
//
// Kernels are NOT bound here: every op is registered with the PyTorch dispatcher
// (TORCH_LIBRARY_FRAGMENT in csrc/ops/<op>.cpp, TORCH_LIBRARY_IMPL in cpu/ and cuda/), and called
// as torch.ops.robustops.<op>. Importing this module runs those static registrations. The only
// Python binding is build_info(), describing how this binary was built.
#include <torch/extension.h>
#include <torch/version.h>

#include <string>

#ifndef ROBUSTOPS_COMPILER
#define ROBUSTOPS_COMPILER "c++"
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = std::string(TORCH_VERSION);
#ifdef ROBUSTOPS_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
#ifdef ROBUSTOPS_WITH_OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["compiler"] = std::string(ROBUSTOPS_COMPILER) + " " + std::string(__VERSION__);
#ifdef NDEBUG
  info["debug"] = false;
#else
  info["debug"] = true;
#endif
  return info;
}

}  // namespace

// The schema namespace is owned here; each op adds its schemas with TORCH_LIBRARY_FRAGMENT.
TORCH_LIBRARY(robustops, m) {}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "robustops compiled core: registers the torch.ops.robustops.* operators";
  m.def("build_info", &build_info, "How this robustops binary was built (torch, CUDA, OpenMP, compiler).");
}
