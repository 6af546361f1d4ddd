"""The six model variants of Ranjan et al. 2017 (Sec. 5) on the Papernot MNIST architecture (Table 10).

    conv3x3(32) act conv3x3(32) act maxpool2 conv3x3(64) act conv3x3(64) act maxpool2
    fc200 act fc200 act fc10                          (valid convolutions: 28 -> 4x4x64 = 1024)

Variants (``build_variant(name)`` returns ``Variant(name, model, criterion)``):
  SM      softmax cross-entropy (baseline)
  LS      label smoothing: soft labels {1/90, 0.9} for 10 classes (smoothing 0.1)
  BReLU   bounded ReLU min(max(x, 0), 1) instead of ReLU
  L2SM    L2-softmax: the final fc layer sees alpha * x / ||x|| (fixed alpha)
  CCN     compact convolution in every conv and fc layer (the last fc is then an L2-softmax layer)
  CCN+LS  CCN trained with label smoothing
Every model starts with the paper's pre-processing, a mean subtraction of 0.5, inside the model,
so attacks work in [0, 1] pixel space. The architecture is robustops.models.papernot_mnist.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from ..models.papernot import papernot_mnist as _papernot_net
from .activations import BoundedReLU
from .compact import CompactConv2d, CompactLinear
from .l2softmax import L2SoftmaxLinear
from .losses import LabelSmoothingCrossEntropy

__all__ = ["VARIANTS", "Variant", "Shift", "papernot_mnist", "build_variant"]

VARIANTS = ("SM", "LS", "BReLU", "L2SM", "CCN", "CCN+LS")


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
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: int = 28,
    smoothing: float = 0.1,
    l2_alpha: float = 10.0,
    ccn_alpha: float = 1.0,
    ccn_head_alpha: float = 10.0,
    delta: float = 0.01,
    brelu_max: float = 1.0,
) -> Variant:
    """Build one of :data:`VARIANTS` (case-insensitive). ``l2_alpha``: fixed alpha of the L2SM head;
    ``ccn_alpha`` / ``ccn_head_alpha``: initial (learnable) alpha of the compact hidden layers /
    of the last compact fc layer; ``delta`` of the compact layers; ``smoothing`` for LS variants."""
    key = {v.lower(): v for v in VARIANTS}.get(str(name).lower())
    if key is None:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
    common = dict(in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    ce = LabelSmoothingCrossEntropy(0.0)
    ls = LabelSmoothingCrossEntropy(smoothing)
    if key in ("SM", "LS"):
        model = papernot_mnist(**common)
    elif key == "BReLU":
        model = papernot_mnist(activation=lambda: BoundedReLU(brelu_max), **common)
    elif key == "L2SM":
        model = papernot_mnist(head=lambda i, o: L2SoftmaxLinear(i, o, alpha=l2_alpha), **common)
    else:  # CCN, CCN+LS
        model = papernot_mnist(
            conv_layer=lambda i, o, **kw: CompactConv2d(i, o, alpha=ccn_alpha, delta=delta, **kw),
            linear_layer=lambda i, o: CompactLinear(i, o, alpha=ccn_alpha, delta=delta),
            head=lambda i, o: CompactLinear(i, o, alpha=ccn_head_alpha, delta=delta),
            **common,
        )
    criterion = ls if key in ("LS", "CCN+LS") else ce
    return Variant(key, model, criterion)
