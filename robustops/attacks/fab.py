"""FAB: the fast adaptive boundary attack (Croce & Hein, ICML 2020, "Minimally distorted
adversarial examples with a fast adaptive boundary attack"), untargeted and targeted (FAB-T, the
version in AutoAttack: Croce & Hein 2020, "Reliable evaluation ...", Sec. 5).

Each iteration (FAB paper, Sec. 3, eq. 5-9) linearises the classifier at the iterate ``x_k``,
takes the decision hyperplane ``pi_s`` of the closest class ``s`` (untargeted: the class with the
smallest ``|f_s| / ||grad f_s||_q``; targeted: the target), projects both the iterate and the clean
point ``x_orig`` onto ``pi_s`` inside the box (:func:`robustops.ops.fab_projection`, the compiled
per-sample sort-based projection), and moves to the convex combination

    x_{k+1} = clip((1 - alpha)(x_k + eta d_k) + alpha (x_orig + eta d_orig)),
    alpha = min(||d_k|| / (||d_k|| + ||d_orig||), alpha_max)

with ``eta = 1.05`` (extrapolation), ``alpha_max = 0.1``; when ``x_{k+1}`` is misclassified it is
kept if it is the closest so far and the iterate goes back towards ``x_orig``:
``x_orig + beta (x_{k+1} - x_orig)``, ``beta = 0.9``. Restarts after the first start from a random
point at distance ``eps / 2`` (untargeted FAB; FAB-T in AutoAttack uses one restart).

A point counts as broken when an adversarial example within ``eps`` was found. With
``early_stop=True`` (default, what AutoAttack needs) a point leaves the working batch as soon as
that happens, which cannot change the verdict; ``early_stop=False`` keeps refining it towards the
minimal perturbation, as the paper's minimum-norm attack. FAB-T runs its targets as one batch; on
a CPU each forward(-backward) pass goes over it in cache-sized pieces
(:func:`robustops.attacks._aa.row_slices`). Each step needs two passes: the linearisation at
``x_k`` and the check of ``x_{k+1}``; they cannot share one, because an adversarial ``x_{k+1}`` is
moved back towards ``x_orig`` before the next linearisation, and on robust points that happens at
almost every step (measured: 97 % of the rows of FAB-T on the benchmark's digits), so a fused pass
would need a second gradient pass for those rows.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import nn

from ..ops import fab_projection
from ._aa import check_eps, check_norm, check_pos_int, check_targets, check_unit, in_row_passes, lp_norm
from .base import Attack

__all__ = ["FAB", "fab_run"]


def _class_gradients(forward, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor], norm: str):
    """``(df [R], dg [R, ...], logits)``: the value and gradient of ``f_s - f_y`` at ``x`` for the
    hyperplane FAB projects on (the target, or the closest class in the dual norm); computed in
    the passes of :func:`row_slices`."""
    return in_row_passes(lambda xs, ys, ts: _class_gradients_rows(forward, xs, ys, ts, norm), x, y, target)


def _class_gradients_rows(forward, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor], norm: str):
    xr = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = forward(xr)
        if target is not None:
            diff = logits.gather(1, target[:, None])[:, 0] - logits.gather(1, y[:, None])[:, 0]
            dg, = torch.autograd.grad(diff.sum(), xr)
            return diff.detach(), dg.detach(), logits.detach()
        C = logits.shape[1]
        grads = []
        for c in range(C):
            g, = torch.autograd.grad(logits[:, c].sum(), xr, retain_graph=c < C - 1)
            grads.append(g)
    g = torch.stack(grads, 1)                                      # [R, C, ...]
    z = logits.detach()
    rows = torch.arange(x.shape[0], device=x.device)
    df = z - z[rows, y][:, None]
    dg = g - g[rows, y][:, None]
    df[rows, y] = 1e10
    flat = dg.reshape(dg.shape[0], dg.shape[1], -1)
    dual = flat.abs().sum(-1) if norm == "Linf" else flat.norm(dim=-1)
    s = (df.abs() / (dual + 1e-12)).argmin(1)
    return df[rows, s], dg[rows, s], z


def fab_run(forward: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, y: torch.Tensor,
            target: Optional[torch.Tensor], group: torch.Tensor, *, norm: str, eps: float, steps: int,
            alpha_max: float, eta: float, beta: float, rand_start: bool, early_stop: bool, lo: float,
            hi: float, generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """One FAB run over the rows of ``x0`` (``target`` None: untargeted).

    Returns ``(dist [R], x_adv [R, ...])``: the norm of the closest adversarial example found
    (``inf`` when none) and that example (``x0`` when none). With ``early_stop`` every row of a
    group leaves the batch once one row has ``dist <= eps``.
    """
    R = x0.shape[0]
    view = (-1,) + (1,) * (x0.dim() - 1)
    best = x0.clone()
    dist = torch.full((R,), float("inf"), dtype=x0.dtype, device=x0.device)
    if R == 0:
        return dist, best
    x1 = x0.clone()
    if rand_start:
        if norm == "Linf":
            t = 2 * torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) - 1
        else:
            t = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x1 = (x0 + 0.5 * eps * t / lp_norm(t, norm).reshape(view)).clamp(lo, hi)
    idx = torch.arange(R, device=x0.device)
    xw, yw, tw = x0, y, target
    res = dist.clone()
    adv = x0.clone()
    for _ in range(steps):
        if idx.numel() == 0:
            break
        W = idx.numel()
        df, dg, _ = _class_gradients(forward, x1, yw, tw, norm)
        w = dg.reshape(W, -1)
        x1f = x1.reshape(W, -1)
        b = -df + (w * x1f).sum(1)
        d3 = fab_projection(torch.cat((x1f, xw.reshape(W, -1))), torch.cat((w, w)), torch.cat((b, b)), lo, hi, norm)
        a0 = lp_norm(d3, norm).clamp(min=1e-8)
        a1, a2 = a0[:W], a0[W:]
        alpha = (a1 / (a1 + a2)).clamp(0.0, alpha_max).reshape(view)
        d1, d2 = d3[:W].reshape(x1.shape), d3[W:].reshape(x1.shape)
        x1 = ((x1 + eta * d1) * (1 - alpha) + (xw + d2 * eta) * alpha).clamp(lo, hi)
        with torch.no_grad():
            is_adv = in_row_passes(forward, x1).argmax(1) != yw
        if bool(is_adv.any()):
            t = lp_norm(x1 - xw, norm)
            closer = is_adv & (t < res)
            adv = torch.where(closer.reshape(view), x1, adv)
            res = torch.where(closer, t, res)
            x1 = torch.where(is_adv.reshape(view), xw + (x1 - xw) * beta, x1)
            if early_stop:
                done = res <= eps
                if bool(done.any()):
                    rows = idx[done]
                    best[rows] = adv[done]
                    dist[rows] = res[done]
                    keep = ~torch.isin(group[idx], group[rows])
                    idx, xw, yw, x1, adv, res = idx[keep], xw[keep], yw[keep], x1[keep], adv[keep], res[keep]
                    tw = None if tw is None else tw[keep]
    if idx.numel():
        best[idx] = adv
        dist[idx] = res
    return dist, best


class FAB(Attack):
    """FAB / FAB-T (Croce & Hein 2020) for the Linf and L2 norms.

    Args:
        model: classifier returning logits; inputs in ``[lo, hi]``.
        norm: ``"Linf"`` or ``"L2"``; eps: radius (> 0) a point must be broken within.
        steps: iterations per restart (100); targeted: FAB-T over ``n_target_classes`` targets
            (the classes with the highest clean logits after the predicted one; ``y`` still holds
            the true labels), else untargeted FAB; n_restarts: restarts (random start after the
            first); alpha_max, eta, beta: the paper's 0.1, 1.05, 0.9.
        early_stop: stop refining a point once an adversarial example within ``eps`` is found.
        max_batch: rows (points x targets) attacked at once.

    ``atk(x, y) -> x_adv``: the closest adversarial example found when its norm is ``<= eps``,
    ``x`` elsewhere; ``atk.last_success`` [N] and ``atk.last_distance`` [N] (``inf``: none found).
    """

    supports_targeted = False

    def __init__(self, model: nn.Module, norm: str = "Linf", eps: float = 8 / 255, steps: int = 100,
                 targeted: bool = True, n_target_classes: int = 9, n_restarts: int = 1, seed: Optional[int] = 0, *,
                 alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9, early_stop: bool = True,
                 max_batch: int = 4096, lo: float = 0.0, hi: float = 1.0, progress: bool = False):
        super().__init__(model, lo=lo, hi=hi, seed=seed, progress=progress)
        self.norm = check_norm(norm)
        self.eps = check_eps(eps)
        self.steps = check_pos_int(steps, "steps")
        self.fab_targeted = bool(targeted)
        self.n_target_classes = check_pos_int(n_target_classes, "n_target_classes")
        self.n_restarts = check_pos_int(n_restarts, "n_restarts")
        self.alpha_max = check_unit(alpha_max, "alpha_max")
        self.eta = check_unit(eta, "eta", 0.0, 10.0)
        self.beta = check_unit(beta, "beta")
        self.early_stop = bool(early_stop)
        self.max_batch = check_pos_int(max_batch, "max_batch")
        self.last_success: Optional[torch.Tensor] = None
        self.last_distance: Optional[torch.Tensor] = None

    @property
    def name(self) -> str:
        return "fab-t" if self.fab_targeted else "fab"

    def _check_classes(self, num_classes: int) -> None:
        if self.fab_targeted:
            check_targets(self.n_target_classes, num_classes)

    def _attack(self, x, y):
        self._check_classes(self.num_classes)
        success, x_adv, dist = self.perturb(x, y, return_distance=True)
        self.last_success, self.last_distance = success.cpu(), dist.cpu()
        return x_adv

    def perturb(self, x: torch.Tensor, y: torch.Tensor, return_distance: bool = False):
        """``(success [N], x_adv)`` (``+ dist [N]``) for validated inputs inside the model guard."""
        n = x.shape[0]
        with torch.no_grad():
            logits = self.logits(x)
        success = logits.argmax(1) != y
        dist = torch.where(success, torch.zeros(n, dtype=x.dtype, device=x.device),
                           torch.full((n,), float("inf"), dtype=x.dtype, device=x.device))
        x_adv = x.clone()
        kw = dict(norm=self.norm, eps=self.eps, steps=self.steps, alpha_max=self.alpha_max, eta=self.eta,
                  beta=self.beta, early_stop=self.early_stop, lo=self.lo, hi=self.hi, generator=self.generator)

        def merge(rows, d, adv):
            """Keep, per point, its closest example over its rows (targets / restarts)."""
            dmin = torch.full((n,), float("inf"), dtype=d.dtype, device=d.device)
            dmin.scatter_reduce_(0, rows, d, "amin")
            pick = (d == dmin[rows]) & torch.isfinite(d)
            r = rows[pick]
            closer = d[pick] < dist[r]
            dist[r[closer]] = d[pick][closer]
            x_adv[r[closer]] = adv[pick][closer]
            success[r] |= d[pick] <= self.eps

        if not self.fab_targeted:
            for restart in range(self.n_restarts):
                todo = (~success).nonzero()[:, 0]
                if todo.numel() == 0:
                    break
                d, adv = fab_run(self.logits, x[todo], y[todo], None, todo, rand_start=restart > 0, **kw)
                merge(todo, d, adv)
        else:
            check_targets(self.n_target_classes, logits.shape[1])
            order = logits.argsort(dim=1)
            t_all = list(range(2, self.n_target_classes + 2))
            for restart in range(self.n_restarts):
                pos = 0
                while pos < len(t_all):
                    todo = (~success).nonzero()[:, 0]
                    if todo.numel() == 0:
                        break
                    per = max(1, min(len(t_all) - pos, self.max_batch // max(1, todo.numel())))
                    ts = t_all[pos:pos + per]
                    pos += per
                    rows = todo.repeat(len(ts))
                    targets = torch.cat([order[todo, -t] for t in ts])
                    d, adv = fab_run(self.logits, x[rows], y[rows], targets, rows, rand_start=restart > 0, **kw)
                    merge(rows, d, adv)
        # an example further than eps is not returned (x instead), as in AutoAttack
        x_adv = torch.where(success.reshape((-1,) + (1,) * (x.dim() - 1)), x_adv, x)
        if return_distance:
            return success, x_adv, dist
        return success, x_adv
