"""Accuracy under FGSM for a whole list of epsilons from one gradient per batch.

For each batch: one forward + backward for the input gradient (summed cross-entropy), the fused
``fgsm_step`` op producing all K adversarial batches at once, then one gradient-free forward per
eps. Running ``fgsm(model, x, y, eps_k)`` separately for every eps costs K forward+backward passes
more and gives exactly the same predictions (same inputs, same per-sample forward).
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._guard import frozen_model, model_device
from .._ops import as_eps_tensor, fgsm_step
from .base import check_bounds, check_images, check_labels, check_logits, maybe_progress
from .gradients import input_gradient

__all__ = ["robust_accuracy_curve"]

DataArg = Union[Iterable, Tuple[torch.Tensor, torch.Tensor]]


def _batches(data: DataArg, batch_size: int):
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError(f"data: x must be a batch [N, ...], got shape {tuple(x.shape)}")
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"data: shape mismatch, x has {x.shape[0]} samples but y has shape {tuple(y.shape)}")
        for s in range(0, x.shape[0], batch_size):
            yield x[s:s + batch_size], y[s:s + batch_size]
        return
    if isinstance(data, torch.Tensor) or not hasattr(data, "__iter__"):
        raise TypeError(f"data must be a DataLoader (or iterable of (x, y) batches) or an (x, y) pair, got {type(data).__name__}")
    for i, batch in enumerate(data):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise ValueError(f"data: batch {i} must be an (x, y, ...) tuple, got {type(batch).__name__}")
        yield batch[0], batch[1]


def _checked_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(check_logits(logits, y.shape[0]), y, reduction="sum")


def robust_accuracy_curve(
    model: nn.Module,
    data: DataArg,
    eps: Union[Sequence[float], torch.Tensor],
    *,
    lo: float = 0.0,
    hi: float = 1.0,
    batch_size: int = 512,
    concat_forward: bool = False,
    forward_batch: int = 2048,
    progress: bool = False,
) -> torch.Tensor:
    """Accuracy under untargeted FGSM for every ``eps[k]``: a float64 tensor ``[K]`` in [0, 1].

    Args:
        model: classifier returning ``(N, C)`` logits; run in eval mode and restored afterwards.
        data: a ``DataLoader`` / iterable of ``(x, y, ...)`` batches, or an ``(x, y)`` tensor pair
            (then split into ``batch_size`` chunks). Labels are the true classes.
        eps: list or 1-D tensor of K step sizes >= 0.
        lo, hi: pixel bounds; inputs must lie inside them.
        concat_forward: evaluate the ``K*B`` adversarial images of a batch as concatenated
            forwards of ``forward_batch`` images instead of K forwards of ``B``. Same maths, but
            the predictions equal those of K separate forwards only when the model's kernels give
            batch-size-independent results (PyTorch's CPU kernels did in our checks; cuDNN may
            pick other algorithms per batch size). Default False: K forwards of the FGSM batch,
            exactly the forwards :func:`fgsm` makes (on an idle 2-core CPU also the faster one).
        forward_batch: images per concatenated forward (bounds the activation memory).
        progress: tqdm bar over batches.

    Cost per batch: 1 forward+backward + K forwards (inference mode), against K x
    (forward+backward+forward) for a loop of FGSM attacks.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    lo, hi = check_bounds(lo, hi)
    eps_t = as_eps_tensor(eps)
    if isinstance(eps, torch.Tensor) and eps.dim() > 1:
        raise ValueError(f"eps must be a list or a 1-D tensor, got shape {tuple(eps.shape)}")
    for v, name in ((batch_size, "batch_size"), (forward_batch, "forward_batch")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    K = eps_t.numel()
    correct = torch.zeros(K, dtype=torch.long)
    total = 0
    device = model_device(model)
    concat = bool(concat_forward)
    with frozen_model(model):
        for xb, yb in maybe_progress(_batches(data, batch_size), progress, desc="robust_accuracy_curve"):
            check_images(xb, lo, hi, "x")
            yb = check_labels(yb, xb.shape[0], "y")
            xb, yb = xb.detach().to(device), yb.to(device)
            grad, _ = input_gradient(model, xb, yb, loss_fn=_checked_ce)
            x_adv = fgsm_step(xb, grad, eps_t, lo, hi)  # [K, B, ...]
            del grad
            with torch.inference_mode():
                if concat:
                    flat = x_adv.flatten(0, 1)
                    pred = torch.cat([model(flat[i:i + forward_batch]).argmax(1)
                                      for i in range(0, flat.shape[0], forward_batch)]).view(K, -1)
                    correct += (pred == yb).sum(1).cpu()
                else:
                    hits = torch.stack([(model(x_adv[k]).argmax(1) == yb).sum() for k in range(K)])
                    correct += hits.cpu()
            total += xb.shape[0]
    if total == 0:
        raise ValueError("data is empty (0 samples)")
    return correct.double() / total
