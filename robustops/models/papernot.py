"""The MNIST network of Papernot et al. (distillation defence), as listed in Table 10 of
Ranjan et al. 2017, "Improving network robustness against adversarial attacks with compact
convolution" (papers/compact-convolution-ranjan2017.txt).

The model is a flat ``nn.Sequential`` with stable child names, so a variant can swap one layer by
name (``model.conv1 = CompactConv2d(...)``; the layer-wise study of that paper's Table 13 replaces
exactly one of conv1..conv4 / fc1..fc3) and a feature extractor is a slice (``model[:-1]``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch.nn as nn

from ._common import HeadLike, SizeLike, SpatialTracker, check_layer_factory, check_positive_int, make_head

__all__ = ["PapernotMNIST", "papernot_mnist"]


class PapernotMNIST(nn.Sequential):
    """Four unpadded 3x3 convolutions, two max-pools and three fully-connected layers.

    Children, in order (``model.<name>`` or ``model[i]``)::

        conv1  act1  conv2  act2  pool1      32, 32 filters, 3x3, no padding
        conv3  act3  conv4  act4  pool2      64, 64 filters, 3x3, no padding
        flatten
        fc1    act5  fc2    act6             200, 200 units
        fc3                                  num_classes logits (no softmax)

    For a 28x28 input the spatial size goes 28 -> 26 -> 24 -> 12 -> 10 -> 8 -> 4, so ``fc1``
    sees 64 * 4 * 4 = 1024 features. ``conv1``..``conv4`` are built by ``conv_layer``,
    ``fc1``/``fc2`` by ``linear_layer``, ``fc3`` by ``head`` (or ``linear_layer`` when ``head`` is
    None), every ``act*`` by ``activation()``. ``flatten_features`` holds fc1's input size.
    """

    conv_channels = (32, 32, 64, 64)
    hidden_features = (200, 200)

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: SizeLike = 28,
        *,
        conv_layer: Callable[..., nn.Module] = nn.Conv2d,
        linear_layer: Callable[..., nn.Module] = nn.Linear,
        activation: Callable[[], nn.Module] = nn.ReLU,
        head: HeadLike = None,
    ):
        check_positive_int(in_channels, "in_channels")
        check_positive_int(num_classes, "num_classes")
        conv_layer = check_layer_factory(conv_layer, "conv_layer")
        linear_layer = check_layer_factory(linear_layer, "linear_layer")
        activation = check_layer_factory(activation, "activation")

        size = SpatialTracker(input_size, "papernot_mnist")
        c1, c2, c3, c4 = self.conv_channels
        h1, h2 = self.hidden_features
        layers = OrderedDict()
        # Unpadded convolutions as in Papernot's network: each shrinks the map by 2.
        layers["conv1"] = conv_layer(in_channels, c1, kernel_size=3, padding=0)
        size.apply("conv1", 3)
        layers["act1"] = activation()
        layers["conv2"] = conv_layer(c1, c2, kernel_size=3, padding=0)
        size.apply("conv2", 3)
        layers["act2"] = activation()
        layers["pool1"] = nn.MaxPool2d(2)
        size.apply("pool1", 2, 2)
        layers["conv3"] = conv_layer(c2, c3, kernel_size=3, padding=0)
        size.apply("conv3", 3)
        layers["act3"] = activation()
        layers["conv4"] = conv_layer(c3, c4, kernel_size=3, padding=0)
        size.apply("conv4", 3)
        layers["act4"] = activation()
        layers["pool2"] = nn.MaxPool2d(2)
        size.apply("pool2", 2, 2)
        layers["flatten"] = nn.Flatten(1)
        flat = c4 * size.numel
        layers["fc1"] = linear_layer(flat, h1)
        layers["act5"] = activation()
        layers["fc2"] = linear_layer(h1, h2)
        layers["act6"] = activation()
        layers["fc3"] = make_head(head, linear_layer, h2, num_classes)
        super().__init__(layers)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.input_size = size.input_hw
        self.flatten_features = flat


def papernot_mnist(
    in_channels: int = 1,
    num_classes: int = 10,
    input_size: SizeLike = 28,
    *,
    conv_layer: Callable[..., nn.Module] = nn.Conv2d,
    linear_layer: Callable[..., nn.Module] = nn.Linear,
    activation: Callable[[], nn.Module] = nn.ReLU,
    head: HeadLike = None,
) -> PapernotMNIST:
    """Papernot et al.'s MNIST classifier (Ranjan et al. 2017, Table 10, MNIST column).

    Args:
        in_channels: channels of the input image (1 for MNIST / Fashion-MNIST).
        num_classes: number of output logits.
        input_size: input height/width (int or ``(h, w)``); the flatten size is computed from it.
            At least 16: smaller inputs raise ``ValueError``. 8x8 digits must be upsampled first.
        conv_layer: class or factory called as ``conv_layer(in_ch, out_ch, kernel_size=3,
            padding=0)``; must keep ``nn.Conv2d``'s output shape (e.g. a ``CompactConv2d``).
        linear_layer: called as ``linear_layer(in_features, out_features)`` for fc1, fc2 (and
            fc3 when ``head`` is None).
        activation: zero-argument factory for each activation (``nn.ReLU``; a bounded ReLU such
            as ``lambda: nn.Hardtanh(0, 1)``). Built not in-place, so backward hooks (LRP,
            Grad-CAM) see intact tensors.
        head: replaces fc3: None, a module instance, or a factory ``head(200, num_classes)``
            (e.g. an L2-softmax head). The layer keeps the name ``fc3`` either way.

    Returns:
        a :class:`PapernotMNIST` producing logits of shape ``(N, num_classes)``.
        With the defaults it has 312,202 parameters.
    """
    return PapernotMNIST(
        in_channels,
        num_classes,
        input_size,
        conv_layer=conv_layer,
        linear_layer=linear_layer,
        activation=activation,
        head=head,
    )
