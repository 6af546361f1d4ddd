"""Named errors of ``robustops.fragile`` (all subclasses of ``ValueError`` or ``TypeError``)."""
from __future__ import annotations

from .._checks import EmptyDataError

__all__ = ["FragileError", "LayerNotFoundError", "NotAConvLayerError", "EmptyDatasetError",
           "MemoryBudgetError", "NoiseLevelError", "EmptySplitError", "SplitIndexError"]


class FragileError(ValueError):
    """Base class of the value errors raised by ``robustops.fragile``."""


class LayerNotFoundError(FragileError):
    """The layer name (or module) is not part of the model."""


class NotAConvLayerError(TypeError):
    """The layer exists but is not an ``nn.Conv2d``."""


#: The data yielded no examples: the package-wide :class:`robustops._checks.EmptyDataError`
#: (a ``ValueError``), under the name ``fragile`` has always used.
EmptyDatasetError = EmptyDataError


class MemoryBudgetError(FragileError):
    """``memory_budget`` cannot hold the activations of even one ablated variant."""


class SplitIndexError(FragileError):
    """Kernel indices of a split are not valid: not integers, outside ``[0, C)``, repeated, or
    present in both S and S'."""


class NoiseLevelError(FragileError):
    """``eps_noise`` is not a finite number > 0."""


class EmptySplitError(FragileError):
    """The fragile set S or the null set S' is empty, so S-vs-S' comparisons are undefined."""
