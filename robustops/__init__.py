"""robustops: fast, compiled PyTorch ops for adversarial robustness.

Sub-packages: ``attacks``, ``fragile``, ``nn``, ``detect``, ``xai``, ``data``, ``models``.
Compiled operators live under ``torch.ops.robustops`` and have checked wrappers in ``robustops.ops``.
"""
from . import _ops, ops  # loads the compiled core and registers every op
from ._C import build_info as _build_info
from ._checks import SelectOutput

__version__ = "0.1.0"


def build_info() -> dict:
    """How the compiled core was built: torch version, CUDA on/off, OpenMP, compiler, debug."""
    return dict(_build_info())


__all__ = ["build_info", "ops", "SelectOutput", "__version__"]
