"""First-order (Taylor) screen of kernel importance: one forward + backward instead of C ablations.

Removing kernel c sets channel c of the layer's output ``a`` to zero; to first order the loss
changes by ``-sum(a_c * dL/da_c)``. The screen reports ``|mean over examples and positions of
a_c * dL/da_c|`` per kernel (Molchanov et al.'s criterion), from a single backward pass.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._guard import frozen_model, model_device
from ._common import LayerLike, check_batch_size, iter_batches, resolve_layer
from .errors import EmptyDatasetError

__all__ = ["taylor_importance"]


def taylor_importance(model: nn.Module, layer: Optional[LayerLike], data, *, batch_size: int = 256,
                      per_example: bool = False) -> torch.Tensor:
    """``Tensor[C]``: ``|mean(a * dL/da)|`` per output channel of conv ``layer``.

    ``L`` is the summed cross-entropy (so ``dL/da`` is per example), the mean runs over examples
    and spatial positions. With ``per_example=True`` the absolute value is taken per example
    (mean over positions) and then averaged over examples (Molchanov et al. 2017's form), so
    opposite-signed examples do not cancel. The model is not modified (parameters get no ``.grad``).
    """
    batch_size = check_batch_size(batch_size)
    name, conv = resolve_layer(model, layer)
    device = model_device(model)
    total = torch.zeros(conv.out_channels, dtype=torch.float64, device=device)
    count = 0
    box = {}

    def hook(_m, _inp, out):
        a = out.detach().requires_grad_(True)
        box["a"] = a
        return a

    with frozen_model(model):
        handle = conv.register_forward_hook(hook)
        try:
            for x, y in iter_batches(data, batch_size):
                x, y = x.to(device), y.to(device)
                if x.shape[0] == 0:
                    continue
                with torch.enable_grad():
                    logits = model(x)
                    loss = F.cross_entropy(logits, y, reduction="sum")
                    (g,) = torch.autograd.grad(loss, box["a"])
                a = box.pop("a").detach()
                prod = (a * g).double()
                if per_example:
                    total += prod.mean(dim=(2, 3)).abs().sum(0)
                    count += a.shape[0]
                else:
                    total += prod.sum(dim=(0, 2, 3))
                    count += a.shape[0] * a.shape[2] * a.shape[3]
        finally:
            handle.remove()
    if count == 0:
        raise EmptyDatasetError("data yielded no examples")
    return (total / count).abs().cpu()  # (already >= 0 per example when per_example)
