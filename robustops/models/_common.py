"""Small helpers shared by the model builders: argument checks and spatial-size arithmetic.

The builders compute their flatten size by arithmetic rather than by a dry forward pass, so that
building a model never runs an injected layer (a compiled compact-convolution op, say) and works
on the ``meta`` device. The price is a contract: an injected convolution class must produce the
same output shape as ``nn.Conv2d`` with the same constructor arguments.
"""
from __future__ import annotations

from typing import Callable, Tuple, Union

import torch.nn as nn

SizeLike = Union[int, Tuple[int, int]]
#: what a builder's ``head`` argument accepts: None, a module, or ``factory(in_features, num_classes)``
HeadLike = Union[None, nn.Module, Callable[[int, int], nn.Module]]

__all__ = ["SizeLike", "HeadLike"]


def check_positive_int(value, name: str) -> int:
    # bool is an int subclass; ``num_classes=True`` is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def as_hw(input_size: SizeLike, name: str = "input_size") -> Tuple[int, int]:
    """``28`` or ``(28, 28)`` -> ``(28, 28)``, checking both are positive ints."""
    if isinstance(input_size, (tuple, list)):
        if len(input_size) != 2:
            raise ValueError(f"{name} must be an int or an (height, width) pair, got {input_size!r}")
        h, w = input_size
        return check_positive_int(h, f"{name}[0]"), check_positive_int(w, f"{name}[1]")
    n = check_positive_int(input_size, name)
    return n, n


def check_layer_factory(factory, name: str) -> Callable[..., nn.Module]:
    """A layer argument must be a class or callable returning a module, not a module instance.

    An instance would be shared between every position it is used in (one set of weights for
    conv1..conv4), which is never what the caller meant.
    """
    if isinstance(factory, nn.Module):
        raise TypeError(
            f"{name} must be a module class or factory (e.g. nn.Conv2d), not an instance "
            f"({type(factory).__name__}); it is called once per layer"
        )
    if not callable(factory):
        raise TypeError(f"{name} must be callable (a module class or factory), got {factory!r}")
    return factory


def make_head(head, linear_layer, in_features: int, num_classes: int) -> nn.Module:
    """Build the final classifier layer.

    ``head`` may be ``None`` (use ``linear_layer``), a module instance (used as given), or a
    factory called as ``head(in_features, num_classes)`` (e.g. an L2-softmax head class).
    """
    if head is None:
        return linear_layer(in_features, num_classes)
    if isinstance(head, nn.Module):
        return head
    if callable(head):
        module = head(in_features, num_classes)
        if not isinstance(module, nn.Module):
            raise TypeError(f"head(in_features, num_classes) must return an nn.Module, got {type(module).__name__}")
        return module
    raise TypeError(f"head must be None, an nn.Module or a callable, got {head!r}")


def conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output length of a convolution / pooling along one axis (dilation 1, floor mode)."""
    return (size + 2 * padding - kernel) // stride + 1


class SpatialTracker:
    """Follows (height, width) through a stack of layers and fails early with a clear message.

    Without this, a too-small input only shows up at the first forward pass as an opaque
    "Output size is too small" from deep inside ``F.conv2d``.
    """

    def __init__(self, input_size: SizeLike, model_name: str, name: str = "input_size"):
        self.hw = as_hw(input_size, name)
        self.input_hw = self.hw
        self.model_name = model_name
        self.name = name

    def apply(self, layer_name: str, kernel: int, stride: int = 1, padding: int = 0) -> Tuple[int, int]:
        h, w = (conv_out(s, kernel, stride, padding) for s in self.hw)
        if h < 1 or w < 1:
            raise ValueError(
                f"{self.model_name}: {self.name}={self.input_hw} is too small; the spatial size "
                f"reaching {layer_name} is {self.hw}, which leaves nothing after it "
                f"(kernel {kernel}, stride {stride}, padding {padding})"
            )
        self.hw = (h, w)
        return self.hw

    @property
    def numel(self) -> int:
        return self.hw[0] * self.hw[1]
