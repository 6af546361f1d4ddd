"""LeNet-5-style network (LeCun et al. 1998), the substitute model of Papernot et al.'s
black-box attack as used by Ranjan et al. 2017 (Section 5.2).

Modernised in the usual way: ReLU instead of scaled tanh, max-pooling instead of trainable
sub-sampling, a fully-connected C5, and ``padding=2`` on conv1 so a 28x28 MNIST digit is treated
like the 32x32 canvas of the original (28 -> 28 -> 14 -> 10 -> 5, 16 * 5 * 5 = 400 features).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch.nn as nn

from ._common import SizeLike, SpatialTracker, check_layer_factory, check_positive_int

__all__ = ["LeNet5", "lenet"]


class LeNet5(nn.Sequential):
    """Children, in order::

        conv1 act1 pool1     6 filters 5x5, padding 2, 2x2 max-pool
        conv2 act2 pool2     16 filters 5x5, no padding, 2x2 max-pool
        flatten
        fc1 act3 fc2 act4    120, 84 units
        fc3                  num_classes logits
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: SizeLike = 28,
        *,
        conv_layer: Callable[..., nn.Module] = nn.Conv2d,
        linear_layer: Callable[..., nn.Module] = nn.Linear,
        activation: Callable[[], nn.Module] = nn.ReLU,
    ):
        check_positive_int(in_channels, "in_channels")
        check_positive_int(num_classes, "num_classes")
        conv_layer = check_layer_factory(conv_layer, "conv_layer")
        linear_layer = check_layer_factory(linear_layer, "linear_layer")
        activation = check_layer_factory(activation, "activation")

        size = SpatialTracker(input_size, "lenet")
        layers = OrderedDict()
        layers["conv1"] = conv_layer(in_channels, 6, kernel_size=5, padding=2)
        size.apply("conv1", 5, 1, 2)
        layers["act1"] = activation()
        layers["pool1"] = nn.MaxPool2d(2)
        size.apply("pool1", 2, 2)
        layers["conv2"] = conv_layer(6, 16, kernel_size=5, padding=0)
        size.apply("conv2", 5)
        layers["act2"] = activation()
        layers["pool2"] = nn.MaxPool2d(2)
        size.apply("pool2", 2, 2)
        layers["flatten"] = nn.Flatten(1)
        flat = 16 * size.numel
        layers["fc1"] = linear_layer(flat, 120)
        layers["act3"] = activation()
        layers["fc2"] = linear_layer(120, 84)
        layers["act4"] = activation()
        layers["fc3"] = linear_layer(84, num_classes)
        super().__init__(layers)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.input_size = size.input_hw
        self.flatten_features = flat


def lenet(
    in_channels: int = 1,
    num_classes: int = 10,
    input_size: SizeLike = 28,
    *,
    conv_layer: Callable[..., nn.Module] = nn.Conv2d,
    linear_layer: Callable[..., nn.Module] = nn.Linear,
    activation: Callable[[], nn.Module] = nn.ReLU,
) -> LeNet5:
    """LeNet-5-style classifier (see :class:`LeNet5` for the layer names).

    ``input_size`` (int or ``(h, w)``) must be at least 12; the flatten size is computed from it,
    so 32x32 CIFAR images (``in_channels=3, input_size=32``) work as well as 28x28 digits.
    The layer arguments behave as in :func:`papernot_mnist`.
    """
    return LeNet5(
        in_channels,
        num_classes,
        input_size,
        conv_layer=conv_layer,
        linear_layer=linear_layer,
        activation=activation,
    )
