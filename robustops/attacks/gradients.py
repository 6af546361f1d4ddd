"""Input gradients of a classification loss: the one backward pass every gradient attack needs."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def input_gradient(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Optional[LossFn] = None,
    targeted: bool = False,
):
    """Return ``(grad, logits)``: the gradient of the summed loss w.r.t. ``x``, and the logits.

    The loss is summed over the batch (``reduction="sum"``), so the per-example gradient does not
    shrink with the batch size. With ``targeted=True`` ``y`` holds the target labels and the
    gradient is that of the negated loss (steps then move *towards* the target). Model
    parameters get no ``.grad``: only ``x`` is differentiated. Run it under
    ``robustops._guard.frozen_model`` to also fix eval mode.
    """
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(xg)
        if loss_fn is None:
            loss = F.cross_entropy(logits, y, reduction="sum")
        else:
            loss = loss_fn(logits, y)
        if targeted:
            loss = -loss
        (grad,) = torch.autograd.grad(loss, xg)
    return grad, logits.detach()
