// Module init for robustops._C.
//
// Kernels are NOT bound here: every op is registered with the PyTorch dispatcher
// (TORCH_LIBRARY_FRAGMENT in csrc/ops/<op>.cpp, TORCH_LIBRARY_IMPL in cpu/ and cuda/), and called
// as torch.ops.robustops.<op>. Importing this module runs those static registrations. The only
// Python binding is build_info(), describing how this binary was built. setup.py passes the
// robustops version and the torch (and CUDA) version it compiles against as macros, and writes the
// same facts to robustops/_build_meta.py, which the package checks before loading this module.
#include <torch/extension.h>
#include <torch/version.h>

#include <string>

#ifndef ROBUSTOPS_COMPILER
#define ROBUSTOPS_COMPILER "c++"
#endif
#ifndef ROBUSTOPS_VERSION
#define ROBUSTOPS_VERSION "unknown"
#endif
#ifndef ROBUSTOPS_TORCH_VERSION  // torch.__version__ at build time (with its local label)
#define ROBUSTOPS_TORCH_VERSION TORCH_VERSION
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = std::string(ROBUSTOPS_VERSION);
  info["torch_version"] = std::string(ROBUSTOPS_TORCH_VERSION);
#ifdef ROBUSTOPS_WITH_CUDA
  info["cuda"] = true;
#ifdef ROBUSTOPS_TORCH_CUDA_VERSION
  info["cuda_version"] = std::string(ROBUSTOPS_TORCH_CUDA_VERSION);
#else
  info["cuda_version"] = pybind11::none();
#endif
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
#endif
#if defined(_GLIBCXX_USE_CXX11_ABI)
  info["cxx11_abi"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
#else
  info["cxx11_abi"] = pybind11::none();  // not libstdc++ (e.g. MSVC, libc++)
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
