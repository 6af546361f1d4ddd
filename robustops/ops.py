"""Public entry points of the compiled operators (``torch.ops.robustops.*`` with argument checks)."""
from ._ops import fgsm_step, kernel_dropout_eval

__all__ = ["fgsm_step", "kernel_dropout_eval"]
