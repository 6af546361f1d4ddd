"""Square Attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020, "Square attack: a
query-efficient black-box adversarial attack via random search"), Linf (Alg. 2) and L2 (Alg. 3),
with the margin loss and the settings of AutoAttack (5,000 queries, ``p_init = 0.8``).

Random search on the margin ``z_y - max_{i != y} z_i`` using only forward passes (so it is immune
to gradient masking): start from vertical stripes of ``+-eps`` (Linf) or a grid of the L2
"eta" blocks; at each iteration change one square window of side ``s`` (``s^2 / (h w) ~ p``, ``p``
halving on the authors' schedule at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000) and
keep the change when the margin decreases. A point leaves the working batch once misclassified.

Linf queries the model only where the margin can change (same search path as querying every row,
see :meth:`Square._loop`): not on proposals equal to the current best, not on a proposal a row
already tried (and rejected) from its current best, and not at all once every row has tried every
proposal of the last schedule stage. On the 8x8 digits of the benchmark (97 robust points, 5,000
iterations) this sends 41,595 rows through the model instead of 490,392 for the authors' code.

Linf: each image gets its own window position and per-channel signs ``+-eps`` (Alg. 2 of the
paper; the AutoAttack code draws one window and one sign vector for the whole batch). L2: the
window positions are drawn once per iteration for the batch, the signs per image (as the
AutoAttack code).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from ._aa import check_eps, check_norm, check_pos_int, check_unit, lp_norm
from .base import Attack

__all__ = ["Square", "p_selection"]


def p_selection(p_init: float, it: int, n_queries: int, rescale: bool = False) -> float:
    """Fraction of pixels changed at iteration ``it`` (the authors' piecewise-constant schedule)."""
    if rescale:
        it = int(it / n_queries * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                       (8000, 256)):
        if it <= bound:
            return p_init / div
    return p_init / 512


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    zy = logits.gather(1, y[:, None])[:, 0]
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return zy - other


def _eta_rectangles(x: int, y: int, device, dtype) -> torch.Tensor:
    delta = torch.zeros(x, y, device=device, dtype=dtype)
    xc, yc = x // 2 + 1, y // 2 + 1
    c0, c1 = xc - 1, yc - 1
    for k in range(max(xc, yc)):
        delta[max(c0, 0):min(c0 + 2 * k + 1, x), max(0, c1):min(c1 + 2 * k + 1, y)] += 1.0 / (k + 1) ** 2
        c0 -= 1
        c1 -= 1
    return delta / delta.square().sum().sqrt()


def _eta(s: int, flip: bool, device, dtype) -> torch.Tensor:
    """The L2 window of the paper (Sec. 3.2): two opposite-sign centred rectangles, unit norm."""
    delta = torch.zeros(s, s, device=device, dtype=dtype)
    delta[:s // 2] = _eta_rectangles(s // 2, s, device, dtype)
    delta[s // 2:] = -_eta_rectangles(s - s // 2, s, device, dtype)
    delta = delta / delta.square().sum().sqrt()
    return delta.t() if flip else delta


class Square(Attack):
    """Square Attack, untargeted, margin loss (Andriushchenko et al. 2020).

    Args:
        model: classifier returning logits; inputs ``[N, C, H, W]`` in ``[lo, hi]``.
        norm: ``"Linf"`` or ``"L2"``; eps: radius (> 0).
        n_queries: iterations (one forward of the working batch each; 5,000 in AutoAttack).
        p_init: initial fraction of pixels changed (0.8); n_restarts: restarts on unbroken points.
        rescale_schedule: stretch the ``p`` schedule to ``n_queries`` (False in AutoAttack).

    ``atk(x, y) -> x_adv``: misclassified example within ``eps`` where found, ``x`` elsewhere;
    ``atk.last_success`` [N] and ``atk.last_queries`` [N] (queries used per point).
    """

    supports_targeted = False

    def __init__(self, model: nn.Module, norm: str = "Linf", eps: float = 8 / 255, n_queries: int = 5000,
                 p_init: float = 0.8, n_restarts: int = 1, seed: Optional[int] = 0, *,
                 rescale_schedule: bool = False, lo: float = 0.0, hi: float = 1.0, progress: bool = False):
        super().__init__(model, lo=lo, hi=hi, seed=seed, progress=progress)
        self.norm = check_norm(norm)
        self.eps = check_eps(eps)
        self.n_queries = check_pos_int(n_queries, "n_queries")
        self.p_init = check_unit(p_init, "p_init")
        self.n_restarts = check_pos_int(n_restarts, "n_restarts")
        self.rescale_schedule = bool(rescale_schedule)
        self.last_success: Optional[torch.Tensor] = None
        self.last_queries: Optional[torch.Tensor] = None
        self._converged_at: list = []  # iterations where a restart's search converged (all proposals tried)

    name = "square"

    def _attack(self, x, y):
        success, x_adv = self.perturb(x, y)
        self.last_success = success.cpu()
        return x_adv

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 4:
            raise ValueError(f"Square needs images [N, C, H, W], got shape {tuple(x.shape)}")
        n = x.shape[0]
        self._converged_at = []
        with torch.no_grad():
            success = self.logits(x).argmax(1) != y
            x_adv = x.clone()
            queries = torch.zeros(n, dtype=torch.long, device=x.device)
            for _ in range(self.n_restarts):
                todo = (~success).nonzero()[:, 0]
                if todo.numel() == 0:
                    break
                run = self._run_linf if self.norm == "Linf" else self._run_l2
                b, adv, q = run(x[todo], y[todo])
                x_adv[todo[b]] = adv[b]
                success[todo[b]] = True
                queries[todo] += q
        self.last_queries = queries.cpu()
        return success, x_adv

    # ---- helpers ---------------------------------------------------------------------------
    def _sign(self, shape, like: torch.Tensor) -> torch.Tensor:
        r = torch.rand(shape, generator=self.generator, device=like.device, dtype=like.dtype)
        return torch.sign(2 * r - 1)

    def _randint(self, high: int, size, device) -> torch.Tensor:
        """Integers in ``[0, high)`` (``high <= 0`` gives 0), as ``long(high * U[0, 1))``."""
        if high <= 0:
            return torch.zeros(size, dtype=torch.long, device=device)
        return (high * torch.rand(size, generator=self.generator, device=device)).long()

    def _loop(self, x, y, x_best, margin, propose, skip_unchanged: bool = False, final_from: Optional[int] = None):
        """The random-search loop shared by both norms: ``propose(i, xw, xbw) -> (x_new, key)`` (``x``
        holds per-point data the proposal needs, compacted with the working batch; ``key`` is None or
        ``(stage, code [W] long, n_codes)``: ``code`` names the proposal of each row among the
        ``n_codes`` a proposal of schedule stage ``stage`` can be, e.g. window corner and signs).

        ``skip_unchanged`` (Linf) queries the model only on the rows whose margin can change, with
        the same search path (random draws, acceptances, ``last_queries``) as querying every row:

        * a proposal identical to the current best (the window's new signs equal the current ones,
          or the box clips them away) cannot lower the margin under the strict ``m_new < m``
          acceptance;
        * a proposal is a deterministic function of the current best and its code, so a code already
          tried (and rejected, else the best would have changed) from the same best gives the same
          margin and is rejected again: each row remembers the codes it tried since its best last
          changed (``n_codes`` is small for small images: 98 one-pixel proposals on an 8x8 digit,
          where Square spends 80% of its 5,000 iterations) and is not queried on a repeat;
        * from iteration ``final_from`` on the proposal stage no longer changes (``p`` has reached its
          last value before ``n_queries``); once every row of the working batch has tried every code
          of that stage (with no acceptance since), every later proposal is a repeat and rejected:
          the search has converged, and the loop stops after drawing the random numbers the
          remaining iterations would have drawn (``propose(i, xw, xbw, draw_only=True)``), so the
          generator ends in the same state.

        Skipped rows still count as iterations in ``last_queries`` (the authors' convention:
        queries = iterations per point). Assumes a deterministic model (AutoAttack flags others)."""
        n = x.shape[0]
        finished = torch.full((n,), self.n_queries + 1, dtype=torch.long, device=x.device)
        out = x_best.clone()
        done = margin <= 0
        finished[done] = 1
        idx = (~done).nonzero()[:, 0]
        xw, yw, xbw, mw = x[idx], y[idx], x_best[idx], margin[idx]  # fresh tensors, updated in place
        tried, stage_now = None, None
        for i in range(self.n_queries):
            W = idx.numel()
            if W == 0:
                break
            x_new, key = propose(i, xw, xbw)
            if skip_unchanged:
                query = (x_new != xbw).flatten(1).any(1)
                if key is not None:
                    stage, code, n_codes = key
                    if stage != stage_now:
                        stage_now = stage
                        tried = (torch.zeros(W, n_codes, dtype=torch.bool, device=x.device)
                                 if W * n_codes <= 1 << 25 else None)
                    if tried is not None:
                        rows = torch.arange(W, device=x.device)
                        query &= ~tried[rows, code]
                        tried[rows, code] = True
                ch = query.nonzero()[:, 0]
                if ch.numel() == 0:
                    # nothing can be accepted this iteration; converged when every code was tried
                    if (tried is not None and final_from is not None and i >= final_from
                            and bool(tried.all())):
                        for j in range(i + 1, self.n_queries):
                            propose(j, xw, xbw, draw_only=True)
                        self._converged_at.append(i)
                        break
                    continue
                if ch.numel() == W:
                    m_ch = _margin(self.logits(x_new), yw)
                else:
                    m_ch = _margin(self.logits(x_new[ch]), yw[ch])
            else:
                ch = None
                m_ch = _margin(self.logits(x_new), yw)
            # accept strict improvements (in place: mw and xbw are this loop's own tensors)
            better = m_ch < (mw if ch is None else mw[ch])
            if not bool(better.any()):
                continue
            acc = better.nonzero()[:, 0] if ch is None else ch[better]
            mw[acc] = m_ch[better]
            xbw[acc] = x_new[acc]
            if tried is not None:
                tried[acc] = False  # a new best: its proposals are all untried
            fooled = mw <= 0
            if bool(fooled.any()):
                rows = idx[fooled]
                out[rows] = xbw[fooled]
                done[rows] = True
                finished[rows] = i + 2
                keep = ~fooled
                idx, xw, yw, xbw, mw = idx[keep], xw[keep], yw[keep], xbw[keep], mw[keep]
                if tried is not None:
                    tried = tried[keep]
        return done, out, finished

    def _run_linf(self, x, y):
        n, c, h, w = x.shape
        eps, lo, hi = self.eps, self.lo, self.hi
        x_best = (x + eps * self._sign((n, c, 1, w), x)).clamp(lo, hi)
        margin = _margin(self.logits(x_best), y)
        n_features = c * h * w
        # inside a window the proposal is x_best + 2 eps sign projected on the ball = clamp(x + eps sign):
        # two precomputed images per point, [n, 2, c, h, w] (index 0: -eps, 1: +eps)
        x_pm = torch.stack(((x - eps).clamp(lo, hi), (x + eps).clamp(lo, hi)), 1)
        tables = {}
        rows_h = torch.arange(h, device=x.device)
        rows_w = torch.arange(w, device=x.device)
        sign_bits = (2 ** torch.arange(c, device=x.device)) if c <= 16 else None  # proposal codes (memo)
        sign_codes = 2 ** c

        def window_masks(s):
            """Boolean masks of every window position for side ``s``: ``[Ph * Pw, 1, h, w]``."""
            if s not in tables:
                ph, pw = max(h - s, 1), max(w - s, 1)
                m = torch.zeros(ph, pw, 1, h, w, dtype=torch.bool, device=x.device)
                for a in range(ph):
                    for b in range(pw):
                        m[a, b, :, a:a + s, b:b + s] = True
                tables[s] = (m.reshape(ph * pw, 1, h, w), ph, pw)
            return tables[s]

        def side(i):
            p = p_selection(self.p_init, i, self.n_queries, self.rescale_schedule)
            return min(max(int(round(math.sqrt(p * n_features / c))), 1), min(h, w))

        def propose(i, xw, xbw, draw_only=False):
            W = xw.shape[0]
            s = side(i)
            # one draw per point: window corner (as long((h - s) * U), the authors' random_int) and signs
            u = torch.rand(W, 2 + c, generator=self.generator, device=x.device)
            if draw_only:
                return None
            vh, vw = (u[:, 0] * (h - s)).long(), (u[:, 1] * (w - s)).long()
            plus = (u[:, 2:] > 0.5).reshape(W, c, 1, 1)
            ph, pw = max(h - s, 1), max(w - s, 1)
            if ph * pw * h * w <= 4_000_000:  # small images: a table lookup
                mask = window_masks(s)[0][vh * pw + vw]
            else:
                mh = (rows_h[None, :] >= vh[:, None]) & (rows_h[None, :] < vh[:, None] + s)
                mw = (rows_w[None, :] >= vw[:, None]) & (rows_w[None, :] < vw[:, None] + s)
                mask = (mh[:, :, None] & mw[:, None, :])[:, None]
            x_new = torch.where(mask, torch.where(plus, xw[:, 1], xw[:, 0]), xbw)
            if sign_bits is None:
                return x_new, None
            # the proposal's code: window corner and channel signs (distinct codes, distinct proposals)
            code = (vh * pw + vw) * sign_codes + (plus.reshape(W, c).long() * sign_bits).sum(1)
            return x_new, (s, code, ph * pw * sign_codes)

        # the first iteration from which the window side stays the same until the end
        final_from = self.n_queries - 1
        while final_from > 0 and side(final_from - 1) == side(self.n_queries - 1):
            final_from -= 1
        return self._loop(x_pm, y, x_best, margin, propose, skip_unchanged=True, final_from=final_from)

    def _run_l2(self, x, y):
        n, c, h, w = x.shape
        eps, lo, hi = self.eps, self.lo, self.hi
        dev, dt = x.device, x.dtype
        view = (-1, 1, 1, 1)
        delta0 = torch.zeros_like(x)
        s = max(h // 5, 1)  # the authors' grid of 5x5 blocks (1-pixel blocks below 5x5 images)
        sp = max((h - s * 5) // 2, 0)
        vh = sp
        for _ in range(h // s):
            vw = sp
            for _ in range(w // s):
                flip = bool(torch.rand(1, generator=self.generator, device=dev) > 0.5)
                delta0[:, :, vh:vh + s, vw:vw + s] += (_eta(s, flip, dev, dt).view(1, 1, s, s)
                                                       * self._sign((n, c, 1, 1), x))
                vw += s
            vh += s
        x_best = (x + delta0 / (lp_norm(delta0, "L2").reshape(view) + 1e-12) * eps).clamp(lo, hi)
        margin = _margin(self.logits(x_best), y)
        n_features = c * h * w

        def propose(i, xw, xbw):
            W = xw.shape[0]
            delta = xbw - xw
            p = p_selection(self.p_init, i, self.n_queries, self.rescale_schedule)
            s = max(int(round(math.sqrt(p * n_features / c))), 3)
            if s % 2 == 0:
                s += 1
            s = min(s, min(h, w))
            vh, vw = int(self._randint(h - s, (1,), dev)), int(self._randint(w - s, (1,), dev))
            vh2, vw2 = int(self._randint(h - s, (1,), dev)), int(self._randint(w - s, (1,), dev))
            win1 = delta[:, :, vh:vh + s, vw:vw + s]
            norm_win1 = win1.square().sum((-2, -1), keepdim=True).sqrt()
            mask = torch.zeros(1, 1, h, w, dtype=torch.bool, device=dev)
            mask[..., vh:vh + s, vw:vw + s] = True
            mask[..., vh2:vh2 + s, vw2:vw2 + s] = True
            norm_img = lp_norm(delta, "L2").reshape(view)
            norm_wins = (delta * mask).square().sum((-2, -1), keepdim=True).sqrt()
            flip = bool(torch.rand(1, generator=self.generator, device=dev) > 0.5)
            new = _eta(s, flip, dev, dt).view(1, 1, s, s) * self._sign((W, c, 1, 1), xw)
            new = new + win1 / (1e-12 + norm_win1)
            new = new / (1e-12 + new.square().sum((-2, -1), keepdim=True).sqrt()) * (
                ((eps ** 2 - norm_img ** 2).clamp(min=0) / c + norm_wins ** 2).sqrt())
            delta = delta.clone()
            delta[:, :, vh2:vh2 + s, vw2:vw2 + s] = 0.0
            delta[:, :, vh:vh + s, vw:vw + s] = new
            return (xw + delta / (lp_norm(delta, "L2").reshape(view) + 1e-12) * eps).clamp(lo, hi), None

        return self._loop(x, y, x_best, margin, propose)
