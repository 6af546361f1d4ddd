"""Bounded ReLU (Zantedeschi et al. 2017): ``min(max(x, 0), max_value)``."""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["BoundedReLU"]


class BoundedReLU(nn.Module):
    """``clamp(x, 0, max_value)``; the paper's BReLU variant clips activations to [0, 1]."""

    def __init__(self, max_value: float = 1.0) -> None:
        super().__init__()
        if isinstance(max_value, bool) or not isinstance(max_value, (int, float)):
            raise TypeError(f"max_value must be a number, got {type(max_value).__name__}")
        max_value = float(max_value)
        if not math.isfinite(max_value) or max_value <= 0:
            raise ValueError(f"max_value must be finite and > 0, got {max_value}")
        self.max_value = max_value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, 0.0, self.max_value)

    def extra_repr(self) -> str:
        return f"max_value={self.max_value}"
