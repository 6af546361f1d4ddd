"""First-order (Taylor) screen of kernel importance: one forward + backward instead of C ablations.

Removing kernel c sets channel c of the layer's output ``a`` to zero; to first order the loss
changes by ``-sum(a_c * dL/da_c)``. Two aggregations are offered:

* ``per_example=True`` - Molchanov et al. 2017 ("Pruning convolutional neural networks for
  resource efficient inference", the Taylor-expansion criterion): for each example the mean over
  spatial positions of ``a_c * dL/da_c``, its absolute value, then the mean over examples. This
  is Molchanov's criterion; opposite-signed examples do not cancel.
* ``per_example=False`` (default, kept for compatibility) - ``|mean over examples and positions of
  a_c * dL/da_c|``: the first-order change of the *mean* loss over the data set when the kernel
  is removed (signs cancel across examples). Not Molchanov's criterion.

Both come from a single backward pass per batch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import as_logits, check_labels
from .._gradients import autograd_on
from .._guard import frozen_model, model_device
from ._common import LayerLike, bounds, check_batch_size, checked_batches, public_entry, resolve_layer
from .errors import EmptyDatasetError

__all__ = ["taylor_importance"]


@public_entry
def taylor_importance(model: nn.Module, layer: Optional[LayerLike], data, *, batch_size: int = 256,
                      per_example: bool = False, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """``Tensor[C]`` (float64, >= 0): first-order importance of each output channel of conv ``layer``.

    ``L`` is the summed cross-entropy (so ``dL/da`` is per example). ``per_example=False``:
    ``|mean over examples and positions of a * dL/da|``; ``per_example=True``: Molchanov et al.
    2017's criterion, ``mean over examples of |mean over positions of a * dL/da|``
    (>= the former). ``data``: ``(x, y)`` pair or DataLoader, x finite in ``[lo, hi]``, y integer
    labels of any integer dtype. The model is not modified (parameters get no ``.grad``); works
    under ``torch.inference_mode()`` with the plain call's result. Errors as
    :func:`~robustops.fragile.kernel_dropout`.
    """
    batch_size = check_batch_size(batch_size)
    lo, hi = bounds(lo, hi)
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
            for x, y in checked_batches(data, batch_size, lo, hi):
                x, y = x.to(device), y.to(device)
                with autograd_on():
                    logits = as_logits(model(x), x.shape[0])
                    y = check_labels(y, x.shape[0], num_classes=logits.shape[1])
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
            box.clear()
    if count == 0:
        raise EmptyDatasetError("data yielded no examples")
    return (total / count).abs().cpu()  # (already >= 0 per example when per_example)
