"""Build script for the robustops C++/CUDA extension (``robustops._C``).

Environment switches:
  FORCE_CUDA=1          compile the CUDA sources even when no GPU / CUDA runtime is visible
  FORCE_CPU=1           never compile CUDA sources
  TORCH_CUDA_ARCH_LIST  honoured by torch.utils.cpp_extension (e.g. "9.0")
  DEBUG=1               -O0 -g, no NDEBUG (for gdb / AddressSanitizer); release builds carry no
                        debug info (-g0)
  ROBUSTOPS_ASAN=1      with DEBUG=1, add -fsanitize=address
  ROBUSTOPS_LINEINFO=1  release CUDA build with -lineinfo (source lines for Nsight Compute)
  ROBUSTOPS_LOCAL_VERSION=LABEL  replace the flavour label (+cpu / +cu130) of the version; an empty
                        value gives the plain version (what an index without local labels needs)

Versioning: the release version lives only in robustops/_version.py. A wheel (or an editable/in-place
build) gets the local label of its flavour, ``0.1.0+cpu`` or ``0.1.0+cu130`` as torch's wheels do,
and pins the torch series it was compiled against (``torch==2.13.*``) in its metadata; the sdist
carries the plain version and ``torch>=2.4``. Every build writes robustops/_build_meta.py (what it
was built with), which ``import robustops`` checks against the running torch before loading _C.
"""
import glob
import os
import runpy
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")
_V = runpy.run_path(os.path.join(HERE, "robustops", "_version.py"))
BASE_VERSION = _V["__version__"]
# Runtime dependencies besides torch (torch's pin depends on the build, see _torch_requirement).
DEPENDENCIES = ["numpy", "scipy", "scikit-learn", "tqdm"]  # tqdm: progress bars of the robustops CLI
# An sdist is not compiled: no flavour label, no torch series pin.
_COMPILING = {"build", "build_ext", "bdist_wheel", "editable_wheel", "install", "develop"}
BUILDING_SDIST = "sdist" in sys.argv[1:] and not _COMPILING.intersection(sys.argv[1:])


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


def _cuda_version(with_cuda):
    """The CUDA version the kernels are built for: torch's (the toolkit must match its major)."""
    return torch.version.cuda if with_cuda else None


def _version(with_cuda):
    if BUILDING_SDIST:
        return BASE_VERSION
    label = os.environ.get("ROBUSTOPS_LOCAL_VERSION")
    if label is None:
        label = _V["local_label"](_cuda_version(with_cuda))
    return BASE_VERSION + ("+" + label if label else "")


def _torch_requirement():
    return "torch>=2.4" if BUILDING_SDIST else _V["torch_requirement"](torch.__version__)


def _c_string(value):
    return '"%s"' % str(value).replace("\\", "\\\\").replace('"', '\\"')


def get_extension(with_cuda, version):
    debug = _flag("DEBUG")
    openmp = _torch_uses_openmp() and sys.platform.startswith("linux")

    sources = [os.path.join(CSRC, "robustops.cpp")]
    sources += sorted(glob.glob(os.path.join(CSRC, "ops", "*.cpp")))
    sources += sorted(glob.glob(os.path.join(CSRC, "ops", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join(CSRC, "ops", "cuda", "*.cu")))

    # What build_info() reports; the same facts go to robustops/_build_meta.py (see build_ext).
    define_macros = [
        ("ROBUSTOPS_COMPILER", _c_string(_compiler_name())),
        ("ROBUSTOPS_VERSION", _c_string(version)),
        ("ROBUSTOPS_TORCH_VERSION", _c_string(torch.__version__)),
    ]
    if with_cuda:
        define_macros.append(("ROBUSTOPS_TORCH_CUDA_VERSION", _c_string(_cuda_version(True))))
    # The C++ standard is left to torch.utils.cpp_extension (C++17 or C++20 by torch version).
    cxx = ["-fvisibility=hidden"]
    nvcc = ["--expt-relaxed-constexpr"]
    link = []
    if debug:
        cxx += ["-O0", "-g3", "-UNDEBUG"]
        nvcc += ["-O0", "-g", "-G"]
        if _flag("ROBUSTOPS_ASAN"):
            cxx += ["-fsanitize=address", "-fno-omit-frame-pointer"]
            link += ["-fsanitize=address"]
    else:
        # Python's own CFLAGS (sysconfig) carry -g, which torch's ninja build passes before ours:
        # -g0 after it drops the debug info (CPU core 23.5 MB -> 0.5 MB). The symbol table stays
        # (function names in perf profiles and backtraces; -s would save only another 80 KB).
        cxx += ["-O3", "-g0"]
        # Source paths as the sdist has them (csrc/ops/x.cpp in TORCH_CHECK messages) and torch's
        # headers as torch/include/..., not this machine's paths: the same sources and torch give
        # the same binary wherever they are unpacked (the last matching map wins: torch's, for a
        # venv inside the source tree).
        if not sys.platform.startswith("win"):
            torch_parent = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
            cxx += ["-ffile-prefix-map=%s=" % (HERE + os.sep), "-ffile-prefix-map=%s=" % (torch_parent + os.sep)]
        nvcc += ["-O3"]
        if _flag("ROBUSTOPS_LINEINFO"):
            nvcc += ["-lineinfo"]
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


class build_ext(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension, plus robustops/_build_meta.py beside the compiled core."""

    META = os.path.join("robustops", "_build_meta.py")

    def _meta_source(self):
        lines = [
            "# Generated by setup.py when robustops._C was compiled; not tracked in git, not in the sdist.",
            "# robustops/__init__.py checks it against the running torch before loading _C.",
            "version = %r" % VERSION,
            "torch_version = %r" % torch.__version__,
            "torch_cuda_version = %r" % _cuda_version(WITH_CUDA),
            "cxx11_abi = %r" % bool(torch._C._GLIBCXX_USE_CXX11_ABI),
            "debug = %r" % _flag("DEBUG"),
        ]
        return "\n".join(lines) + "\n"

    def run(self):
        super().run()
        text = self._meta_source()
        targets = [os.path.join(self.build_lib, self.META)]
        if self.inplace:  # --inplace and editable installs: the package directory in the source tree
            pkg_dir = self.get_finalized_command("build_py").get_package_dir("robustops")
            targets.append(os.path.join(pkg_dir, os.path.basename(self.META)))
        for path in targets:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)

    def get_outputs(self):
        return super().get_outputs() + [os.path.join(self.build_lib, self.META)]


WITH_CUDA = _want_cuda()
VERSION = _version(WITH_CUDA)

setup(
    version=VERSION,
    install_requires=[_torch_requirement()] + DEPENDENCIES,
    packages=find_packages(include=["robustops", "robustops.*"]),
    ext_modules=[get_extension(WITH_CUDA, VERSION)],
    cmdclass={"build_ext": build_ext},
)
