"""Iterative gradient attacks: BIM (Kurakin et al. 2017) and PGD (Madry et al. 2018), L-inf and L2.

L-inf step (PGD / BIM)::

    x_{t+1} = clip_[lo,hi]( x + clip_[-eps,eps]( x_t + alpha * sign(g_t) - x ) )

L2 step (PGD-L2)::

    x_{t+1} = clip_[lo,hi]( x + P_eps( x_t + alpha * g_t / ||g_t||_2 - x ) ),  P_eps(d) = d * min(1, eps/||d||_2)

``g_t`` is the gradient of the summed cross-entropy (negated for a targeted attack); non-finite
gradient entries follow the shared rule of :func:`robustops._gradients.sanitize_gradient`, so every
iterate is finite and inside ``[lo, hi]``. PGD starts from a random point of the eps-ball
(``random_start=True``): uniform in the L-inf box, or a uniformly-scaled Gaussian direction in the
L2 ball. BIM is PGD-L-inf without the random start. With ``seed=None`` the random start draws from
the global RNG (as torchattacks does), else from a generator seeded with ``seed``.

The budget is judged on the returned example: projection then clipping to ``[lo, hi]`` only moves
a coordinate towards ``x``, so ``||x_adv - x|| <= eps`` holds for what is returned.

Speed (issue 9 item 12): the random start is drawn for the whole batch (the same random stream as
torchattacks), then the samples are attacked in chunks of ``batch_size`` (all steps of one chunk,
then the next). On a CPU a chunk whose activations stay small is much faster per sample than one
huge forward/backward (cache and allocator effects: on ``small_cnn`` at 28x28, one thread, a
forward+input-backward of 256 images costs ~1.7x the time of eight chunks of 32), and in eval mode
samples do not interact, so the result is bit-identical to the unchunked attack. The L-inf update
is fused into in-place operations on the step's own buffers (no temporaries per step).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_bounds
from .base import Attack, EpsArg, batch_view, check_nonneg, maybe_progress, per_sample
from .gradients import input_gradient

__all__ = ["PGD", "PGDL2", "BIM", "pgd", "pgd_l2", "bim", "auto_batch_size"]

# Pixels (per channel plane) per chunk on a CPU when batch_size=None, and the smallest chunk.
_CPU_CHUNK_PIXELS = 1 << 16
_CPU_MIN_CHUNK = 16


def auto_batch_size(x: torch.Tensor) -> int:
    """Chunk size used when ``batch_size=None``: the whole batch on an accelerator; on a CPU
    ``65,536 // (H * W)`` samples, at least 16 (83 images of 28x28, 64 of 32x32 whatever the
    channel count, all of a batch of up to 1,024 8x8 digits). Activation sizes follow the spatial
    size times the hidden channels, not the input channels. Measured on one thread (CPU time per
    forward+input-backward of 256 images, chunk 256 / 128 / 83 / 64 / 21 / 8): ``papernot_mnist``
    at 28x28 120 / 99 / 100 / 100 / 112 / 138 ms; ``small_cnn`` at 3x32x32 138 / 86 / 87 / 86 / 99 /
    111 ms; every chunking bit-identical to the whole batch."""
    n = x.shape[0]
    if x.device.type != "cpu":
        return n
    plane = x[0, 0].numel() if x.dim() >= 4 else x[0].numel()
    return max(1, min(n, max(_CPU_MIN_CHUNK, _CPU_CHUNK_PIXELS // max(1, plane))))


def _scaled(value, default: float, lo: float, hi: float):
    """``value``, or ``default`` (given for [0, 1] pixels) scaled by ``hi - lo`` when None."""
    return default * (hi - lo) if value is None else value


def _rows(value, sl: slice):
    return value[sl] if isinstance(value, torch.Tensor) else value


class PGD(Attack):
    """Projected gradient descent in the L-inf ball (Madry et al. 2018).

    Args:
        eps: L-inf budget (number or per-sample tensor ``[N]``); default ``8/255 * (hi - lo)``.
        alpha: step size (number or per-sample tensor); default ``2/255 * (hi - lo)``.
        steps: number of iterations (>= 0).
        random_start: start from a uniform point of the eps-box.
        batch_size: samples attacked together (None: :func:`auto_batch_size`); the result does
            not depend on it for models whose samples do not interact in eval mode. A model with
            a layer that mixes the samples of a batch even in eval mode (e.g.
            ``BatchNorm2d(track_running_stats=False)``) sees other batches: pass
            ``batch_size=len(x)`` to attack it as one batch.
    """

    norm = "inf"
    _default_eps, _default_alpha = 8 / 255, 2 / 255

    def __init__(self, model, eps: Optional[EpsArg] = None, alpha: Optional[EpsArg] = None, steps: int = 10, *,
                 random_start: bool = True, targeted: bool = False, lo: float = 0.0, hi: float = 1.0,
                 batch_size: Optional[int] = None, seed: Optional[int] = None, progress: bool = False):
        super().__init__(model, targeted=targeted, lo=lo, hi=hi, seed=seed, progress=progress)
        eps = _scaled(eps, self._default_eps, self.lo, self.hi)
        alpha = _scaled(alpha, self._default_alpha, self.lo, self.hi)
        for v, name in ((eps, "eps"), (alpha, "alpha")):
            per_sample(v, v.numel() if isinstance(v, torch.Tensor) else 1, name)
        self.eps, self.alpha = eps, alpha
        self.steps = check_nonneg(steps, "steps", integer=True)
        self.random_start = bool(random_start)
        self.batch_size = None if batch_size is None else check_nonneg(batch_size, "batch_size", integer=True,
                                                                       positive=True)

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

    def _update(self, x, x_adv, grad, alpha, eps):
        """One step + projection + clip. ``x_adv`` and ``grad`` are this step's own buffers and
        are overwritten (the L-inf case runs fully in place: bit-identical to the out-of-place
        ``clamp(x + clamp(x_adv + alpha * sign(g) - x, -eps, eps), lo, hi)``)."""
        shape1 = (-1,) + (1,) * (x.dim() - 1)
        if self.norm == "inf":
            if isinstance(alpha, float):
                x_adv.add_(grad.sign_(), alpha=alpha)  # alpha * sign is exact: one rounding, as x + alpha*sign
            else:
                x_adv.add_(grad.sign_().mul_(batch_view(alpha, x)))
            x_adv.sub_(x)
            if isinstance(eps, float):
                x_adv.clamp_(-eps, eps)
            else:
                e = batch_view(eps, x)
                x_adv = torch.maximum(torch.minimum(x_adv, e), -e)
            return x_adv.add_(x).clamp_(self.lo, self.hi)
        n = grad.shape[0]
        gn = grad.reshape(n, -1).norm(p=2, dim=1).view(shape1) + 1e-10
        x_adv = x_adv + batch_view(alpha, x_adv) * (grad / gn)
        delta = x_adv - x
        dn = delta.reshape(n, -1).norm(p=2, dim=1)
        e = eps if isinstance(eps, float) else eps.to(device=x.device, dtype=x.dtype)
        factor = torch.clamp(e / dn.clamp_min(1e-12), max=1.0)
        return torch.clamp(x + delta * factor.view(shape1), self.lo, self.hi)

    def _attack(self, x, y):
        n = x.shape[0]
        eps = per_sample(self.eps, n, "eps")
        alpha = per_sample(self.alpha, n, "alpha")
        x_adv = self._random_start(x, eps) if self.random_start else x.clone()
        if self.steps == 0:
            return x_adv
        bs = self.batch_size or auto_batch_size(x)
        chunks = [slice(s, min(s + bs, n)) for s in range(0, n, bs)]
        bar = maybe_progress(range(len(chunks) * self.steps), self.progress, desc=type(self).__name__)
        it = iter(bar)
        for sl in chunks:
            xc, yc = x[sl], y[sl]
            ac, ec = _rows(alpha, sl), _rows(eps, sl)
            xa = x_adv[sl]
            for _ in range(self.steps):
                next(it, None)
                grad, _ = input_gradient(self.model, xa, yc, targeted=self.targeted)
                xa = self._update(xc, xa if xa._base is None else xa.clone(), grad, ac, ec)
            x_adv[sl] = xa
        return x_adv.detach()


class PGDL2(PGD):
    """Projected gradient descent in the L2 ball; ``alpha`` is the L2 length of each step.

    Defaults: ``eps = 1.0 * (hi - lo)``, ``alpha = 0.2 * (hi - lo)``."""

    norm = "2"
    _default_eps, _default_alpha = 1.0, 0.2

    def __init__(self, model, eps: Optional[EpsArg] = None, alpha: Optional[EpsArg] = None, steps: int = 10, **kw):
        super().__init__(model, eps, alpha, steps, **kw)


def kurakin_steps(eps: float, lo: float = 0.0, hi: float = 1.0) -> int:
    """Kurakin et al. 2017's iteration count ``min(eps' + 4, 1.25 eps')`` with ``eps'`` the budget in
    0..255 intensity units, i.e. ``eps' = 255 * eps / (hi - lo)`` (at least 1 step for eps > 0)."""
    e = 255.0 * float(eps) / (hi - lo)
    return max(int(min(e + 4, 1.25 * e)), 1 if e > 0 else 0)


class BIM(PGD):
    """Basic iterative method (Kurakin et al. 2017): PGD-L-inf from ``x`` itself (no random start).

    Kurakin's rule, in units of the pixel range: ``alpha=None`` is one intensity level,
    ``(hi - lo) / 255``; ``steps=None`` is :func:`kurakin_steps` (``min(eps' + 4, 1.25 eps')``,
    ``eps' = 255 eps / (hi - lo)``; a scalar eps is needed). With bounds ``[0, 255]`` and eps 8:
    alpha 1 and 10 steps.
    """

    def __init__(self, model, eps: Optional[EpsArg] = None, alpha: Optional[EpsArg] = None,
                 steps: Optional[int] = 10, **kw):
        kw.pop("random_start", None)
        lo, hi = check_bounds(kw.get("lo", 0.0), kw.get("hi", 1.0))
        eps = _scaled(eps, 8 / 255, lo, hi)
        alpha = _scaled(alpha, 1 / 255, lo, hi)
        if steps is None:
            if isinstance(eps, torch.Tensor) and eps.numel() != 1:
                raise ValueError("steps=None needs a scalar eps")
            steps = kurakin_steps(per_sample(eps, 1, "eps"), lo, hi)
        super().__init__(model, eps, alpha, steps, random_start=False, **kw)


def pgd(model, x, y, eps: Optional[EpsArg] = None, alpha: Optional[EpsArg] = None, steps: int = 10,
        **kw) -> torch.Tensor:
    """Functional :class:`PGD` (L-inf). Keyword args: random_start, targeted, lo, hi, batch_size, seed, progress."""
    return PGD(model, eps, alpha, steps, **kw)(x, y)


def pgd_l2(model, x, y, eps: Optional[EpsArg] = None, alpha: Optional[EpsArg] = None, steps: int = 10,
           **kw) -> torch.Tensor:
    """Functional :class:`PGDL2`."""
    return PGDL2(model, eps, alpha, steps, **kw)(x, y)


def bim(model, x, y, eps: Optional[EpsArg] = None, alpha: Optional[EpsArg] = None, steps: Optional[int] = 10,
        **kw) -> torch.Tensor:
    """Functional :class:`BIM`."""
    return BIM(model, eps, alpha, steps, **kw)(x, y)
