"""Carlini & Wagner L2 attack (Carlini and Wagner 2017), in the form of Ranjan et al. 2017
(papers/compact-convolution-ranjan2017.txt, eq. 11 and 12).

Change of variables, so the box constraint disappears (``s = (x - lo) / (hi - lo)`` in [0, 1])::

    w0 = atanh((2 s - 1) * (1 - 1e-6)),   x'(w) = lo + (hi - lo) * (tanh(w) + 1) / 2

Objective per sample, minimised over ``w`` with Adam (eq. 11)::

    ||x'(w) - x||_2^2 + c * f(x'(w))
    f(x') = max(max_{i != t} Z(x')_i - Z(x')_t, -kappa)          targeted at t   (eq. 12)
    f(x') = max(Z(x')_y - max_{i != y} Z(x')_i, -kappa)          untargeted, true label y

``c`` is found per sample by binary search (``binary_search_steps`` outer rounds): after a
round that succeeded the upper bound drops to ``c``, else the lower bound rises (and ``c`` is
multiplied by 10 while no upper bound is known). The result is, per sample, the successful
adversarial with the smallest L2 distance over all rounds, or ``x`` itself when none succeeded.
Adam is element-wise, so optimising the summed objective of the batch treats every sample
independently.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .base import Attack, check_nonneg, maybe_progress

__all__ = ["CWL2", "CWResult", "cw_l2"]


class CWResult(NamedTuple):
    """x_adv; l2 distance per sample (inf where no success); success mask; final c per sample."""

    x_adv: torch.Tensor
    l2: torch.Tensor
    success: torch.Tensor
    c: torch.Tensor


class CWL2(Attack):
    """C&W-L2, ``atk(x, y) -> x_adv`` (``atk.last_result`` holds a :class:`CWResult`).

    Args:
        c: initial trade-off constant (number > 0).
        kappa: confidence margin >= 0.
        steps: Adam iterations per binary-search round.
        lr: Adam learning rate.
        binary_search_steps: rounds of the search over c (>= 1).
        abort_early: stop a round when the objective has not improved for steps/10 iterations.
    """

    def __init__(self, model, c: float = 1.0, kappa: float = 0.0, steps: int = 100, lr: float = 0.01, *,
                 binary_search_steps: int = 5, abort_early: bool = True, targeted: bool = False,
                 lo: float = 0.0, hi: float = 1.0, seed: Optional[int] = None, progress: bool = False):
        super().__init__(model, targeted=targeted, lo=lo, hi=hi, seed=seed, progress=progress)
        self.c = check_nonneg(c, "c", positive=True)
        self.kappa = check_nonneg(kappa, "kappa")
        self.steps = check_nonneg(steps, "steps", integer=True)
        self.lr = check_nonneg(lr, "lr", positive=True)
        self.binary_search_steps = check_nonneg(binary_search_steps, "binary_search_steps", integer=True, positive=True)
        self.abort_early = bool(abort_early)
        self.last_result: Optional[CWResult] = None

    def _margin(self, z, y):
        """``f`` of eq. 12 without the clamp: <= -kappa means success with confidence kappa."""
        zy = z.gather(1, y[:, None]).squeeze(1)
        zo = z.scatter(1, y[:, None], float("-inf")).amax(1)
        return zo - zy if self.targeted else zy - zo

    def _attack(self, x, y):
        n = x.shape[0]
        span = self.hi - self.lo
        s = ((x - self.lo) / span).clamp(0, 1)
        w0 = torch.atanh((2 * s - 1) * (1 - 1e-6))
        c = torch.full((n,), self.c, dtype=x.dtype, device=x.device)
        lower = torch.zeros_like(c)
        upper = torch.full_like(c, 1e10)
        best_l2 = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
        best_adv = x.clone()
        for _ in maybe_progress(range(self.binary_search_steps), self.progress, desc="CW-L2"):
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=self.lr)
            round_success = torch.zeros(n, dtype=torch.bool, device=x.device)
            prev = float("inf")
            check_every = max(self.steps // 10, 1)
            for it in range(self.steps):
                with torch.enable_grad():
                    xa = self.lo + span * (torch.tanh(w) + 1) / 2
                    z = self.logits(xa)
                    l2 = (xa - x).flatten(1).pow(2).sum(1)
                    margin = self._margin(z, y)
                    f = torch.clamp(margin, min=-self.kappa)
                    loss = (l2 + c * f).sum()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                # record before the step: xa, z belong to the current w
                with torch.no_grad():
                    pred = z.argmax(1)
                    hit = (pred == y) if self.targeted else (pred != y)
                    ok = hit & (margin <= -self.kappa) if self.kappa > 0 else hit
                    dist = l2.detach().sqrt()
                    better = ok & (dist < best_l2)
                    best_l2 = torch.where(better, dist, best_l2)
                    best_adv[better] = xa.detach()[better]
                    round_success |= ok
                opt.step()
                if self.abort_early and (it + 1) % check_every == 0:
                    cur = float(loss.detach())
                    if cur > prev * 0.9999:
                        break
                    prev = cur
            with torch.no_grad():
                upper = torch.where(round_success, torch.minimum(upper, c), upper)
                lower = torch.where(round_success, lower, torch.maximum(lower, c))
                c = torch.where(upper < 1e9, (lower + upper) / 2, c * 10)
        success = torch.isfinite(best_l2)
        self.last_result = CWResult(best_adv.detach(), best_l2, success, c)
        return best_adv.detach()


def cw_l2(model, x, y=None, c: float = 1.0, kappa: float = 0.0, steps: int = 100, lr: float = 0.01, **kw) -> torch.Tensor:
    """Functional :class:`CWL2`; returns ``x_adv``."""
    return CWL2(model, c, kappa, steps, lr, **kw)(x, y)
