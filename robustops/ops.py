"""Public entry points of the compiled operators (``torch.ops.robustops.*`` with argument checks)."""
from ._ops import compact_conv2d, compact_linear, fgsm_step, kernel_dropout_eval

__all__ = ["fgsm_step", "compact_conv2d", "compact_linear", "kernel_dropout_eval"]

# AutoAttack ops (issue #15)
from ._ops import apgd_step, apgd_step_reference, fab_projection, fab_projection_reference  # noqa: E402

__all__ += ["apgd_step", "fab_projection", "apgd_step_reference", "fab_projection_reference"]

# the random forest of robustops.detect (issue #10)
from ._ops import forest_leaf_masks, forest_leaf_masks_reference  # noqa: E402

__all__ += ["forest_leaf_masks", "forest_leaf_masks_reference"]
