"""FGSM (Goodfellow et al. 2015, "Explaining and harnessing adversarial examples").

    x_adv = clip_[lo, hi](x + eps * sign(grad_x L(f(x), y)))           (untargeted)
    x_adv = clip_[lo, hi](x - eps * sign(grad_x L(f(x), t)))           (targeted at t)

The step itself is the fused ``robustops.ops.fgsm_step`` op; the loss is summed over the batch
so the gradient does not shrink with the batch size (its sign is what matters, but a mean-reduced
loss of a large batch can underflow to exact zeros).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .._ops import fgsm_step
from .base import Attack, EpsArg, batch_view, per_sample
from .gradients import input_gradient

__all__ = ["FGSM", "fgsm"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class FGSM(Attack):
    """Fast gradient sign method, ``atk = FGSM(model, eps); x_adv = atk(x, y)``.

    Args:
        model: classifier returning logits.
        eps: L-inf budget, a number or one value per sample (tensor ``[N]``), >= 0; default
            ``8/255 * (hi - lo)`` (the default scales with the pixel range).
        targeted: ``y`` holds target classes and the step descends their loss.
        loss: ``loss(logits, y) -> scalar``; default cross-entropy with ``reduction="sum"``.
        lo, hi: pixel bounds.
    """

    def __init__(self, model, eps: Optional[EpsArg] = None, *, targeted: bool = False, loss: Optional[LossFn] = None,
                 lo: float = 0.0, hi: float = 1.0, seed: Optional[int] = None, progress: bool = False):
        super().__init__(model, targeted=targeted, lo=lo, hi=hi, seed=seed, progress=progress)
        if eps is None:
            eps = 8 / 255 * (self.hi - self.lo)
        per_sample(eps, 1 if not isinstance(eps, torch.Tensor) else eps.numel(), "eps")  # early check
        if loss is not None and not callable(loss):
            raise TypeError(f"loss must be callable(logits, y) -> scalar, got {type(loss).__name__}")
        self.eps = eps
        self.loss = loss

    def _attack(self, x, y):
        eps = per_sample(self.eps, x.shape[0], "eps")
        grad, logits = input_gradient(self.model, x, y, loss_fn=self.loss, targeted=self.targeted)
        if isinstance(eps, float):
            return fgsm_step(x, grad, [eps], self.lo, self.hi)[0]
        return torch.clamp(x + batch_view(eps, x) * grad.sign(), self.lo, self.hi)


def fgsm(model, x: torch.Tensor, y: Optional[torch.Tensor], eps: EpsArg, *, targeted: bool = False,
         loss: Optional[LossFn] = None, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Functional FGSM: ``FGSM(model, eps, targeted=..., loss=..., lo=..., hi=...)(x, y)``.

    ``y=None`` uses the model's predictions. Returns ``x_adv`` (same shape/device as ``x``).
    """
    return FGSM(model, eps, targeted=targeted, loss=loss, lo=lo, hi=hi)(x, y)
