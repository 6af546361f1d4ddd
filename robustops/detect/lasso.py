"""mu-Lasso by spectral projected gradient (Granda et al., Sec. 4.1, Eq. 1).

    W* = argmin_W || X W - Y ||_F^2   subject to  || w_j ||_1 <= mu  for every column j

with ``X [N, m]`` (one row per sample: the paper's X^T), ``Y [N, C]`` (one-hot labels: the
paper's L^T), ``W [m, C]``. The problem separates over the C columns; all of them are solved
at once, each with its own step length and line search.

Solver: the spectral projected gradient method of Birgin, Martinez & Raydan (2000, "SPG2"),
as used for mu-Lasso by van den Berg & Friedlander (2008, SPGL1):

* search direction ``d = P(w - alpha g) - w`` with ``P`` the exact Euclidean projection onto the
  L1 ball (sort-based, Duchi et al. 2008, Fig. 1);
* ``alpha`` the Barzilai-Borwein step ``<s, s> / <s, y>`` (safeguarded to [alpha_min, alpha_max]);
* non-monotone Armijo line search (Grippo-Lampariello-Lucidi): accept ``w + lam d`` when
  ``f <= max(last M values of f) + gamma * lam * <g, d>``, else backtrack with a safeguarded
  quadratic interpolation. The objective is quadratic, so every trial ``lam`` is evaluated in
  closed form from ``X d`` (or ``G d``): one matrix product per iteration.

Two evaluation modes with the same iterates: ``"gram"`` precomputes ``G = X^T X`` and
``B = X^T Y`` (cost m^2 N once, then m^2 C per iteration) and ``"direct"`` works with X
(2 N m C per iteration). ``mode="auto"`` starts direct and switches to the Gram form once the
iterations run would have paid for building G (ski rental: never more than ~2x the cost of the
better fixed choice; easy problems that converge in a few dozen iterations never build G).
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional

import torch

__all__ = ["project_l1_ball", "mu_lasso", "MuLassoResult", "MuLassoConvergenceWarning"]


def project_l1_ball(v: torch.Tensor, radius) -> torch.Tensor:
    """Euclidean projection of every column of ``v [m, C]`` (or a vector ``[m]``) onto the L1
    ball ``{w : ||w||_1 <= radius}``, exact, by sorting (Duchi et al. 2008, Fig. 1).

    ``radius`` is a number or a tensor ``[C]`` (one radius per column), > 0. Columns already in
    the ball are returned unchanged.
    """
    if v.dim() == 1:
        return _project_rows(v[None, :], torch.as_tensor(radius, dtype=v.dtype, device=v.device).reshape(-1))[0]
    if v.dim() != 2:
        raise ValueError(f"v must be [m] or [m, C], got shape {tuple(v.shape)}")
    r = torch.as_tensor(radius, dtype=v.dtype, device=v.device).reshape(-1)
    return _project_rows(v.T.contiguous(), r).T


def _project_rows(v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Project each row of ``v [C, m]`` onto the L1 ball of radius ``r [C]`` (or ``[1]``)."""
    c, m = v.shape
    r = r.expand(c)
    a = v.abs()
    inside = a.sum(1) <= r
    if bool(inside.all()):
        return v.clone()
    u, _ = torch.sort(a, dim=1, descending=True)
    css = torch.cumsum(u, dim=1) - r[:, None]
    k = torch.arange(1, m + 1, dtype=v.dtype, device=v.device)
    cond = u * k > css                                   # holds for k = 1..rho (a prefix in exact arithmetic)
    rho = (cond.to(torch.int64) * torch.arange(m, device=v.device)).amax(1)   # last k where it holds
    theta = css.gather(1, rho[:, None]) / (rho[:, None].to(v.dtype) + 1)
    theta = torch.where(inside[:, None], torch.zeros_like(theta), theta.clamp_min(0))
    w = torch.sign(v) * (a - theta).clamp_min(0)
    # |v| - theta cancels when |v| >> r; rescale the (tiny) rounding excess so w stays feasible
    l1 = w.abs().sum(1, keepdim=True)
    return torch.where(l1 > r[:, None], w * (r[:, None] / l1.clamp_min(1e-300)), w)


class MuLassoConvergenceWarning(UserWarning):
    """The mu-Lasso stopped at ``max_iter`` before its duality gap met ``tol``: the support of an
    unconverged solution is larger than the optimum's (on Papernot's net, 1,000 iterations left
    369 non-zero weights where the optimum has 110) and depends on the solver's path."""


class MuLassoResult(NamedTuple):
    """``W [m, C]``; objective per column ``[C]`` (||X w_j - y_j||^2); iterations run; whether
    every column met the tolerance; the final duality gap per column ``[C]``."""

    W: torch.Tensor
    objective: torch.Tensor
    iterations: int
    converged: bool
    gap: torch.Tensor


def _check_mu(mu, c: int, dtype, device) -> torch.Tensor:
    if isinstance(mu, bool):
        raise TypeError(f"mu must be a number > 0, got {mu!r}")
    if isinstance(mu, torch.Tensor):
        t = mu.detach().to(dtype=dtype, device=device).flatten()
    else:
        try:
            t = torch.tensor([float(mu)], dtype=dtype, device=device)
        except (TypeError, ValueError):
            raise TypeError(f"mu must be a number > 0 (or a tensor [C]), got {type(mu).__name__}") from None
    if t.numel() not in (1, c):
        raise ValueError(f"mu must be one number or one per class ({c}), got {t.numel()} values")
    if not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
        raise ValueError(f"mu must be > 0 and finite, got {t.tolist() if t.numel() < 12 else t}")
    return t.expand(c).clone()


class _Ops:
    """The products the solver needs, in the direct form (with X) or the Gram form (G = X^T X)."""

    def __init__(self, X: torch.Tensor, Yt: torch.Tensor):
        self.X, self.Yt = X, Yt
        self.yy = (Yt * Yt).sum(1)                           # ||y_j||^2
        self.gram = False
        self.Xt = X.T.contiguous()                           # [m, N]

    def to_gram(self):
        if not self.gram:
            self.G = self.X.T @ self.X                       # [m, m], symmetric
            self.Bt = self.Yt @ self.X                       # [C, m] = (X^T Y)^T
            self.gram = True

    def to_direct(self):
        self.gram = False

    def apply(self, Dt):                                     # Gram: Dt G; direct: (X D)^T
        return Dt @ self.G if self.gram else Dt @ self.Xt

    def grad(self, Qt):
        return 2 * (Qt - self.Bt) if self.gram else 2 * ((Qt - self.Yt) @ self.X)

    def fval(self, Wt, Qt):
        if self.gram:
            return (Wt * Qt).sum(1) - 2 * (Wt * self.Bt).sum(1) + self.yy
        return ((Qt - self.Yt) ** 2).sum(1)

    def curv(self, Dt, DQt):
        return (Dt * DQt).sum(1) if self.gram else (DQt * DQt).sum(1)


def mu_lasso(X: torch.Tensor, Y: torch.Tensor, mu, *, max_iter: int = 3000, tol: float = 1e-6,
             memory: int = 10, mode: str = "auto", W0: Optional[torch.Tensor] = None,
             dtype: Optional[torch.dtype] = None, nonneg: bool = False) -> MuLassoResult:
    """Solve the mu-Lasso ``min ||X W - Y||_F^2  s.t.  ||w_j||_1 <= mu`` for all columns at once.

    Args:
        X: features ``[N, m]`` (floating; CPU or CUDA). One row per sample.
        Y: targets ``[N, C]`` (e.g. one-hot labels), or int64 labels ``[N]`` (one-hot encoded
            here with ``C = max(label) + 1``).
        mu: L1 budget per column, > 0: a number or a tensor ``[C]``.
        max_iter: iteration cap (>= 1).
        tol: stop when every column's duality gap is at most ``tol * max(f_j, tol)``, a bound
            on the relative distance of the objective ``f_j`` to its optimum. The gap of column
            j at ``w`` with gradient ``g = 2 X^T (X w - y)`` is ``mu ||g||_inf + <w, g>`` (>= 0
            for feasible w; 0 exactly at the optimum).
        memory: M of the non-monotone line search (1 = monotone Armijo).
        mode: ``"gram"``, ``"direct"`` or ``"auto"`` (see module docstring).
        W0: starting point ``[m, C]`` (projected first); zeros by default.
        dtype: computation dtype (default: X's; float16/bfloat16 X is computed in float32).
        nonneg: also require ``W >= 0`` (the feasible set becomes ``{w >= 0, sum(w) <= mu}``;
            its projection is the L1-ball projection of ``max(v, 0)``, and the gap uses
            ``mu max(0, max(-g))`` in place of ``mu ||g||_inf``). SPAMS' ``lasso(mode=0,
            pos=True)`` solves this form.

    Returns:
        :class:`MuLassoResult` (``W [m, C]`` exactly sparse: the projection zeroes entries;
        ``objective [C]`` recomputed from the residual; ``gap [C]`` the final duality gaps).

    Raises:
        ValueError: bad shapes, non-finite values, ``mu <= 0``, empty X, bad options.
        TypeError: non-tensor inputs, integer X, a non-numeric mu.

    Warns:
        MuLassoConvergenceWarning: the iterations ran out (``max_iter``) before every gap met
        ``tol``. (Stopping because no descent direction is left -- the rounding floor of a
        tolerance below what the arithmetic resolves -- does not warn; ``converged`` is then
        False as well.)

    Source: Granda et al. (relevant-neurons-detection-granda.txt) Eq. 1; Birgin, Martinez &
    Raydan 2000 (SPG); van den Berg & Friedlander 2008 (SPGL1: duality gap); Duchi et al. 2008
    (L1-ball projection).
    """
    if not isinstance(X, torch.Tensor) or not isinstance(Y, torch.Tensor):
        raise TypeError("X and Y must be torch tensors")
    if X.dim() != 2:
        raise ValueError(f"X must be [N, m], got shape {tuple(X.shape)}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X is empty, shape {tuple(X.shape)}")
    if not X.is_floating_point():
        raise TypeError(f"X must be floating point, got {X.dtype}")
    if Y.dim() == 1:
        if Y.is_floating_point() or Y.dtype == torch.bool:
            raise TypeError(f"1-D Y must hold integer labels, got {Y.dtype}")
        if Y.numel() and int(Y.min()) < 0:
            raise ValueError("labels in Y must be >= 0")
        Y = torch.nn.functional.one_hot(Y.long(), int(Y.max()) + 1)
    if Y.dim() != 2 or Y.shape[0] != X.shape[0]:
        raise ValueError(f"Y must be [N, C] with N = {X.shape[0]} (X's rows), got shape {tuple(Y.shape)}")
    if mode not in ("auto", "gram", "direct"):
        raise ValueError(f"mode must be 'auto', 'gram' or 'direct', got {mode!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    if isinstance(memory, bool) or not isinstance(memory, int) or memory < 1:
        raise ValueError(f"memory must be an int >= 1, got {memory!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    dtype = dtype or (X.dtype if X.dtype in (torch.float32, torch.float64) else torch.float32)
    X = X.to(dtype)
    Y = Y.to(device=X.device, dtype=dtype)
    if not bool(torch.isfinite(X).all()) or not bool(torch.isfinite(Y).all()):
        raise ValueError("X and Y must be finite (NaN or Inf found)")
    n, m = X.shape
    c = Y.shape[1]
    mu_t = _check_mu(mu, c, dtype, X.device)
    nonneg = bool(nonneg)

    def project(Vt):
        return _project_rows(Vt.clamp_min(0) if nonneg else Vt, mu_t)

    # Rows are classes below (Wt [C, m]) so the projection sorts contiguous rows.
    Yt = Y.T.contiguous()                                    # [C, N]
    ops = _Ops(X, Yt)
    switch_at = None
    if mode == "gram":
        ops.to_gram()
    elif mode == "auto":
        # ski rental: iterate with X; once the iterations spent would have paid for G = X^T X
        # (m^2 N) plus cheaper Gram iterations (m^2 C each, vs 2 N m C), build G and switch.
        per_direct, per_gram = 2 * n * m * c, m * m * c
        if per_gram < per_direct:
            switch_at = max(1, int(math.ceil(m * m * n / (per_direct - per_gram))))

    if W0 is None:
        Wt = torch.zeros(c, m, dtype=dtype, device=X.device)
    else:
        if not isinstance(W0, torch.Tensor) or W0.shape != (m, c):
            raise ValueError(f"W0 must be a tensor [m, C] = [{m}, {c}], got {getattr(W0, 'shape', type(W0))}")
        Wt = project(W0.to(device=X.device, dtype=dtype).T.contiguous())
    Qt = ops.apply(Wt)
    g = ops.grad(Qt)
    f = ops.fval(Wt, Qt)

    scale = max(1.0, float(g.abs().max()))
    alpha_min, alpha_max = 1e-10, 1e6 / scale

    def gap_of(Wt, g):
        support = (-g).amax(1).clamp_min(0) if nonneg else g.abs().amax(1)   # max over the set of <w, -g>
        return (mu_t * support + (Wt * g).sum(1)).clamp_min(0)

    d0 = project(Wt - g) - Wt                   # first step: 1 / ||P(w - g) - w||_inf (SPG2)
    alpha = (1.0 / d0.abs().amax(1).clamp_min(1e-30)).clamp(alpha_min, alpha_max)
    hist = f[None, :].repeat(memory, 1)
    gamma = 1e-4
    converged = floor = False
    it = 0
    gap = gap_of(Wt, g)
    for it in range(max_iter):
        gap = gap_of(Wt, g)
        if bool((gap <= tol * torch.clamp(f, min=tol)).all()):
            converged = True
            break
        Dt = project(Wt - alpha[:, None] * g) - Wt
        gd = (g * Dt).sum(1)                                 # < 0 unless D = 0
        DQt = ops.apply(Dt)
        dqd = ops.curv(Dt, DQt)                                  # f(W + lam D) = f + lam gd + lam^2 dqd
        fref = hist.amax(0)
        lam = torch.ones_like(f)
        active = gd < 0
        if not bool(active.any()):                           # no descent direction left: rounding floor
            floor = True
            break
        for _ in range(60):
            fnew = f + lam * gd + lam * lam * dqd
            ok = (fnew <= fref + gamma * lam * gd) | ~active
            if bool(ok.all()):
                break
            # safeguarded quadratic interpolation
            denom = 2 * (fnew - f - lam * gd)
            lt = torch.where(denom > 0, -gd * lam * lam / denom.clamp_min(1e-300), 0.5 * lam)
            lt = torch.minimum(torch.maximum(lt, 0.1 * lam), 0.5 * lam)
            lam = torch.where(ok, lam, lt)
        lam = torch.where(active, lam, torch.zeros_like(lam))
        St = lam[:, None] * Dt
        Wt = Wt + St
        Qt = Qt + lam[:, None] * DQt
        g_new = ops.grad(Qt)
        f = ops.fval(Wt, Qt)
        Yd = g_new - g
        g = g_new
        sts = (St * St).sum(1)
        sty = (St * Yd).sum(1)
        # BB step; no curvature along s (G is singular when N < m): keep the previous step
        alpha = torch.where(sty > 1e-12 * sts, sts / sty.clamp_min(1e-300), alpha)
        alpha = alpha.clamp(alpha_min, alpha_max)
        hist = torch.cat([hist[1:], f[None, :]], 0)
        if switch_at is not None and it + 1 == switch_at:
            ops.to_gram()
            Qt = ops.apply(Wt)                               # same iterate, Gram representation
    if not (converged or floor):
        worst = float((gap / torch.clamp(f, min=tol)).max())   # the stopping rule's own ratio
        warnings.warn(f"mu_lasso stopped at max_iter={max_iter} with a relative duality gap of {worst:.3g} "
                      f"(tol={tol:g}): the solution is not the optimum, and its support (the relevant "
                      "neurons) is larger than the optimum's and path-dependent; raise max_iter",
                      MuLassoConvergenceWarning, stacklevel=2)
    W = Wt.T.contiguous()
    obj = ((X @ W - Y) ** 2).sum(0)                          # from the residual: no cancellation
    return MuLassoResult(W, obj, it, converged, gap)
