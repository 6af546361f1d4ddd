"""robustops: fast, compiled PyTorch ops for adversarial robustness.

Sub-packages: ``attacks``, ``fragile``, ``nn``, ``detect``, ``xai``, ``data``, ``models``.
Compiled operators live under ``torch.ops.robustops`` and have checked wrappers in ``robustops.ops``.
"""
import os as _os

import torch as _torch

from ._version import SKIP_ENV as _SKIP_ENV
from ._version import __version__ as _base_version
from ._version import mismatch_message as _mismatch_message
from ._version import torch_mismatch as _torch_mismatch

# What the compiled core was built against, written by setup.py at build time. Checked here,
# before _C is loaded, so a wheel built for another torch fails with an explanation instead of an
# "undefined symbol" error from the dynamic loader. Absent in a source tree that was not built.
try:
    from . import _build_meta
except ImportError:  # pragma: no cover - depends on how the tree was built
    _build_meta = None

if _build_meta is not None and _os.environ.get(_SKIP_ENV, "0") in ("", "0"):
    _reason = _torch_mismatch(
        _build_meta.torch_version,
        _build_meta.torch_cuda_version,
        getattr(_build_meta, "cxx11_abi", None),
        _torch.__version__,
        _torch.version.cuda,
        bool(_torch._C._GLIBCXX_USE_CXX11_ABI),
    )
    if _reason is not None:
        raise ImportError(
            _mismatch_message(
                _build_meta.version,
                _build_meta.torch_version,
                _build_meta.torch_cuda_version,
                _torch.__version__,
                _torch.version.cuda,
                _reason,
            )
        )

from . import _ops, ops  # noqa: E402  loads the compiled core and registers every op
from ._C import build_info as _build_info  # noqa: E402
from ._checks import SelectOutput  # noqa: E402

#: The built version, with its flavour label (``0.1.0+cpu``, ``0.1.0+cu130``); the same string as
#: the installed distribution's metadata and ``build_info()["version"]``.
__version__ = _build_meta.version if _build_meta is not None else _build_info().get("version", _base_version)
if __version__ == "unknown":  # a core compiled by an older setup.py, without the version macro
    __version__ = _base_version
if _build_meta is not None:
    _compiled = _build_info()
    _stale = [
        k for k, m in (("version", "version"), ("torch_version", "torch_version"), ("cuda_version", "torch_cuda_version"))
        if k in _compiled and _compiled[k] != getattr(_build_meta, m)
    ]
    if _stale:  # e.g. a _C*.so copied in from another build
        import warnings as _warnings

        _warnings.warn(
            f"robustops/_build_meta.py and the loaded robustops._C disagree on {', '.join(_stale)} "
            f"({ {k: _compiled[k] for k in _stale} }); rebuild robustops (pip install --no-build-isolation .)",
            RuntimeWarning,
            stacklevel=2,
        )


def build_info() -> dict:
    """How the compiled core was built, as compiled into it.

    Keys: ``version`` (robustops, with its flavour label), ``torch_version`` (``torch.__version__``
    it was compiled against), ``cuda`` (CUDA kernels compiled in), ``cuda_version`` (torch's CUDA
    version for a CUDA build, else None), ``cxx11_abi``, ``openmp``, ``compiler``, ``debug``.
    """
    return dict(_build_info())


__all__ = ["build_info", "ops", "SelectOutput", "__version__"]
