"""A tiny CNN for 8x8 digits (``sklearn.datasets.load_digits``): the fast model of the tests and
the demo. About 40k parameters; a few epochs on CPU take seconds.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch.nn as nn

from ._common import SizeLike, SpatialTracker, check_layer_factory, check_positive_int

__all__ = ["SmallCNN", "small_cnn"]


class SmallCNN(nn.Sequential):
    """Children, in order::

        conv1 act1           16 filters 3x3, padding 1
        conv2 act2 pool1     32 filters 3x3, padding 1, 2x2 max-pool
        flatten
        fc1 act3             64 units
        fc2                  num_classes logits

    ``conv1`` is a plain first convolution, so the fragile-kernel tools can ablate its 16 kernels.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: SizeLike = 8,
        *,
        conv_layer: Callable[..., nn.Module] = nn.Conv2d,
        linear_layer: Callable[..., nn.Module] = nn.Linear,
        activation: Callable[[], nn.Module] = nn.ReLU,
        channels: tuple = (16, 32),
        hidden_features: int = 64,
    ):
        check_positive_int(in_channels, "in_channels")
        check_positive_int(num_classes, "num_classes")
        check_positive_int(hidden_features, "hidden_features")
        if len(channels) != 2:
            raise ValueError(f"channels must be a pair (conv1, conv2), got {channels!r}")
        c1 = check_positive_int(channels[0], "channels[0]")
        c2 = check_positive_int(channels[1], "channels[1]")
        conv_layer = check_layer_factory(conv_layer, "conv_layer")
        linear_layer = check_layer_factory(linear_layer, "linear_layer")
        activation = check_layer_factory(activation, "activation")

        size = SpatialTracker(input_size, "small_cnn")
        layers = OrderedDict()
        layers["conv1"] = conv_layer(in_channels, c1, kernel_size=3, padding=1)
        size.apply("conv1", 3, 1, 1)
        layers["act1"] = activation()
        layers["conv2"] = conv_layer(c1, c2, kernel_size=3, padding=1)
        size.apply("conv2", 3, 1, 1)
        layers["act2"] = activation()
        layers["pool1"] = nn.MaxPool2d(2)
        size.apply("pool1", 2, 2)
        layers["flatten"] = nn.Flatten(1)
        flat = c2 * size.numel
        layers["fc1"] = linear_layer(flat, hidden_features)
        layers["act3"] = activation()
        layers["fc2"] = linear_layer(hidden_features, num_classes)
        super().__init__(layers)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.input_size = size.input_hw
        self.flatten_features = flat


def small_cnn(
    in_channels: int = 1,
    num_classes: int = 10,
    input_size: SizeLike = 8,
    *,
    conv_layer: Callable[..., nn.Module] = nn.Conv2d,
    linear_layer: Callable[..., nn.Module] = nn.Linear,
    activation: Callable[[], nn.Module] = nn.ReLU,
    channels: tuple = (16, 32),
    hidden_features: int = 64,
) -> SmallCNN:
    """A two-conv, two-FC network for small images (8x8 digits by default; ``input_size`` >= 2).

    Trains to > 90% test accuracy on ``load_digits`` (pixels / 16, shape ``(N, 1, 8, 8)``) in a
    few epochs, e.g. ``train(model, (x, y), epochs=5, optimizer="adam", lr=3e-3, batch_size=32, seed=0)``
    (about a second on one CPU core).
    """
    return SmallCNN(
        in_channels,
        num_classes,
        input_size,
        conv_layer=conv_layer,
        linear_layer=linear_layer,
        activation=activation,
        channels=channels,
        hidden_features=hidden_features,
    )
