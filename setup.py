"""Build script for the robustops C++/CUDA extension (``robustops._C``).

Environment switches:
  FORCE_CUDA=1          compile the CUDA sources even when no GPU / CUDA runtime is visible
  FORCE_CPU=1           never compile CUDA sources
  TORCH_CUDA_ARCH_LIST  honoured by torch.utils.cpp_extension (e.g. "9.0")
  DEBUG=1               -O0 -g, no NDEBUG (for gdb / AddressSanitizer)
  ROBUSTOPS_ASAN=1      with DEBUG=1, add -fsanitize=address
"""
import glob
import os
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _torch_uses_openmp():
    # Match torch's own parallel backend: at::parallel_for in our kernels is compiled inline, so
    # our objects must be built with the same threading runtime torch was built with.
    return "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


def _want_cuda():
    if _flag("FORCE_CPU"):
        return False
    if _flag("FORCE_CUDA"):
        return True
    return torch.cuda.is_available() and CUDA_HOME is not None


def get_extension():
    debug = _flag("DEBUG")
    with_cuda = _want_cuda()
    openmp = _torch_uses_openmp() and sys.platform.startswith("linux")

    sources = [os.path.join(CSRC, "robustops.cpp")]
    sources += sorted(glob.glob(os.path.join(CSRC, "ops", "*.cpp")))
    sources += sorted(glob.glob(os.path.join(CSRC, "ops", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join(CSRC, "ops", "cuda", "*.cu")))

    define_macros = [("ROBUSTOPS_COMPILER", '"%s"' % _compiler_name())]
    # The C++ standard is left to torch.utils.cpp_extension (C++17 or C++20 by torch version).
    cxx = ["-fvisibility=hidden"]
    nvcc = ["--expt-relaxed-constexpr", "-lineinfo"]
    link = []
    if debug:
        cxx += ["-O0", "-g3", "-UNDEBUG"]
        nvcc += ["-O0", "-g", "-G"]
        if _flag("ROBUSTOPS_ASAN"):
            cxx += ["-fsanitize=address", "-fno-omit-frame-pointer"]
            link += ["-fsanitize=address"]
    else:
        cxx += ["-O3"]
        nvcc += ["-O3"]
    if openmp:
        cxx += ["-fopenmp"]
        link += ["-fopenmp"]
        define_macros.append(("ROBUSTOPS_WITH_OPENMP", "1"))

    if with_cuda:
        define_macros.append(("ROBUSTOPS_WITH_CUDA", "1"))
        return CUDAExtension(
            "robustops._C",
            sources + cuda_sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    return CppExtension(
        "robustops._C",
        sources,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


def _compiler_name():
    cc = os.environ.get("CXX", "c++")
    return os.path.basename(cc).replace('"', "")


setup(
    packages=find_packages(include=["robustops", "robustops.*"]),
    ext_modules=[get_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
