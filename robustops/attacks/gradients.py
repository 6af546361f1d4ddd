"""Input gradients for the attacks: the shared helper of :mod:`robustops._gradients`."""
from .._gradients import InferenceModeError, autograd_on, input_gradient, sanitize_gradient

__all__ = ["input_gradient", "autograd_on", "sanitize_gradient", "InferenceModeError"]
