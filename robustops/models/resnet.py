"""ResNet-18/50/101 (He et al. 2016) with MNIST, CIFAR and ImageNet stems, written here because
torchvision is not a dependency. These are the networks of Pravin et al. 2021
(papers/fragile-neurons-pravin2021.txt), whose analysis ablates the kernels of the first
convolution: it is always ``model.conv1`` (a plain ``nn.Conv2d``), followed by ``model.bn1`` and
``model.relu``.

With ``stem="imagenet"``, ``num_classes=1000`` and ``width=1`` the parameter counts equal
torchvision's (11,689,512 / 25,557,032 / 44,549,160). Bottleneck blocks put the stride on the
3x3 convolution ("ResNet v1.5"), as torchvision does.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Type, Union

import torch
import torch.nn as nn

from ._common import check_layer_factory, check_positive_int

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet50", "resnet101", "STEMS"]

STEMS = ("cifar", "mnist", "imagenet")
NormFactory = Callable[[int], nn.Module]


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    # Every conv here is followed by batch norm, whose shift makes a conv bias redundant.
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut. ResNet-18/34."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 norm_layer: NormFactory = nn.BatchNorm2d):
        super().__init__()
        self.conv1 = _conv3x3(in_ch, planes, stride)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        # Separate, non-inplace ReLUs: a shared or in-place module confuses per-module hooks
        # (Grad-CAM, LRP) and breaks full backward hooks.
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand (x4), with a shortcut. ResNet-50/101/152."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 norm_layer: NormFactory = nn.BatchNorm2d):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = _conv1x1(in_ch, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv3 = _conv1x1(planes, out_ch)
        self.bn3 = norm_layer(out_ch)
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.relu3 = nn.ReLU()
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


Block = Union[Type[BasicBlock], Type[Bottleneck]]


class ResNet(nn.Module):
    """A ResNet: stem, four stages of residual blocks, global average pool, linear classifier.

    Attributes (in forward order)::

        conv1    nn.Conv2d: 3x3 stride 1 ("cifar", "mnist") or 7x7 stride 2 ("imagenet")
        bn1      norm_layer(conv1.out_channels)
        relu     nn.ReLU
        maxpool  3x3 stride-2 max-pool ("imagenet") or nn.Identity
        layer1 .. layer4   nn.Sequential of blocks, widths w, 2w, 4w, 8w (w = round(64 * width));
                 layer2..4 halve the spatial size
        avgpool  nn.AdaptiveAvgPool2d(1)
        fc       nn.Linear(8w * block.expansion, num_classes)

    ``features(x)`` returns the pooled, flattened penultimate activations.
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        in_channels: int = 3,
        num_classes: int = 10,
        stem: str = "cifar",
        width: float = 1.0,
        norm_layer: NormFactory = nn.BatchNorm2d,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        check_positive_int(in_channels, "in_channels")
        check_positive_int(num_classes, "num_classes")
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
            raise ValueError(f"width must be a positive number (multiplier of 64 channels), got {width!r}")
        if len(layers) != 4:
            raise ValueError(f"layers must give the block count of 4 stages, got {layers!r}")
        norm_layer = check_layer_factory(norm_layer, "norm_layer")

        base = max(1, int(round(64 * width)))
        self.stem = stem
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.width = width
        self._norm_layer = norm_layer

        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, base, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            # Small images (28x28, 32x32): a 7x7/2 conv plus max-pool would throw away 3/4 of
            # the resolution before the first block, so keep full resolution.
            self.conv1 = nn.Conv2d(in_channels, base, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = norm_layer(base)
        self.relu = nn.ReLU()

        self._in_ch = base
        self.layer1 = self._make_stage(block, base, layers[0], stride=1)
        self.layer2 = self._make_stage(block, base * 2, layers[1], stride=2)
        self.layer3 = self._make_stage(block, base * 4, layers[2], stride=2)
        self.layer4 = self._make_stage(block, base * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(base * 8 * block.expansion, num_classes)
        del self._in_ch

        self._init_weights(zero_init_residual)

    def _make_stage(self, block: Block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        check_positive_int(blocks, "layers[i]")
        out_ch = planes * block.expansion
        downsample = None
        if stride != 1 or self._in_ch != out_ch:
            # Projection shortcut (option B of He et al.) when the shape changes.
            downsample = nn.Sequential(_conv1x1(self._in_ch, out_ch, stride), self._norm_layer(out_ch))
        stage: List[nn.Module] = [block(self._in_ch, planes, stride, downsample, self._norm_layer)]
        self._in_ch = out_ch
        stage += [block(out_ch, planes, 1, None, self._norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each block then starts as the identity, which helps deep nets early in training.
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations, shape ``(N, fc.in_features)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _resnet(block: Block, layers: Sequence[int], in_channels: Optional[int], num_classes: int, stem: str,
            width: float, **kwargs) -> ResNet:
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
    if in_channels is None:
        in_channels = 1 if stem == "mnist" else 3
    return ResNet(block, layers, in_channels, num_classes, stem, width, **kwargs)


_DOC = """ResNet-{depth} ({block}).

    Args:
        in_channels: input channels; None (default) means 1 for ``stem="mnist"`` and 3 otherwise.
        num_classes: number of logits.
        stem: "cifar" (3x3 stride-1 conv1, no max-pool; 32x32 inputs), "mnist" (the same stem,
            for 1-channel 28x28 inputs) or "imagenet" (7x7 stride-2 conv1 + 3x3 stride-2 max-pool).
        width: channel multiplier of the base width 64 (0.25 gives a 16-32-64-128 network for
            quick CPU experiments).
        norm_layer: normalisation factory, called with a channel count (default BatchNorm2d).
        zero_init_residual: start every residual branch's last BN at zero.

    The first convolution is ``model.conv1`` (nn.Conv2d), then ``model.bn1`` and ``model.relu``.
    """


def resnet18(in_channels: Optional[int] = None, num_classes: int = 10, stem: str = "cifar", *,
             width: float = 1.0, norm_layer: NormFactory = nn.BatchNorm2d,
             zero_init_residual: bool = False) -> ResNet:
    return _resnet(BasicBlock, (2, 2, 2, 2), in_channels, num_classes, stem, width,
                   norm_layer=norm_layer, zero_init_residual=zero_init_residual)


def resnet50(in_channels: Optional[int] = None, num_classes: int = 10, stem: str = "cifar", *,
             width: float = 1.0, norm_layer: NormFactory = nn.BatchNorm2d,
             zero_init_residual: bool = False) -> ResNet:
    return _resnet(Bottleneck, (3, 4, 6, 3), in_channels, num_classes, stem, width,
                   norm_layer=norm_layer, zero_init_residual=zero_init_residual)


def resnet101(in_channels: Optional[int] = None, num_classes: int = 10, stem: str = "cifar", *,
              width: float = 1.0, norm_layer: NormFactory = nn.BatchNorm2d,
              zero_init_residual: bool = False) -> ResNet:
    return _resnet(Bottleneck, (3, 4, 23, 3), in_channels, num_classes, stem, width,
                   norm_layer=norm_layer, zero_init_residual=zero_init_residual)


resnet18.__doc__ = _DOC.format(depth=18, block="BasicBlock, [2, 2, 2, 2]")
resnet50.__doc__ = _DOC.format(depth=50, block="Bottleneck, [3, 4, 6, 3]")
resnet101.__doc__ = _DOC.format(depth=101, block="Bottleneck, [3, 4, 23, 3]")
