"""VGG11 for CIFAR-10 as listed in Table 10 of Ranjan et al. 2017 (CIFAR10 column).

Table 10 lists conv64, conv128, pool, conv256 x2, pool, conv512 x2, pool, conv512 x2, pool and
then FC512, FC512, logits: four pools, so a 32x32 image reaches the classifier as 512 x 2 x 2.
Simonyan & Zisserman's configuration "A" has one more pool, right after the first conv;
``pool_after_conv1=True`` builds that layout (512 x 1 x 1 at the classifier for 32x32).

Pre-processing (Ranjan et al. 2017, Sec. 5: "We use mean subtraction of 0.5 as a pre-processing
step"): the model starts with a :class:`~robustops.models.Normalize` layer (``normalize``,
per-channel ``x - mean``, default 0.5 for every channel), so it takes pixels in [0, 1] as
attacks expect. ``mean=None`` removes it; ``mean=CIFAR10_MEAN, std=CIFAR10_STD`` gives the usual
dataset statistics instead.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence, Union

import torch.nn as nn

from ._common import HeadLike, SizeLike, SpatialTracker, check_layer_factory, check_positive_int, make_head
from .normalize import Normalize

Stat = Union[None, float, Sequence[float]]

__all__ = ["VGG11", "vgg11"]

# Output channels of conv1..conv8 and the conv index after which a 2x2 max-pool follows.
_CONV_CHANNELS = (64, 128, 256, 256, 512, 512, 512, 512)
_POOL_AFTER = (2, 4, 6, 8)


class VGG11(nn.Sequential):
    """VGG11 with 3x3 padding-1 convolutions and a 512-512-num_classes classifier.

    Children, in order (``normalize`` unless ``mean=None``; ``bn*`` only with
    ``batch_norm=True``; ``drop*`` only with ``dropout > 0``; ``pool0`` only with
    ``pool_after_conv1=True``)::

        [normalize] conv1 [bn1] act1 [pool0] conv2 [bn2] act2 pool1
        conv3 [bn3] act3 conv4 [bn4] act4 pool2
        conv5 [bn5] act5 conv6 [bn6] act6 pool3
        conv7 [bn7] act7 conv8 [bn8] act8 pool4
        flatten fc1 act9 [drop1] fc2 act10 [drop2] fc3

    ``fc3`` produces logits (no softmax). ``flatten_features`` holds fc1's input size.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        input_size: SizeLike = 32,
        batch_norm: bool = False,
        *,
        conv_layer: Callable[..., nn.Module] = nn.Conv2d,
        linear_layer: Callable[..., nn.Module] = nn.Linear,
        activation: Callable[[], nn.Module] = nn.ReLU,
        head: HeadLike = None,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        hidden_features: int = 512,
        dropout: float = 0.0,
        pool_after_conv1: bool = False,
        mean: Stat = 0.5,
        std: Stat = None,
    ):
        check_positive_int(in_channels, "in_channels")
        check_positive_int(num_classes, "num_classes")
        check_positive_int(hidden_features, "hidden_features")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        conv_layer = check_layer_factory(conv_layer, "conv_layer")
        linear_layer = check_layer_factory(linear_layer, "linear_layer")
        activation = check_layer_factory(activation, "activation")
        if batch_norm:
            norm_layer = check_layer_factory(norm_layer, "norm_layer")

        size = SpatialTracker(input_size, "vgg11")
        layers = OrderedDict()
        if mean is not None:
            layers["normalize"] = Normalize(mean, std, channels=in_channels)
        elif std is not None:
            raise ValueError("std without mean: pass mean=0.0 to only divide by std")
        prev = in_channels
        for i, out in enumerate(_CONV_CHANNELS, start=1):
            # A conv followed by batch norm does not need its own bias (BN's shift replaces it).
            layers[f"conv{i}"] = conv_layer(prev, out, kernel_size=3, padding=1, bias=not batch_norm)
            size.apply(f"conv{i}", 3, 1, 1)
            if batch_norm:
                layers[f"bn{i}"] = norm_layer(out)
            layers[f"act{i}"] = activation()
            if i == 1 and pool_after_conv1:
                layers["pool0"] = nn.MaxPool2d(2)
                size.apply("pool0", 2, 2)
            if i in _POOL_AFTER:
                k = _POOL_AFTER.index(i) + 1
                layers[f"pool{k}"] = nn.MaxPool2d(2)
                size.apply(f"pool{k}", 2, 2)
            prev = out
        layers["flatten"] = nn.Flatten(1)
        flat = prev * size.numel
        n_convs = len(_CONV_CHANNELS)
        layers["fc1"] = linear_layer(flat, hidden_features)
        layers[f"act{n_convs + 1}"] = activation()
        if dropout > 0:
            layers["drop1"] = nn.Dropout(dropout)
        layers["fc2"] = linear_layer(hidden_features, hidden_features)
        layers[f"act{n_convs + 2}"] = activation()
        if dropout > 0:
            layers["drop2"] = nn.Dropout(dropout)
        layers["fc3"] = make_head(head, linear_layer, hidden_features, num_classes)
        super().__init__(layers)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.input_size = size.input_hw
        self.flatten_features = flat


def vgg11(
    in_channels: int = 3,
    num_classes: int = 10,
    input_size: SizeLike = 32,
    batch_norm: bool = False,
    *,
    conv_layer: Callable[..., nn.Module] = nn.Conv2d,
    linear_layer: Callable[..., nn.Module] = nn.Linear,
    activation: Callable[[], nn.Module] = nn.ReLU,
    head: HeadLike = None,
    norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    hidden_features: int = 512,
    dropout: float = 0.0,
    pool_after_conv1: bool = False,
    mean: Stat = 0.5,
    std: Stat = None,
) -> VGG11:
    """VGG11 (Ranjan et al. 2017, Table 10, CIFAR10 column).

    Args:
        in_channels, num_classes: input channels and number of logits.
        input_size: int or ``(h, w)``; at least 16 (32 with ``pool_after_conv1``), otherwise
            ``ValueError``. The flatten size is computed from it.
        batch_norm: insert ``norm_layer(channels)`` after every convolution (convs then have no
            bias).
        conv_layer: called as ``conv_layer(in_ch, out_ch, kernel_size=3, padding=1, bias=...)``;
            must keep ``nn.Conv2d``'s output shape.
        linear_layer: called as ``linear_layer(in_features, out_features)`` for fc1, fc2 (and fc3
            when ``head`` is None).
        activation: zero-argument factory, called once per activation.
        head: replaces fc3: None, a module, or a factory ``head(hidden_features, num_classes)``.
        norm_layer: batch-norm class used when ``batch_norm`` is True.
        hidden_features: width of fc1/fc2 (512 in the paper).
        dropout: dropout after fc1 and fc2 (0 = none, as in the paper's table).
        pool_after_conv1: add Simonyan's first max-pool (see the module docstring).
        mean, std: the in-model pre-processing ``(x - mean) / std`` per channel (a number or one
            per channel). Default: the paper's mean subtraction of 0.5, std 1. ``mean=None``: no
            pre-processing layer.
    """
    return VGG11(
        in_channels,
        num_classes,
        input_size,
        batch_norm,
        conv_layer=conv_layer,
        linear_layer=linear_layer,
        activation=activation,
        head=head,
        norm_layer=norm_layer,
        hidden_features=hidden_features,
        dropout=dropout,
        pool_after_conv1=pool_after_conv1,
        mean=mean,
        std=std,
    )
