"""Iterative gradient attacks: BIM (Kurakin et al. 2017) and PGD (Madry et al. 2018), L-inf and L2.

L-inf step (PGD / BIM)::

    x_{t+1} = clip_[lo,hi]( x + clip_[-eps,eps]( x_t + alpha * sign(g_t) - x ) )

L2 step (PGD-L2)::

    x_{t+1} = clip_[lo,hi]( x + P_eps( x_t + alpha * g_t / ||g_t||_2 - x ) ),  P_eps(d) = d * min(1, eps/||d||_2)

``g_t`` is the gradient of the summed cross-entropy (negated for a targeted attack). PGD starts
from a random point of the eps-ball (``random_start=True``): uniform in the L-inf box, or a
uniformly-scaled Gaussian direction in the L2 ball. BIM is PGD-L-inf without the random start.
With ``seed=None`` the random start draws from the global RNG (as torchattacks does), else from a
generator seeded with ``seed``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .base import Attack, EpsArg, batch_view, check_nonneg, maybe_progress, per_sample
from .gradients import input_gradient

__all__ = ["PGD", "PGDL2", "BIM", "pgd", "pgd_l2", "bim"]


class PGD(Attack):
    """Projected gradient descent in the L-inf ball (Madry et al. 2018).

    Args:
        eps: L-inf budget (number or per-sample tensor ``[N]``).
        alpha: step size (number or per-sample tensor).
        steps: number of iterations (>= 0).
        random_start: start from a uniform point of the eps-box.
    """

    norm = "inf"

    def __init__(self, model, eps: EpsArg = 8 / 255, alpha: EpsArg = 2 / 255, steps: int = 10, *,
                 random_start: bool = True, targeted: bool = False, lo: float = 0.0, hi: float = 1.0,
                 seed: Optional[int] = None, progress: bool = False):
        super().__init__(model, targeted=targeted, lo=lo, hi=hi, seed=seed, progress=progress)
        for v, name in ((eps, "eps"), (alpha, "alpha")):
            per_sample(v, v.numel() if isinstance(v, torch.Tensor) else 1, name)
        self.eps, self.alpha = eps, alpha
        self.steps = check_nonneg(steps, "steps", integer=True)
        self.random_start = bool(random_start)

    def _random_start(self, x, eps):
        n = x.shape[0]
        g = self.generator
        if self.norm == "inf":
            if isinstance(eps, float):
                noise = torch.empty_like(x).uniform_(-eps, eps, generator=g)
            else:
                noise = (torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype) * 2 - 1) * batch_view(eps, x)
            return torch.clamp(x + noise, self.lo, self.hi)
        delta = torch.empty_like(x).normal_(generator=g)
        norms = delta.reshape(n, -1).norm(p=2, dim=1).view(-1, *([1] * (x.dim() - 1)))
        r = torch.zeros_like(norms).uniform_(0, 1, generator=g)
        delta = delta * (r / norms * batch_view(eps, x))
        return torch.clamp(x + delta, self.lo, self.hi)

    def _project(self, x, x_adv, eps):
        if self.norm == "inf":
            e = batch_view(eps, x)
            if isinstance(e, float):
                delta = torch.clamp(x_adv - x, min=-e, max=e)
            else:
                delta = torch.maximum(torch.minimum(x_adv - x, e), -e)
            return torch.clamp(x + delta, self.lo, self.hi)
        n = x.shape[0]
        delta = x_adv - x
        dn = delta.reshape(n, -1).norm(p=2, dim=1)
        e = eps if isinstance(eps, float) else eps.to(device=x.device, dtype=x.dtype)
        factor = torch.clamp(e / dn.clamp_min(1e-12), max=1.0)
        return torch.clamp(x + delta * factor.view(-1, *([1] * (x.dim() - 1))), self.lo, self.hi)

    def _step(self, x_adv, grad, alpha):
        if self.norm == "inf":
            return x_adv + batch_view(alpha, x_adv) * grad.sign()
        n = grad.shape[0]
        gn = grad.reshape(n, -1).norm(p=2, dim=1).view(-1, *([1] * (grad.dim() - 1))) + 1e-10
        return x_adv + batch_view(alpha, x_adv) * (grad / gn)

    def _attack(self, x, y):
        n = x.shape[0]
        eps = per_sample(self.eps, n, "eps")
        alpha = per_sample(self.alpha, n, "alpha")
        x_adv = self._random_start(x, eps) if self.random_start else x.clone()
        for _ in maybe_progress(range(self.steps), self.progress, desc=type(self).__name__):
            grad, _ = input_gradient(self.model, x_adv, y, targeted=self.targeted)
            x_adv = self._project(x, self._step(x_adv, grad, alpha), eps)
        return x_adv.detach()


class PGDL2(PGD):
    """Projected gradient descent in the L2 ball; ``alpha`` is the L2 length of each step."""

    norm = "2"

    def __init__(self, model, eps: EpsArg = 1.0, alpha: EpsArg = 0.2, steps: int = 10, **kw):
        super().__init__(model, eps, alpha, steps, **kw)


class BIM(PGD):
    """Basic iterative method (Kurakin et al. 2017): PGD-L-inf from ``x`` itself (no random start).

    ``steps=None`` picks Kurakin's ``min(eps*255 + 4, 1.25*eps*255)`` for a scalar eps.
    """

    def __init__(self, model, eps: EpsArg = 8 / 255, alpha: EpsArg = 1 / 255, steps: Optional[int] = 10, **kw):
        kw.pop("random_start", None)
        if steps is None:
            if isinstance(eps, torch.Tensor):
                raise ValueError("steps=None needs a scalar eps")
            steps = int(min(eps * 255 + 4, 1.25 * eps * 255))
        super().__init__(model, eps, alpha, steps, random_start=False, **kw)


def pgd(model, x, y, eps: EpsArg = 8 / 255, alpha: EpsArg = 2 / 255, steps: int = 10, **kw) -> torch.Tensor:
    """Functional :class:`PGD` (L-inf). Keyword args: random_start, targeted, lo, hi, seed, progress."""
    return PGD(model, eps, alpha, steps, **kw)(x, y)


def pgd_l2(model, x, y, eps: EpsArg = 1.0, alpha: EpsArg = 0.2, steps: int = 10, **kw) -> torch.Tensor:
    """Functional :class:`PGDL2`."""
    return PGDL2(model, eps, alpha, steps, **kw)(x, y)


def bim(model, x, y, eps: EpsArg = 8 / 255, alpha: EpsArg = 1 / 255, steps: Optional[int] = 10, **kw) -> torch.Tensor:
    """Functional :class:`BIM`."""
    return BIM(model, eps, alpha, steps, **kw)(x, y)
