"""Carlini & Wagner L2 attack (Carlini and Wagner 2017, "Towards evaluating the robustness of
neural networks"), in the form of Ranjan et al. 2017 (papers/compact-convolution-ranjan2017.txt,
eq. 11 and 12), with the settings Granda et al. (papers/relevant-neurons-detection-granda.txt,
Sec. 5) use for their detector: cleverhans' ``binary_search_steps=9, max_iterations=1000,
learning_rate=1e-2, confidence=0, initial_const=1e-2``. These are the defaults.

Change of variables, so the box constraint disappears (``s = (x - lo) / (hi - lo)`` in [0, 1],
``u = 2 s - 1`` in [-1, 1])::

    w0 = atanh(clip(u, -(1 - delta), 1 - delta)),   o = u - tanh(w0)
    x'(w) = clip_[lo,hi]( lo + (hi - lo) * (tanh(w) + o + 1) / 2 )

For every pixel with ``|u| < 1 - delta`` the offset ``o`` is 0 and this is the paper's
``x' = (tanh(w) + 1) / 2`` (the clip is inactive). The authors start saturated pixels at
``atanh(+-0.999999) = +-7.25``, where ``d tanh / dw`` is 2e-6: Adam moves ``w`` by about ``lr``
per step, so a pixel at 0 or 1 (most of a digit image) needs ~500 steps before it can move at all
and with 100 steps moves by at most ~1e-5. Here pixels within ``delta / 2 = 0.5%`` of a bound
start at ``w0 = +-atanh(0.99) = +-2.65`` with the offset ``o`` that makes ``x'(w0) = x`` exactly:
they move from the first step, inwards freely and outwards up to the bound.

Objective per sample, minimised over ``w`` with Adam (eq. 11)::

    ||x'(w) - x||_2^2 + c * f(x'(w))
    f(x') = max(max_{i != t} Z(x')_i - Z(x')_t, -kappa)          targeted at t   (eq. 12)
    f(x') = max(Z(x')_y - max_{i != y} Z(x')_i, -kappa)          untargeted, true label y

``c`` is found per sample by binary search (``binary_search_steps`` outer rounds, the authors'
rule): after a round that succeeded the upper bound drops to ``c``, else the lower bound rises
(and ``c`` is multiplied by 10 while no upper bound is known); with 10 or more rounds the last
round is run with ``c`` = the upper bound (the authors' ``repeat``). A round stops early when the
objective has not dropped by 0.01% over ``steps / 10`` iterations (``abort_early``). The result
is, per sample, the successful adversarial with the smallest L2 distance over all rounds (the
returned example is the one recorded), or ``x`` itself when none succeeded.

Cost: up to ``binary_search_steps * steps`` forward+backward passes of the batch (9,000 with the
defaults; early abort stops most rounds sooner). On ``small_cnn`` trained on the 8x8 digits (the
first 200 test images) the defaults made 6,101 passes and reached 100% success at a mean L2 of
0.532; the old defaults (``c=1, steps=100, binary_search_steps=5``, the authors' start) made 501
passes and reached 91.8% at 0.701 (96.9% at 0.626 with this start). The C&W paper itself uses
10,000 iterations and ``c0 = 1e-3`` (``CWL2(model, c=1e-3, steps=10000)``).

Adam is element-wise, so optimising the summed objective of the batch treats every sample
independently.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .._gradients import sanitize_gradient
from .base import Attack, check_nonneg, maybe_progress

__all__ = ["CWL2", "CWResult", "cw_l2"]

_START_MARGIN = 1e-2  # delta above: |u| of the starting point is at most 1 - delta


class CWResult(NamedTuple):
    """x_adv ``[N, ...]``; l2 distance per sample ``[N]`` (inf where no success); success mask
    ``[N]``; c ``[N]``: the constant of the round that produced the returned example (for a
    failed sample, the constant of the last round)."""

    x_adv: torch.Tensor
    l2: torch.Tensor
    success: torch.Tensor
    c: torch.Tensor


class CWL2(Attack):
    """C&W-L2, ``atk(x, y) -> x_adv`` (``atk.last_result`` holds a :class:`CWResult`).

    Defaults are those of Granda et al. / cleverhans (see the module docstring for the cost).

    Args:
        c: initial trade-off constant (number > 0), default 1e-2.
        kappa: confidence margin >= 0.
        steps: Adam iterations per binary-search round, default 1000.
        lr: Adam learning rate, default 1e-2.
        binary_search_steps: rounds of the search over c (>= 1), default 9; with >= 10 the last
            round uses the upper bound of c (as the authors' code).
        abort_early: stop a round when the objective has not improved by 0.01% for steps/10
            iterations.
    """

    def __init__(self, model, c: float = 1e-2, kappa: float = 0.0, steps: int = 1000, lr: float = 1e-2, *,
                 binary_search_steps: int = 9, abort_early: bool = True, targeted: bool = False,
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
        u = ((x - self.lo) / span).clamp(0, 1) * 2 - 1
        u0 = u.clamp(-(1 - _START_MARGIN), 1 - _START_MARGIN)
        w0 = torch.atanh(u0)
        offset = u - torch.tanh(w0)  # 0 except for pixels within delta/2 of a bound

        def x_of(w):
            return torch.clamp(self.lo + span * (torch.tanh(w) + offset + 1) / 2, self.lo, self.hi)

        c = torch.full((n,), self.c, dtype=x.dtype, device=x.device)
        lower = torch.zeros_like(c)
        upper = torch.full_like(c, 1e10)
        best_l2 = torch.full((n,), float("inf"), dtype=x.dtype, device=x.device)
        best_c = c.clone()
        best_adv = x.clone()
        repeat = self.binary_search_steps >= 10
        check_every = max(self.steps // 10, 1)
        for rnd in maybe_progress(range(self.binary_search_steps), self.progress, desc="CW-L2"):
            if repeat and rnd == self.binary_search_steps - 1:
                c = upper.clone()  # the authors' last round: the smallest c known to succeed (1e10 if none)
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=self.lr)
            round_success = torch.zeros(n, dtype=torch.bool, device=x.device)
            prev = float("inf")
            for it in range(self.steps):
                with torch.enable_grad():
                    xa = x_of(w)
                    z = self.logits(xa)
                    l2 = (xa - x).flatten(1).pow(2).sum(1)
                    margin = self._margin(z, y)
                    f = torch.clamp(margin, min=-self.kappa)
                    loss = (l2 + c * f).sum()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                # record before the step: xa, z belong to the current w (the example returned)
                with torch.no_grad():
                    pred = z.argmax(1)
                    hit = (pred == y) if self.targeted else (pred != y)
                    ok = hit & (margin <= -self.kappa) if self.kappa > 0 else hit
                    dist = l2.detach().sqrt()
                    better = ok & (dist < best_l2)
                    best_l2 = torch.where(better, dist, best_l2)
                    best_c = torch.where(better, c, best_c)
                    best_adv[better] = xa.detach()[better]
                    round_success |= ok
                    w.grad = sanitize_gradient(w.grad)  # the shared non-finite rule
                opt.step()
                if self.abort_early and (it + 1) % check_every == 0:
                    cur = float(loss.detach())
                    if cur > prev * 0.9999:
                        break
                    prev = cur
            with torch.no_grad():
                failed = ~torch.isfinite(best_l2)
                best_c = torch.where(failed, c, best_c)  # failures: the last constant tried
                upper = torch.where(round_success, torch.minimum(upper, c), upper)
                lower = torch.where(round_success, lower, torch.maximum(lower, c))
                c = torch.where(upper < 1e9, (lower + upper) / 2, c * 10)
        success = torch.isfinite(best_l2)
        self.last_result = CWResult(best_adv.detach(), best_l2, success, best_c)
        return best_adv.detach()


def cw_l2(model, x, y=None, c: float = 1e-2, kappa: float = 0.0, steps: int = 1000, lr: float = 1e-2,
          **kw) -> torch.Tensor:
    """Functional :class:`CWL2`; returns ``x_adv``."""
    return CWL2(model, c, kappa, steps, lr, **kw)(x, y)
