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

from .._checks import EmptyDataError, as_logits, iter_batches
from .._guard import frozen_model, model_device
from .._ops import as_eps_tensor, fgsm_step
from .base import check_bounds, check_images, check_labels, maybe_progress
from .gradients import input_gradient

__all__ = ["robust_accuracy_curve"]

DataArg = Union[Iterable, Tuple[torch.Tensor, torch.Tensor]]


def _checked_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # logits already went through the shared output rule (input_gradient); labels are checked
    # against the model's number of classes here, before cross_entropy could raise IndexError.
    check_labels(y, logits.shape[0], "y", num_classes=logits.shape[1])
    return F.cross_entropy(logits, y, reduction="sum")


def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return as_logits(model(x), x.shape[0]).argmax(1)


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
        data: a ``DataLoader`` / iterable of ``(x, y, ...)`` batches (a list of such batches
            too), or an ``(x, y)`` tensor pair / 2-list (then split into ``batch_size`` chunks);
            read by :func:`robustops._checks.iter_batches`. Labels are the true classes, any
            integer dtype, in ``[0, C)``; every batch's ``x`` must be finite and inside
            ``[lo, hi]``. Empty batches are skipped.
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

    Every forward goes through the shared output rule (:func:`robustops._checks.as_logits`):
    tuple/dict outputs without ``logits`` and NaN/Inf logits raise ``ValueError``. Works under
    ``torch.inference_mode()`` with the same result as a plain call.

    Raises:
        TypeError: ``data`` is not a pair or an iterable of batches; float/bool labels.
        ValueError: bad ``eps``, labels out of range, ``x`` outside ``[lo, hi]`` or not finite,
            a model output that is not ``(N, C)`` finite logits.
        robustops._checks.EmptyDataError: ``data`` holds no example (a ValueError).
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
        for xb, yb in maybe_progress(iter_batches(data, batch_size), progress, desc="robust_accuracy_curve"):
            if xb.dim() >= 1 and xb.shape[0] == 0 and yb.numel() == 0:
                continue  # an empty batch holds nothing to count
            check_images(xb, lo, hi, "x")
            yb = check_labels(yb, xb.shape[0], "y")
            xb, yb = xb.detach().to(device), yb.to(device)
            grad, _ = input_gradient(model, xb, yb, loss_fn=_checked_ce)
            x_adv = fgsm_step(xb, grad, eps_t, lo, hi)  # [K, B, ...]
            del grad
            with torch.inference_mode():
                if concat:
                    flat = x_adv.flatten(0, 1)
                    pred = torch.cat([_predict(model, flat[i:i + forward_batch])
                                      for i in range(0, flat.shape[0], forward_batch)]).view(K, -1)
                    correct += (pred == yb).sum(1).cpu()
                else:
                    hits = torch.stack([(_predict(model, x_adv[k]) == yb).sum() for k in range(K)])
                    correct += hits.cpu()
            total += xb.shape[0]
    if total == 0:
        raise EmptyDataError("data is empty (0 samples)")
    return correct.double() / total
