"""In-model input normalisation, so that attacks and analyses keep working in pixel space [0, 1]."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["Normalize", "CIFAR10_MEAN", "CIFAR10_STD"]

#: Per-channel mean / std of the CIFAR-10 training images (pixels in [0, 1]), for ``Normalize``.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

Stat = Union[float, Sequence[float]]


def _as_stat(value, name: str, channels: int, positive: bool = False) -> torch.Tensor:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a sequence of numbers, got bool")
    if isinstance(value, numbers.Real):
        vals = [float(value)] * channels
    else:
        try:
            vals = [float(v) for v in value]
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a number or a sequence of numbers, got {value!r}") from None
        if len(vals) != channels:
            raise ValueError(f"{name} must have one value per input channel ({channels}), got {len(vals)}")
    for v in vals:
        if not math.isfinite(v) or (positive and v <= 0):
            raise ValueError(f"{name} values must be finite{' and > 0' if positive else ''}, got {vals}")
    return torch.tensor(vals).view(1, channels, 1, 1)


class Normalize(nn.Module):
    """``(x - mean[c]) / std[c]`` per channel of an ``[N, C, H, W]`` batch.

    Put it first in a model so that the model takes pixels in ``[0, 1]`` (what attacks perturb and
    clamp) and does its own pre-processing. ``mean``/``std``: one number for every channel or one
    per channel. Stored as non-persistent buffers: they follow ``.to()`` but are not in the
    ``state_dict`` (they are part of the architecture, not of the training state).
    """

    def __init__(self, mean: Stat = 0.5, std: Optional[Stat] = None, channels: int = 3):
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be an int >= 1, got {channels!r}")
        self.channels = channels
        self.register_buffer("mean", _as_stat(mean, "mean", channels), persistent=False)
        self.register_buffer("std", _as_stat(1.0 if std is None else std, "std", channels, positive=True),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"Normalize expects [N, {self.channels}, H, W] input, got shape {tuple(x.shape)}")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
