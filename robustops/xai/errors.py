"""Named errors of :mod:`robustops.xai` (all subclass ``ValueError`` / ``ImportError``)."""
from __future__ import annotations

__all__ = ["UnsupportedLayerError", "SharedModuleError", "LayerNotFoundError", "MissingExtraError"]


class UnsupportedLayerError(ValueError):
    """A layer the composite has no LRP rule for ran in the forward pass."""


class SharedModuleError(ValueError):
    """A module ran more than once in one forward pass and its rule does not allow reuse."""


class LayerNotFoundError(ValueError):
    """A layer given by name (or as a module) is not part of the model."""


class MissingExtraError(ImportError):
    """An optional dependency (the ``robustops[xai]`` extra) is not installed."""
