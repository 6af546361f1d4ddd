"""Adversarial targeting (Pravin et al. 2021, Algorithm 1).

For each FGSM eps: craft x' from x (one input gradient serves every eps: the fused
``fgsm_step``), take layer L's outputs on x and x', the per-kernel Euclidean distance
``d_k = ||L(x)_k - L(x')_k||_2`` (over the kernel's feature map), and count the examples for which
the mean distance over the fragile kernels S exceeds the mean over the null kernels S'.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import torch
from torch import nn

from .. import _ops
from .._guard import frozen_model, model_device
from ..attacks.gradients import input_gradient
from ._common import LayerLike, check_batch_size, iter_batches, layer_output, resolve_layer
from .errors import EmptyDatasetError, EmptySplitError
from .split import FragileSplit

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


def _indices(split) -> Tuple[torch.Tensor, torch.Tensor]:
    if isinstance(split, FragileSplit):
        s, sn = split.fragile, split.null
    else:
        try:
            s, sn = split
        except (TypeError, ValueError):
            raise TypeError("split must be a FragileSplit or a (fragile, null) pair of index lists") from None
    s = torch.as_tensor(s, dtype=torch.long).reshape(-1)
    sn = torch.as_tensor(sn, dtype=torch.long).reshape(-1)
    if s.numel() == 0 or sn.numel() == 0:
        raise EmptySplitError(f"both S and S' must be non-empty, got |S|={s.numel()}, |S'|={sn.numel()}")
    return s, sn


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
        data: DataLoader or ``(x, y)`` pair.
        eps: one or more FGSM step sizes (all from one gradient per batch).
        split: a :class:`FragileSplit` or ``(S, S')`` index lists.
        lo, hi: pixel range for the FGSM clamp.
    """
    batch_size = check_batch_size(batch_size)
    eps_t = _ops.as_eps_tensor(eps)
    s_idx, n_idx = _indices(split)
    name, conv = resolve_layer(model, layer)
    C = conv.out_channels
    if int(torch.cat([s_idx, n_idx]).max()) >= C or int(torch.cat([s_idx, n_idx]).min()) < 0:
        raise ValueError(f"split indices must be in [0, {C}) for layer {name!r}")
    device = model_device(model)
    K = eps_t.numel()
    counts = torch.zeros(K, dtype=torch.int64)
    sum_f = torch.zeros(K, dtype=torch.float64)
    sum_n = torch.zeros(K, dtype=torch.float64)
    seen = 0
    with frozen_model(model):
        for x, y in iter_batches(data, batch_size):
            x, y = x.to(device), y.to(device)
            b = x.shape[0]
            if b == 0:
                continue
            grad, _ = input_gradient(model, x, y)
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
