"""One-pixel attack (Su et al. 2019) by differential evolution, as used by Klawikowska et al.
(papers/xai-adversarial-klawikowska2020.txt).

For each image, a candidate is ``pixels`` tuples ``(row, col, v_1..v_C)``; the objective is the
model's softmax probability of the true class (untargeted, minimised) or minus the probability of
the target class (targeted). :func:`scipy.optimize.differential_evolution` evolves the population
with ``vectorized=True``: every generation's candidates are written into copies of the image and
scored by batched forward passes (chunks of ``batch_size``), not one forward per candidate.
Evolution stops early as soon as the best candidate fools the model. DE/rand/1 with F=0.5 and no
crossover (recombination 1) as in Su et al.

Settings: ``steps`` is the number of DE generations (scipy's ``maxiter``; each generation scores
one new population), ``popsize`` the population size. Su et al. (Sec. 3) use a population of 400
and at most 100 generations: ``OnePixel(model, preset="paper")``. The default (``preset=None``:
100 candidates, 30 generations: about 3,100 model evaluations per image instead of about 40,400) is
a quick screen, weaker than the paper's attack. The pixel budget is judged on the returned
example: at most ``pixels`` pixels of ``x_adv`` differ from ``x``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np
import torch

from .base import Attack, check_nonneg, maybe_progress

__all__ = ["OnePixel", "OnePixelResult", "one_pixel"]


class OnePixelResult(NamedTuple):
    """x_adv; success mask; number of model evaluations (candidates scored) per image."""

    x_adv: torch.Tensor
    success: torch.Tensor
    evaluations: torch.Tensor


PRESETS = {None: {"steps": 30, "popsize": 100}, "paper": {"steps": 100, "popsize": 400}}


class OnePixel(Attack):
    """``atk = OnePixel(model, pixels=1, seed=0); x_adv = atk(x, y)``.

    Args:
        pixels: number of pixels changed per image.
        steps: maximum DE generations (``maxiter``); default from ``preset``.
        popsize: population size (total; rounded up to a multiple of the candidate's dimension,
            scipy's per-dimension multiplier); default from ``preset``.
        preset: ``None`` (30 generations of 100) or ``"paper"`` (Su et al.: 100 generations of
            400); explicit ``steps`` / ``popsize`` override it.
        batch_size: candidates per forward pass.
        seed: seeds scipy's generator (image i uses ``seed + i``).
    Inputs are ``[N, C, H, W]``.
    """

    def __init__(self, model, pixels: int = 1, steps: Optional[int] = None, popsize: Optional[int] = None, *,
                 preset: Optional[str] = None, batch_size: int = 512, targeted: bool = False, lo: float = 0.0,
                 hi: float = 1.0, seed: Optional[int] = 0, progress: bool = False):
        super().__init__(model, targeted=targeted, lo=lo, hi=hi, seed=seed, progress=progress)
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {list(PRESETS)}, got {preset!r}")
        steps = PRESETS[preset]["steps"] if steps is None else steps
        popsize = PRESETS[preset]["popsize"] if popsize is None else popsize
        self.preset = preset
        self.pixels = check_nonneg(pixels, "pixels", integer=True, positive=True)
        self.steps = check_nonneg(steps, "steps", integer=True, positive=True)
        self.popsize = check_nonneg(popsize, "popsize", integer=True, positive=True)
        self.batch_size = check_nonneg(batch_size, "batch_size", integer=True, positive=True)
        self.last_result: Optional[OnePixelResult] = None

    def _apply(self, img: torch.Tensor, params: np.ndarray) -> torch.Tensor:
        """Write candidates ``params [S, pixels*(2+C)]`` into copies of ``img [C,H,W]`` -> ``[S,C,H,W]``."""
        C, H, W = img.shape
        S = params.shape[0]
        p = torch.as_tensor(params, dtype=img.dtype, device=img.device).view(S, self.pixels, 2 + C)
        rows = p[..., 0].floor().long().clamp(0, H - 1)
        cols = p[..., 1].floor().long().clamp(0, W - 1)
        vals = p[..., 2:].clamp(self.lo, self.hi)  # [S, P, C]
        out = img.unsqueeze(0).repeat(S, 1, 1, 1)
        s_idx = torch.arange(S, device=img.device)[:, None].expand(S, self.pixels)
        for c in range(C):
            out[s_idx, c, rows, cols] = vals[..., c]
        return out

    def _probs(self, imgs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.logits(imgs[i:i + self.batch_size]).softmax(1)
                              for i in range(0, imgs.shape[0], self.batch_size)])

    def _attack(self, x, y):
        try:
            from scipy.optimize import differential_evolution
        except ImportError as e:  # pragma: no cover
            raise ImportError("one_pixel needs scipy (pip install scipy)") from e
        if x.dim() != 4:
            raise ValueError(f"x must be images [N, C, H, W], got shape {tuple(x.shape)}")
        N, C, H, W = x.shape
        dim = self.pixels * (2 + C)
        bounds = [(0, H), (0, W)] + [(self.lo, self.hi)] * C
        bounds = bounds * self.pixels
        pop_mult = max(1, math.ceil(self.popsize / dim))
        x_adv = x.clone()
        success = torch.zeros(N, dtype=torch.bool)
        evals = torch.zeros(N, dtype=torch.long)
        pred0 = self.predict(x)
        base_seed = 0 if self.seed is None else self.seed
        for i in maybe_progress(range(N), self.progress, desc="OnePixel"):
            label = int(y[i])
            if (pred0[i] == label) == self.targeted:  # already fooled / already the target
                success[i] = True
                continue
            img = x[i]
            count = [0]

            errors = []

            def objective(P, img=img, label=label, count=count, errors=errors):
                cand = np.atleast_2d(P.T)  # scipy passes (dim, S)
                count[0] += cand.shape[0]
                try:
                    pr = self._probs(self._apply(img, cand))[:, label]
                except ValueError as err:  # e.g. NaN logits: scipy would re-wrap it as RuntimeError
                    errors.append(err)
                    raise
                return (-pr if self.targeted else pr).double().cpu().numpy()

            def fooled(params) -> bool:
                pred = int(self._probs(self._apply(img, np.asarray(params)[None]))[0].argmax())
                return (pred == label) if self.targeted else (pred != label)

            def callback(xk, convergence=None):
                return fooled(xk)

            try:
                res = differential_evolution(
                    objective, bounds, strategy="rand1bin", maxiter=self.steps, popsize=pop_mult,
                    mutation=0.5, recombination=1.0, polish=False, tol=-1, **_seed_kw(base_seed + i),
                    init="random", vectorized=True, updating="deferred", callback=callback,
                )
            except (RuntimeError, ValueError):
                if errors:  # the model's own error (shared output rule), not scipy's wrapper
                    raise errors[0] from None
                raise
            evals[i] = count[0]
            if fooled(res.x):
                x_adv[i] = self._apply(img, np.asarray(res.x)[None])[0]
                success[i] = True
        self.last_result = OnePixelResult(x_adv, success, evals)
        return x_adv


def _seed_kw(seed: int) -> dict:
    """scipy >= 1.15 takes ``rng`` (a numpy Generator); older versions ``seed``."""
    import inspect

    from scipy.optimize import differential_evolution

    if "rng" in inspect.signature(differential_evolution).parameters:
        return {"rng": np.random.default_rng(seed)}
    return {"seed": seed}


def one_pixel(model, x, y=None, pixels: int = 1, steps: Optional[int] = None, popsize: Optional[int] = None,
              **kw) -> torch.Tensor:
    """Functional :class:`OnePixel`; returns ``x_adv``."""
    return OnePixel(model, pixels, steps, popsize, **kw)(x, y)
