"""Input gradients: the one place robustops differentiates a model w.r.t. its input.

Two shared rules live here:

* ``torch.inference_mode()`` / ``torch.no_grad()`` around a call: gradient-based functions work
  there and give the same result as a plain call. :func:`autograd_on` leaves inference mode and
  turns grad on for the helper's own computation only; the caller's tensors are never modified.
  When the model itself was *built or loaded* under inference mode its parameters are inference
  tensors that autograd cannot save, and the helper raises :class:`InferenceModeError` naming
  ``torch.inference_mode`` and the fix.
* non-finite gradients (a model using ``sqrt`` at 0, ``log`` at 0, overflow): NaN entries become 0
  and +-Inf entries become +-1 with every finite entry of that sample set to 0 — the limiting
  direction of the gradient, which is what ``sign`` already does for FGSM. Every attack built on
  this therefore returns finite examples inside ``[lo, hi]``.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

from ._checks import as_logits

__all__ = ["InferenceModeError", "autograd_on", "input_gradient", "sanitize_gradient"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class InferenceModeError(RuntimeError):
    """The model's parameters are inference tensors: no input gradient can be taken."""


@contextlib.contextmanager
def autograd_on() -> Iterator[None]:
    """Grad mode on and inference mode off inside the block, whatever the caller's mode.

    Translates autograd's "Inference tensors cannot be saved for backward" into
    :class:`InferenceModeError` with the fix.
    """
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    except RuntimeError as err:
        if "nference tensor" in str(err):
            raise InferenceModeError(
                "cannot take input gradients: the model's parameters (or the input) are inference tensors, "
                "created under torch.inference_mode(). Build/load the model outside torch.inference_mode() "
                "(calling robustops under inference_mode is fine), or clone its parameters "
                f"(original error: {err})") from None
        raise


def _normal_tensor(x: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) detached copy of ``x`` that can require grad."""
    with torch.inference_mode(False):
        return x.detach().clone()


def sanitize_gradient(grad: torch.Tensor) -> torch.Tensor:
    """Finite gradient with the same limiting direction (see module docstring); no-op when finite."""
    finite = torch.isfinite(grad)
    if bool(finite.all()):
        return grad
    g = torch.where(torch.isnan(grad), torch.zeros_like(grad), grad)
    inf = torch.isinf(g)
    has_inf = inf.flatten(1).any(1).view(-1, *([1] * (g.dim() - 1))) if g.dim() > 1 else inf.any()
    limit = torch.where(inf, torch.sign(g), torch.zeros_like(g))
    return torch.where(has_inf, limit, g)


def input_gradient(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Optional[LossFn] = None,
    targeted: bool = False,
    check_output: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(grad, logits)``: gradient of the summed loss w.r.t. ``x`` (finite), and the logits.

    The loss is summed over the batch (``reduction="sum"``) so the per-example gradient does not
    shrink with the batch size; ``loss_fn(logits, y) -> scalar`` replaces cross-entropy. With
    ``targeted=True`` ``y`` holds target labels and the gradient is that of the negated loss.
    Model parameters get no ``.grad`` (only ``x`` is differentiated; run it under
    ``robustops._guard.frozen_model``). The model's output goes through
    :func:`robustops._checks.as_logits`. Works under ``torch.inference_mode()``.
    """
    with autograd_on():
        xg = _normal_tensor(x).requires_grad_(True)
        if isinstance(y, torch.Tensor) and y.is_inference():
            y = _normal_tensor(y)  # cross-entropy saves the labels for backward
        out = model(xg)
        logits = as_logits(out, x.shape[0]) if check_output else out
        loss = F.cross_entropy(logits, y, reduction="sum") if loss_fn is None else loss_fn(logits, y)
        if targeted:
            loss = -loss
        (grad,) = torch.autograd.grad(loss, xg)
    return sanitize_gradient(grad), logits.detach()
