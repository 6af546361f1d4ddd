"""Auto-PGD (APGD) and its targeted DLR version (APGD-T): Croce & Hein, ICML 2020, "Reliable
evaluation of adversarial robustness with an ensemble of diverse parameter-free attacks", Sec. 3
(Alg. 1) and Sec. 4-5 (DLR loss, targeted DLR).

What the algorithm does (Alg. 1), for a budget of ``N_iter`` steps:

* random start inside the ``eps`` ball, first step size ``eta = 2 eps``;
* a projected step ``z = P(x_k + eta s(grad))`` then momentum between the projected step and the
  previous iterate: ``x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1}))`` (no momentum on the
  first step), fused in the compiled op :func:`robustops.ops.apgd_step`;
* checkpoints ``w_j = ceil(p_j N_iter)`` with ``p_0 = 0``, ``p_1 = 0.22``,
  ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``: at a checkpoint the step size halves and the
  iterate restarts from the best point found when fewer than ``rho = 75%`` of the steps since the
  last checkpoint increased the loss (condition 1), or when neither the step size nor the best
  loss changed since the last checkpoint (condition 2).

Speed-ups that do not change the verdict of any point (iterates are independent per sample):
a point leaves the working batch as soon as it is misclassified (its adversarial example is
kept); APGD-T runs its target classes as one batch (``max_batch`` rows at a time) and drops every
copy of a point once one target breaks it; one forward-backward pass per step gives the gradient,
the loss and the logits of the misclassification check; on a CPU that pass runs over the working
batch in cache-sized pieces (:func:`robustops.attacks._aa.row_slices`: on two threads 9 targets x
103 digits go as 4 passes of ~232 rows, ~25 % less time per row than one pass of 927).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import apgd_step
from ._aa import (apgd_checkpoints, check_eps, check_norm, check_pos_int, check_targets, check_unit, dlr_loss,
                  dlr_loss_targeted, in_row_passes, lp_norm)
from .base import Attack

__all__ = ["APGD", "APGDT", "apgd_run"]

_LOSSES = ("ce", "dlr")


def _random_start(x0: torch.Tensor, eps: float, norm: str, generator, lo: float, hi: float) -> torch.Tensor:
    """Uniform direction in the Linf cube / Gaussian direction for L2, scaled to the sphere of
    radius ``eps`` (as the authors' code: ``x + eps * t / ||t||``), clamped to ``[lo, hi]``."""
    view = (-1,) + (1,) * (x0.dim() - 1)
    if norm == "Linf":
        t = 2 * torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) - 1
    else:
        t = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t = t / (lp_norm(t, norm).reshape(view) + 1e-12)
    return (x0 + eps * t).clamp(lo, hi)


def apgd_run(forward: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, y: torch.Tensor,
             target: Optional[torch.Tensor], group: torch.Tensor, *, norm: str, eps: float, steps: int,
             rho: float, loss: str, eot_iter: int, lo: float, hi: float, generator,
             stats: Optional[dict] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One APGD run (one restart) over the rows of ``x0`` (Alg. 1).

    Args:
        forward: ``x -> logits [R, C]`` (the model through the shared output rule).
        x0: ``[R, ...]`` clean points in ``[lo, hi]``; y: ``[R]`` true labels.
        target: ``[R]`` target classes for the targeted DLR loss, or None.
        group: ``[R]`` point id of each row; once a row is misclassified every row of its group
            leaves the working batch (the rows of one point under different targets).
        loss: ``"ce"``, ``"dlr"`` (untargeted) or ``"dlr-targeted"``.
        stats: optional dict; ``"zero_grad"`` gets the number of rows whose first gradient is 0.

    Returns:
        ``(broken [R] bool, x_adv [R, ...])``: ``x_adv`` is the first misclassified iterate of a
        broken row and ``x0`` elsewhere.
    """
    R = x0.shape[0]
    view = (-1,) + (1,) * (x0.dim() - 1)
    out = x0.clone()
    broken = torch.zeros(R, dtype=torch.bool, device=x0.device)
    if R == 0:
        return broken, out

    def loss_fn(logits, yy, tt):
        if loss == "ce":
            return F.cross_entropy(logits, yy, reduction="none")
        if loss == "dlr":
            return dlr_loss(logits, yy)
        return dlr_loss_targeted(logits, yy, tt)

    def grad_at_rows(xa, yy, tt):
        g = None
        for _ in range(eot_iter):
            xr = xa.detach().requires_grad_(True)
            with torch.enable_grad():
                logits = forward(xr)
                li = loss_fn(logits, yy, tt)
                gi, = torch.autograd.grad(li.sum(), xr)
            g = gi if g is None else g + gi
        if eot_iter > 1:
            g = g / eot_iter
        return g.detach(), logits.detach(), li.detach()

    def grad_at(xa, yy, tt):
        """Loss gradient, logits and loss at ``xa``, in the passes of :func:`row_slices`."""
        return in_row_passes(grad_at_rows, xa, yy, tt)

    idx = torch.arange(R, device=x0.device)
    xw, yw = x0, y
    tw = target
    x_adv = _random_start(xw, eps, norm, generator, lo, hi)
    grad, logits, li = grad_at(x_adv, yw, tw)
    if stats is not None:
        stats["zero_grad"] = stats.get("zero_grad", 0) + int((grad.reshape(R, -1).abs().sum(1) == 0).sum())
    x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), li.clone()
    step = torch.full((R,), 2.0 * eps, dtype=x0.dtype, device=x0.device)
    x_prev = x_adv.clone()
    loss_steps = torch.zeros(steps, R, dtype=li.dtype, device=x0.device)
    best_at_check = loss_best.clone()
    reduced_at_check = torch.ones(R, dtype=torch.bool, device=x0.device)
    checks = set(apgd_checkpoints(steps))
    k = max(int(0.22 * steps), 1)
    k_decr, k_min = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)

    def drop(miss: torch.Tensor):
        """Record the misclassified rows ``miss`` and remove their groups from the working batch."""
        nonlocal idx, xw, yw, tw, x_adv, x_prev, x_best, grad, grad_best, loss_best, step, loss_steps
        nonlocal best_at_check, reduced_at_check, li
        rows = idx[miss]
        out[rows] = x_adv[miss]
        broken[rows] = True
        gone = torch.isin(group[idx], group[rows])
        keep = ~gone
        idx, xw, yw = idx[keep], xw[keep], yw[keep]
        tw = None if tw is None else tw[keep]
        x_adv, x_prev, x_best = x_adv[keep], x_prev[keep], x_best[keep]
        grad, grad_best, loss_best, li = grad[keep], grad_best[keep], loss_best[keep], li[keep]
        step, loss_steps = step[keep], loss_steps[:, keep]
        best_at_check, reduced_at_check = best_at_check[keep], reduced_at_check[keep]

    miss = logits.argmax(1) != yw
    if bool(miss.any()):
        drop(miss)
    for i in range(steps):
        if idx.numel() == 0:
            break
        a = 0.75 if i > 0 else 1.0
        x_new = apgd_step(x_adv, x_prev, xw, grad, step, eps, a, lo, hi, norm)
        x_prev, x_adv = x_adv, x_new
        grad, logits, li = grad_at(x_adv, yw, tw)
        loss_steps[i] = li
        better = li > loss_best
        if bool(better.any()):
            x_best[better] = x_adv[better]
            grad_best[better] = grad[better]
            loss_best = torch.where(better, li, loss_best)
        miss = logits.argmax(1) != yw
        if bool(miss.any()):
            drop(miss)
            if idx.numel() == 0:
                break
        if i in checks:
            # condition 1: fraction of loss increases over the last k steps (the authors' code
            # compares the first of them with row -1, i.e. 0, at the first checkpoint)
            lo_i = i - k + 1
            cur = loss_steps[lo_i:i + 1]
            prev = loss_steps[lo_i - 1:i] if lo_i >= 1 else torch.cat([torch.zeros_like(loss_steps[:1]),
                                                                      loss_steps[:i]])
            n_incr = (cur > prev).sum(0)
            osc = n_incr <= k * rho
            # condition 2: step size not reduced at the last checkpoint and no improvement since
            no_impr = (~reduced_at_check) & (best_at_check >= loss_best)
            fl = osc | no_impr
            reduced_at_check = fl
            best_at_check = loss_best.clone()
            if bool(fl.any()):
                step = torch.where(fl, step / 2.0, step)
                x_adv = torch.where(fl.reshape(view), x_best, x_adv)
                grad = torch.where(fl.reshape(view), grad_best, grad)
            k = max(k - k_decr, k_min)
    return broken, out


class APGD(Attack):
    """APGD (Croce & Hein 2020, Alg. 1) with the cross-entropy or the DLR loss, untargeted.

    Args:
        model: classifier returning logits; inputs in ``[lo, hi]`` (default [0, 1]).
        norm: ``"Linf"`` or ``"L2"``; eps: radius (> 0, pixel units).
        steps: iterations per restart (100 in AutoAttack); n_restarts: random restarts, each on
            the points still classified correctly.
        loss: ``"ce"`` or ``"dlr"`` (DLR needs >= 3 classes); rho: checkpoint threshold (0.75).
        eot_iter: gradient samples averaged per step (expectation over transformation, for
            randomized models; 20 in AutoAttack's ``"rand"`` version).
        seed: seeds the random starts (``torch.Generator``); same seed, same result.

    ``atk(x, y) -> x_adv [N, ...]``: the adversarial example of each broken point, ``x`` elsewhere;
    ``atk.last_success`` ([N] bool) says which. Raises ``ValueError``/``TypeError`` naming a bad
    argument (eps <= 0 or not finite, unknown norm or loss, ...).
    """

    supports_targeted = False

    def __init__(self, model: nn.Module, norm: str = "Linf", eps: float = 8 / 255, steps: int = 100,
                 n_restarts: int = 1, loss: str = "ce", rho: float = 0.75, seed: Optional[int] = 0, *,
                 eot_iter: int = 1, lo: float = 0.0, hi: float = 1.0, progress: bool = False):
        super().__init__(model, lo=lo, hi=hi, seed=seed, progress=progress)
        self.norm = check_norm(norm)
        self.eps = check_eps(eps)
        self.steps = check_pos_int(steps, "steps")
        self.n_restarts = check_pos_int(n_restarts, "n_restarts")
        if loss not in _LOSSES:
            raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}")
        self.loss = loss
        self.rho = check_unit(rho, "rho")
        self.eot_iter = check_pos_int(eot_iter, "eot_iter")
        self.last_success: Optional[torch.Tensor] = None
        self.stats: dict = {}

    @property
    def name(self) -> str:
        return "apgd-ce" if self.loss == "ce" else "apgd-dlr"

    def _check_classes(self, num_classes: int) -> None:
        if self.loss == "dlr" and num_classes < 3:
            raise ValueError(f"the DLR loss needs at least 3 classes, the model has {num_classes}")

    def _attack(self, x, y):
        self._check_classes(self.num_classes)
        success, x_adv = self.perturb(x, y)
        self.last_success = success.cpu()
        return x_adv

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(success [N], x_adv)`` for validated inputs on the model's device, inside the guard."""
        self.stats = {}
        n = x.shape[0]
        success = torch.zeros(n, dtype=torch.bool, device=x.device)
        x_adv = x.clone()
        with torch.no_grad():
            success |= self.logits(x).argmax(1) != y
        for _ in range(self.n_restarts):
            todo = (~success).nonzero()[:, 0]
            if todo.numel() == 0:
                break
            b, adv = apgd_run(self.logits, x[todo], y[todo], None, todo, norm=self.norm, eps=self.eps,
                              steps=self.steps, rho=self.rho, loss=self.loss, eot_iter=self.eot_iter,
                              lo=self.lo, hi=self.hi, generator=self.generator, stats=self.stats)
            x_adv[todo[b]] = adv[b]
            success[todo[b]] = True
        return success, x_adv


class APGDT(APGD):
    """APGD-T: APGD on the targeted DLR loss, over the ``n_target_classes`` classes with the
    highest clean logits after the predicted one (Croce & Hein 2020, Sec. 5; AutoAttack: 9 targets,
    100 steps, 1 restart). Untargeted in effect: a point counts as broken when it leaves its true
    class (``y`` holds the true labels).

    Args (besides :class:`APGD`'s): n_target_classes: number of target classes (<= C - 1; the
    targeted DLR loss needs C >= 4); max_batch: rows (points x targets) attacked at once; targets
    are batched while ``n_points * n_targets <= max_batch``, else run in groups of targets.
    """

    def __init__(self, model: nn.Module, norm: str = "Linf", eps: float = 8 / 255, steps: int = 100,
                 n_target_classes: int = 9, n_restarts: int = 1, seed: Optional[int] = 0, *, rho: float = 0.75,
                 eot_iter: int = 1, max_batch: int = 4096, lo: float = 0.0, hi: float = 1.0,
                 progress: bool = False):
        super().__init__(model, norm=norm, eps=eps, steps=steps, n_restarts=n_restarts, loss="dlr", rho=rho,
                         seed=seed, eot_iter=eot_iter, lo=lo, hi=hi, progress=progress)
        self.n_target_classes = check_pos_int(n_target_classes, "n_target_classes")
        self.max_batch = check_pos_int(max_batch, "max_batch")

    @property
    def name(self) -> str:
        return "apgd-t"

    def _check_classes(self, num_classes: int) -> None:
        if num_classes < 4:
            raise ValueError(f"the targeted DLR loss needs at least 4 classes, the model has {num_classes}")
        check_targets(self.n_target_classes, num_classes)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        self.stats = {}
        n = x.shape[0]
        success = torch.zeros(n, dtype=torch.bool, device=x.device)
        x_adv = x.clone()
        with torch.no_grad():
            logits = self.logits(x)
        success |= logits.argmax(1) != y
        check_targets(self.n_target_classes, logits.shape[1])
        order = logits.argsort(dim=1)  # ascending, as the authors' code (target = order[:, -t])
        t_all = list(range(2, self.n_target_classes + 2))
        for _ in range(self.n_restarts):
            pos = 0
            while pos < len(t_all):
                todo = (~success).nonzero()[:, 0]
                if todo.numel() == 0:
                    return success, x_adv
                per = max(1, min(len(t_all) - pos, self.max_batch // max(1, todo.numel())))
                ts = t_all[pos:pos + per]
                pos += per
                rows = todo.repeat(len(ts))
                targets = torch.cat([order[todo, -t] for t in ts])
                b, adv = apgd_run(self.logits, x[rows], y[rows], targets, rows, norm=self.norm, eps=self.eps,
                                  steps=self.steps, rho=self.rho, loss="dlr-targeted", eot_iter=self.eot_iter,
                                  lo=self.lo, hi=self.hi, generator=self.generator, stats=self.stats)
                if bool(b.any()):
                    hit = rows[b]
                    # the first broken row of each point (target order) supplies its example
                    first = torch.ones_like(hit, dtype=torch.bool)
                    seen = set()
                    for j, p in enumerate(hit.tolist()):
                        if p in seen:
                            first[j] = False
                        seen.add(p)
                    x_adv[hit[first]] = adv[b][first]
                    success[hit] = True
        return success, x_adv
