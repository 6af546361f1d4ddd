"""Public entry points of the compiled operators (``torch.ops.robustops.*`` with argument checks)."""
from ._ops import compact_conv2d, compact_linear, fgsm_step, kernel_dropout_eval

__all__ = ["fgsm_step", "compact_conv2d", "compact_linear", "kernel_dropout_eval"]
