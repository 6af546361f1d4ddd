"""Fragile (S) / null (S') split of a layer's kernels from their one-at-a-time dropout scores.

Paper Sec. 3.3 / Fig. 1: kernels whose removal leaves the model *below* the mean performance line
are fragile (S), the others null (S'). The rule and its threshold are parameters here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from ._common import true_median
from .dropout import KernelDropoutResult

__all__ = ["FragileSplit", "fragile_split", "SPLIT_RULES"]

#: rule -> meaning of ``threshold``
SPLIT_RULES = {
    "mean": "line = mean(score) + threshold (threshold: offset, default 0)",
    "median": "line = median(score) + threshold (the statistical median: mean of the two middle scores "
              "for an even count; threshold: offset, default 0)",
    "std": "line = mean(score) - threshold * std(score) (threshold: k, default 1)",
    "quantile": "line = quantile(score, threshold) (threshold: q in (0, 1), default 0.5)",
    "value": "line = threshold (an absolute score, required)",
}


@dataclass
class FragileSplit:
    """``fragile`` (S) and ``null`` (S') kernel indices, the line used and the scores."""

    fragile: torch.Tensor
    null: torch.Tensor
    threshold: float
    scores: torch.Tensor
    rule: str
    metric: str

    @property
    def fragile_fraction(self) -> float:
        return self.fragile.numel() / max(1, self.scores.numel())


def fragile_split(
    scores: Union[KernelDropoutResult, torch.Tensor],
    *,
    rule: str = "mean",
    threshold: Optional[float] = None,
    metric: str = "clean_accuracy",
) -> FragileSplit:
    """Split kernels into fragile S (score strictly below the line) and null S' (at or above it).

    Args:
        scores: a :class:`KernelDropoutResult` or a ``Tensor[C]`` of per-kernel performance with
            that kernel removed (higher = the model copes better without it).
        rule: one of :data:`SPLIT_RULES` ("mean" is the paper's).
        threshold: the rule's parameter (see :data:`SPLIT_RULES`).
        metric: which field of a result to use: "clean_accuracy", "adversarial_accuracy" or
            "clean_loss" (losses are negated so that lower performance is still "below").
    """
    if isinstance(scores, KernelDropoutResult):
        if metric not in ("clean_accuracy", "adversarial_accuracy", "clean_loss"):
            raise ValueError(f"metric must be 'clean_accuracy', 'adversarial_accuracy' or 'clean_loss', got {metric!r}")
        s = getattr(scores, metric)
        if s is None:
            raise ValueError(f"the result has no {metric} (pass adversarial= to kernel_dropout)")
        if metric == "clean_loss":
            s = -s
    elif isinstance(scores, torch.Tensor):
        s = scores
    else:
        raise TypeError(f"scores must be a KernelDropoutResult or a Tensor, got {type(scores).__name__}")
    s = s.detach().double().cpu().reshape(-1)
    if s.numel() == 0:
        raise ValueError("scores is empty")
    if not torch.isfinite(s).all():
        raise ValueError("scores must be finite")
    if rule not in SPLIT_RULES:
        raise ValueError(f"rule must be one of {sorted(SPLIT_RULES)}, got {rule!r}")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not math.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    if rule == "mean":
        line = s.mean().item() + (threshold or 0.0)
    elif rule == "median":
        line = true_median(s) + (threshold or 0.0)
    elif rule == "std":
        k = 1.0 if threshold is None else float(threshold)
        line = s.mean().item() - k * (s.std(unbiased=False).item() if s.numel() > 1 else 0.0)
    elif rule == "quantile":
        q = 0.5 if threshold is None else float(threshold)
        if not 0.0 < q < 1.0:
            raise ValueError(f"quantile threshold must be in (0, 1), got {q}")
        line = torch.quantile(s, q).item()
    else:
        if threshold is None:
            raise ValueError("rule='value' needs threshold= (an absolute score)")
        line = float(threshold)
    fragile = torch.nonzero(s < line).reshape(-1)
    null = torch.nonzero(s >= line).reshape(-1)
    return FragileSplit(fragile, null, float(line), s, rule, metric)
