"""Adversarial targeting (Pravin et al. 2021, Algorithm 1).

For each FGSM eps: craft x' from x (one input gradient serves every eps: the fused
``fgsm_step``), take layer L's outputs on x and x', the per-kernel Euclidean distance
``d_k = ||L(x)_k - L(x')_k||_2`` (over the kernel's feature map), and count the examples for which
the mean distance over the fragile kernels S exceeds the mean over the null kernels S'.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import nn

from .. import _ops
from .._checks import check_labels
from .._gradients import input_gradient
from .._guard import frozen_model, model_device
from ._common import (LayerLike, bounds, check_batch_size, checked_batches, layer_output, public_entry,
                      resolve_layer, split_indices)
from .errors import EmptyDatasetError

__all__ = ["TargetingResult", "adversarial_targeting"]


@dataclass
class TargetingResult:
    """Per eps: ``percentage`` (100 * count / N) of examples whose attack hits S harder than S'."""

    eps: torch.Tensor
    percentage: torch.Tensor
    counts: torch.Tensor
    num_examples: int
    mean_distance_fragile: torch.Tensor  # mean over examples of the S-average distance
    mean_distance_null: torch.Tensor


def _checked_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy after the shared label check against the model's class count."""
    y = check_labels(y, logits.shape[0], num_classes=logits.shape[1])
    return torch.nn.functional.cross_entropy(logits, y, reduction="sum")


@public_entry
def adversarial_targeting(
    model: nn.Module,
    layer: LayerLike,
    data,
    eps: Union[float, Sequence[float], torch.Tensor],
    split,
    *,
    batch_size: int = 256,
    lo: float = 0.0,
    hi: float = 1.0,
) -> TargetingResult:
    """Algorithm 1: share of examples whose FGSM attack concentrates on the fragile kernels S.

    Args:
        model: the classifier (not modified). FGSM is white-box against this model.
        layer: the conv layer L (name or module).
        data: DataLoader or ``(x, y)`` pair; x finite in ``[lo, hi]``, y integer labels.
        eps: one or more FGSM step sizes in input units (all from one gradient per batch).
        split: a :class:`FragileSplit` or ``(S, S')`` index lists (checked: integers in
            ``[0, C)``, no repeats, disjoint, both non-empty).
        lo, hi: the input range; x is checked against it and FGSM clamps to it (default [0, 1]).

    Raises ``SplitIndexError``/``EmptySplitError`` for a bad split, ``ValueError``/``TypeError``
    for bad inputs (shared rules, tuple outputs included). Works under ``torch.inference_mode()``.
    """
    batch_size = check_batch_size(batch_size)
    lo, hi = bounds(lo, hi)
    eps_t = _ops.as_eps_tensor(eps)
    name, conv = resolve_layer(model, layer)
    s_idx, n_idx = split_indices(split, conv.out_channels, name)
    device = model_device(model)
    K = eps_t.numel()
    counts = torch.zeros(K, dtype=torch.int64)
    sum_f = torch.zeros(K, dtype=torch.float64)
    sum_n = torch.zeros(K, dtype=torch.float64)
    seen = 0
    with frozen_model(model):
        for x, y in checked_batches(data, batch_size, lo, hi):
            x, y = x.to(device), y.to(device)
            b = x.shape[0]
            grad, _ = input_gradient(model, x, y, loss_fn=_checked_ce)
            x_adv = _ops.fgsm_step(x, grad, eps_t, lo, hi)  # [K, B, ...]
            a = layer_output(model, conv, x)
            a_adv = layer_output(model, conv, x_adv.reshape(K * b, *x.shape[1:])).reshape(K, b, *a.shape[1:])
            d = (a_adv - a.unsqueeze(0)).flatten(3).norm(dim=-1)  # [K, B, C]
            sf = d[..., s_idx.to(d.device)].mean(-1)
            sn = d[..., n_idx.to(d.device)].mean(-1)
            counts += (sf > sn).sum(1).cpu()
            sum_f += sf.double().sum(1).cpu()
            sum_n += sn.double().sum(1).cpu()
            seen += b
    if seen == 0:
        raise EmptyDatasetError("data yielded no examples")
    return TargetingResult(eps_t, 100.0 * counts.double() / seen, counts, seen, sum_f / seen, sum_n / seen)
