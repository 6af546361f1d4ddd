"""The six model variants of Ranjan et al. 2017 (Sec. 5) on the paper's two architectures (Table 10).

``dataset="mnist"`` (default): Papernot et al.'s MNIST net::

    conv3x3(32) act conv3x3(32) act maxpool2 conv3x3(64) act conv3x3(64) act maxpool2
    fc200 act fc200 act fc10                          (valid convolutions: 28 -> 4x4x64 = 1024)

``dataset="cifar10"``: VGG11 (:func:`robustops.models.vgg11`, 3x3 padding-1 convolutions
64-128-256-256-512-512-512-512 with four 2x2 max-pools, fc512 act fc512 act fc10; 32x32x3 inputs).

Variants (``build_variant(name)`` returns ``Variant(name, model, criterion)``):
  SM      softmax cross-entropy (baseline)
  LS      label smoothing: soft labels {1/90, 0.9} for 10 classes (smoothing 0.1)
  BReLU   bounded ReLU min(max(x, 0), 1) instead of ReLU
  L2SM    L2-softmax: the final fc layer sees alpha * x / ||x|| (fixed alpha)
  CCN     compact convolution in every conv and fc layer (the last fc is then an L2-softmax layer)
  CCN+LS  CCN trained with label smoothing
Every model starts with the paper's pre-processing, a mean subtraction of 0.5 ("We use mean
subtraction of 0.5 as a pre-processing step", Sec. 5), inside the model, so attacks work in
[0, 1] pixel space (MNIST: ``Shift``; CIFAR-10: VGG11's per-channel ``Normalize`` layer).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from ..models.papernot import papernot_mnist as _papernot_net
from ..models.vgg import vgg11 as _vgg11
from .activations import BoundedReLU
from .compact import CompactConv2d, CompactLinear
from .l2softmax import L2SoftmaxLinear
from .losses import LabelSmoothingCrossEntropy

__all__ = ["VARIANTS", "DATASETS", "Variant", "Shift", "papernot_mnist", "build_variant"]

VARIANTS = ("SM", "LS", "BReLU", "L2SM", "CCN", "CCN+LS")
#: dataset -> (architecture, in_channels, image_size)
DATASETS = {"mnist": ("papernot_mnist", 1, 28), "cifar10": ("vgg11", 3, 32)}


class Shift(nn.Module):
    """``x - mean`` (the paper's mean subtraction of 0.5)."""

    def __init__(self, mean: float = 0.5) -> None:
        super().__init__()
        self.mean = float(mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.mean

    def extra_repr(self) -> str:
        return f"mean={self.mean}"


def papernot_mnist(
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: int = 28,
    conv_layer: Callable[..., nn.Module] = nn.Conv2d,
    linear_layer: Callable[..., nn.Module] = nn.Linear,
    activation: Callable[[], nn.Module] = nn.ReLU,
    head: Callable[[int, int], nn.Module] | None = None,
    mean: float = 0.5,
) -> nn.Sequential:
    """Papernot et al.'s MNIST network (Table 10) behind the paper's mean subtraction.

    ``Sequential(Shift(mean), robustops.models.papernot_mnist(...))``: the architecture is the one
    of :func:`robustops.models.papernot_mnist` (layer factories passed through), preceded by
    ``x - mean`` so that attacks keep working in [0, 1] pixel space."""
    net = _papernot_net(
        in_channels=in_channels, num_classes=num_classes, input_size=image_size,
        conv_layer=conv_layer, linear_layer=linear_layer, activation=activation, head=head,
    )
    return nn.Sequential(Shift(mean), net)


class Variant(NamedTuple):
    name: str
    model: nn.Module
    criterion: nn.Module


def build_variant(
    name: str,
    *,
    dataset: str = "mnist",
    in_channels: int | None = None,
    num_classes: int = 10,
    image_size: int | None = None,
    smoothing: float = 0.1,
    l2_alpha: float = 10.0,
    ccn_alpha: float = 1.0,
    ccn_head_alpha: float = 10.0,
    delta: float = 0.01,
    brelu_max: float = 1.0,
) -> Variant:
    """Build one of :data:`VARIANTS` (case-insensitive). ``l2_alpha``: fixed alpha of the L2SM head;
    ``ccn_alpha`` / ``ccn_head_alpha``: initial (learnable) alpha of the compact hidden layers /
    of the last compact fc layer; ``delta`` of the compact layers; ``smoothing`` for LS variants.
    ``dataset``: ``"mnist"`` (Papernot's net, 1x28x28 by default) or ``"cifar10"`` (VGG11,
    3x32x32 by default); ``in_channels``/``image_size`` default to the dataset's."""
    key = {v.lower(): v for v in VARIANTS}.get(str(name).lower())
    if key is None:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
    ds = str(dataset).lower().replace("-", "")
    if ds not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    _arch, default_ch, default_size = DATASETS[ds]
    in_channels = default_ch if in_channels is None else in_channels
    image_size = default_size if image_size is None else image_size
    if ds == "cifar10":
        def builder(**kw):
            kw["input_size"] = kw.pop("image_size")
            return _vgg11(mean=0.5, **kw)
    else:
        builder = papernot_mnist
    common = dict(in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    ce = LabelSmoothingCrossEntropy(0.0)
    ls = LabelSmoothingCrossEntropy(smoothing)
    if key in ("SM", "LS"):
        model = builder(**common)
    elif key == "BReLU":
        model = builder(activation=lambda: BoundedReLU(brelu_max), **common)
    elif key == "L2SM":
        model = builder(head=lambda i, o: L2SoftmaxLinear(i, o, alpha=l2_alpha), **common)
    else:  # CCN, CCN+LS
        model = builder(
            conv_layer=lambda i, o, **kw: CompactConv2d(i, o, alpha=ccn_alpha, delta=delta, **kw),
            linear_layer=lambda i, o: CompactLinear(i, o, alpha=ccn_alpha, delta=delta),
            head=lambda i, o: CompactLinear(i, o, alpha=ccn_head_alpha, delta=delta),
            **common,
        )
    criterion = ls if key in ("LS", "CCN+LS") else ce
    return Variant(key, model, criterion)
