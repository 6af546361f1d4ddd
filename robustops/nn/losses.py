"""Cross-entropy with the paper's label smoothing: the true class gets ``1 - smoothing`` and every
other class ``smoothing / (C - 1)`` (Ranjan et al. use {1/90, 0.9} for C = 10, i.e. smoothing 0.1,
after Warde-Farley & Goodfellow). Note ``torch.nn.CrossEntropyLoss(label_smoothing=s)`` spreads
``s`` over all C classes instead (true class ``1 - s + s/C``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["smooth_labels", "label_smoothing_cross_entropy", "LabelSmoothingCrossEntropy"]


def _check_smoothing(smoothing) -> float:
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)):
        raise TypeError(f"smoothing must be a number, got {type(smoothing).__name__}")
    smoothing = float(smoothing)
    if not math.isfinite(smoothing) or not (0.0 <= smoothing < 1.0):
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    return smoothing


def smooth_labels(target: torch.Tensor, num_classes: int, smoothing: float = 0.1, dtype=torch.float32):
    """Soft labels ``[N, C]``: ``1 - smoothing`` on the target class, ``smoothing/(C-1)`` elsewhere."""
    smoothing = _check_smoothing(smoothing)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    off = smoothing / (num_classes - 1)
    out = torch.full((target.shape[0], num_classes), off, dtype=dtype, device=target.device)
    out.scatter_(1, target.long().view(-1, 1), 1.0 - smoothing)
    return out


def label_smoothing_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.1,
                                  reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``logits [N, C]`` against :func:`smooth_labels` (plain CE when smoothing=0)."""
    smoothing = _check_smoothing(smoothing)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N, C], got shape {tuple(logits.shape)}")
    if smoothing == 0.0:
        return F.cross_entropy(logits, target, reduction=reduction)
    soft = smooth_labels(target, logits.shape[1], smoothing, dtype=logits.dtype)
    loss = -(soft * F.log_softmax(logits, dim=1)).sum(1)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


class LabelSmoothingCrossEntropy(nn.Module):
    """Module form of :func:`label_smoothing_cross_entropy` (``smoothing=0`` is plain CE)."""

    def __init__(self, smoothing: float = 0.1, reduction: str = "mean") -> None:
        super().__init__()
        self.smoothing = _check_smoothing(smoothing)
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return label_smoothing_cross_entropy(logits, target, self.smoothing, self.reduction)

    def extra_repr(self) -> str:
        return f"smoothing={self.smoothing}, reduction={self.reduction!r}"
