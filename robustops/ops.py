"""Public entry points of the compiled operators (``torch.ops.robustops.*`` with argument checks)."""
from ._ops import fgsm_step

__all__ = ["fgsm_step"]
