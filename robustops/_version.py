"""robustops's version and the rule for which torch a compiled build can load into.

This file is the single source of the release version. ``setup.py`` reads it (with
``runpy.run_path``, without importing the package) and appends the build flavour as a local version
label, like torch's own wheels: ``0.1.0+cpu`` for a CPU-only build, ``0.1.0+cu130`` for a build
with CUDA 13.0 kernels. The built version is what the wheel's metadata says, what
``robustops.__version__`` and ``robustops.build_info()["version"]`` return, and what
``robustops info`` prints. An sdist carries the plain version (``0.1.0``); the wheel built from it
gets the label of the torch it is compiled against.

It must stay importable with the standard library only (no torch, no package-relative imports):
``setup.py`` runs it before torch's extension machinery, and ``robustops/__init__.py`` runs
:func:`torch_mismatch` before the compiled core is loaded.

ABI rule (why a build refuses a torch): the compiled core links against libtorch's C++ API, which
is not stable across torch minor releases, so a build loads only into a torch

* with the same major.minor version (any patch release: 2.13.0 and 2.13.1 are compatible); a
  pre-release or nightly on either side (``2.14.0.dev20260101``, ``2.14.0rc1``) needs the exact
  same public version;
* with CUDA of the same major version when the build has CUDA kernels (a CUDA build needs
  libc10_cuda / libtorch_cuda / libcudart of that major version; a CPU-only torch has none);
  a CPU-only build loads into a CUDA torch too (its ops then run on CPU tensors only);
* with the same C++ standard-library ABI (``_GLIBCXX_USE_CXX11_ABI``).
"""
from __future__ import annotations

import re
from typing import Optional

__version__ = "0.1.0"

#: Set to 1 to skip the torch check at import (then a mismatched build fails inside the loader).
SKIP_ENV = "ROBUSTOPS_SKIP_TORCH_CHECK"

_FINAL = re.compile(r"\d+(\.\d+)*(\.post\d+)?")


def local_label(cuda_version: Optional[str]) -> str:
    """The local version label of a build: ``cpu`` or ``cu<major><minor>`` (``"13.0"`` -> ``cu130``)."""
    if not cuda_version:
        return "cpu"
    major, minor = (cuda_version.split(".") + ["0"])[:2]
    return f"cu{int(major)}{int(minor)}"


def _public(version: str) -> str:
    return version.split("+", 1)[0]


def _major_minor(version: str) -> Optional[tuple]:
    m = re.match(r"(\d+)\.(\d+)", _public(version))
    return (int(m.group(1)), int(m.group(2))) if m else None


def _is_final(version: str) -> bool:
    return _FINAL.fullmatch(_public(version)) is not None


def torch_requirement(torch_version: str) -> str:
    """The ``Requires-Dist`` pin on torch that matches the ABI rule for a build against ``torch_version``."""
    if _is_final(torch_version) and _major_minor(torch_version) is not None:
        major, minor = _major_minor(torch_version)
        return f"torch=={major}.{minor}.*"
    return f"torch=={_public(torch_version)}"


def _flavour(cuda_version: Optional[str]) -> str:
    return f"CUDA {cuda_version}" if cuda_version else "CPU-only"


def torch_mismatch(
    built_torch: str,
    built_cuda: Optional[str],
    built_cxx11_abi: Optional[bool],
    torch_version: str,
    torch_cuda: Optional[str],
    cxx11_abi: Optional[bool],
) -> Optional[str]:
    """Why a build against ``built_torch`` (CUDA ``built_cuda``, None for a CPU-only build) cannot
    load into the running torch ``torch_version`` (``torch.version.cuda`` = ``torch_cuda``), or None
    when it can. ``*_cxx11_abi`` are the ``_GLIBCXX_USE_CXX11_ABI`` flags (None: unknown, not
    compared). See the module docstring for the rule."""
    if _is_final(built_torch) and _is_final(torch_version):
        mm_built, mm_run = _major_minor(built_torch), _major_minor(torch_version)
        if mm_built is None or mm_run is None or mm_built != mm_run:
            return "torch's C++ ABI changes between minor releases (major.minor must match)"
    elif _public(built_torch) != _public(torch_version):
        return "pre-release and nightly torch builds must match exactly"
    if built_cuda:
        if not torch_cuda:
            return "this build has CUDA kernels and needs a CUDA build of torch"
        if built_cuda.split(".")[0] != torch_cuda.split(".")[0]:
            return f"CUDA {built_cuda} and CUDA {torch_cuda} have different major versions (libcudart differs)"
    if built_cxx11_abi is not None and cxx11_abi is not None and bool(built_cxx11_abi) != bool(cxx11_abi):
        return "the two were compiled with different C++ ABIs (_GLIBCXX_USE_CXX11_ABI)"
    return None


def mismatch_message(version: str, built_torch: str, built_cuda: Optional[str], torch_version: str,
                     torch_cuda: Optional[str], reason: str) -> str:
    """The ImportError text for a build that cannot load into the running torch."""
    mm = _major_minor(torch_version)
    series = f"{mm[0]}.{mm[1]}" if mm else _public(torch_version)
    return (
        f"robustops {version} was compiled against torch {built_torch} ({_flavour(built_cuda)}), "
        f"but this Python runs torch {torch_version} ({_flavour(torch_cuda)}): {reason}. "
        f"Its compiled core (robustops._C) cannot load into this torch. "
        f"Fix: reinstall robustops built against your torch, e.g. "
        f"`pip install --force-reinstall --no-deps --no-build-isolation --no-binary robustops robustops` "
        f"(in a source checkout: `pip install --no-build-isolation .`), or a robustops wheel built for "
        f"torch {series} with the +{local_label(torch_cuda)} label; "
        f"or install the torch this build expects ({torch_requirement(built_torch)}, {_flavour(built_cuda)}). "
        f"Set {SKIP_ENV}=1 to try loading anyway."
    )
