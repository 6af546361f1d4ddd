"""DeepFool (Moosavi-Dezfooli et al. 2016), batched, with the max-residue-ratio budget of
Ranjan et al. 2017 (papers/compact-convolution-ranjan2017.txt, eq. 8 and 9).

Per iteration, for every still-active sample with current label ``l`` (the clean label) and
candidate classes ``k`` (the top-k classes of the clean logits, ``l`` excluded)::

    w_k = grad f_k(x_i) - grad f_l(x_i),   f'_k = f_k(x_i) - f_l(x_i)
    k*  = argmin_k |f'_k| / ||w_k||_2
    r_i = (|f'_k*| + 1e-4) / ||w_k*||_2^2 * w_k*         (step to the linearised boundary)
    x_{i+1} = clip_[lo,hi](x + (1 + overshoot) * sum_i r_i)

The gradients come from one backward pass per candidate class and iteration, of the logits of
that candidate summed over the active samples (samples do not interact in eval mode, so the
summed gradient holds every sample's own gradient; each class gradient goes through the shared
non-finite rule of :func:`robustops._gradients.sanitize_gradient`, so a model with infinite
input gradients, e.g. ``sqrt`` at black pixels, still gives finite steps). A sample stops when
it is misclassified or when ``max_iter`` is reached.

Max-residue ratio ``d`` (Ranjan et al. eq. 8, ``||eta||_2 / ||x||_2 <= d``) is judged on the
example that would be returned, i.e. after clipping to ``[lo, hi]``: when the next clipped
iterate ``x_{i+1}`` has ``||x_{i+1} - x||_2 > d ||x||_2`` the sample stops at its last iterate
within the budget (still correctly classified: it counts as robust at ``d``). The capped run
therefore follows the uncapped run step for step and equals it thresholded at ``d`` (a sample
is broken at ``d`` iff the uncapped DeepFool breaks it with a clipped ratio ``<= d``, as long as
the ratio grows along the trajectory; exact on ``small_cnn`` with all 450 digits test images at
d = 0.1, 0.15, 0.2, 0.3, and tested in tests/test_attacks_rules.py). Clipping only
shrinks a perturbation, so testing the unclipped ``(1 + overshoot) * r_tot`` instead (as before)
stopped samples whose real perturbation was still inside the budget.

``rho_adv`` (eq. 9) is ``E_x ||r_x||_2 / ||x||_2``, the mean over all given samples of the
ratio of the final perturbation's L2 norm to the input's (a sample misclassified from the
start contributes 0).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .._gradients import sanitize_gradient
from .base import Attack, check_nonneg, maybe_progress

__all__ = ["DeepFool", "DeepFoolResult", "deepfool"]


class DeepFoolResult(NamedTuple):
    """x_adv ``[N, ...]``; perturbation ``x_adv - x``; rho_adv (0-d, eq. 9); ratio
    ``||eta||/||x||`` per sample ``[N]``; success (misclassified at the end) ``[N]`` bool;
    iterations per sample ``[N]``."""

    x_adv: torch.Tensor
    perturbation: torch.Tensor
    rho_adv: torch.Tensor
    ratio: torch.Tensor
    success: torch.Tensor
    iterations: torch.Tensor


class DeepFool(Attack):
    """Untargeted DeepFool, batched over the batch; ``atk(x, y) -> DeepFoolResult``.

    Args:
        steps: max iterations (paper code: 50).
        overshoot: 0.02 as in the DeepFool paper.
        num_candidates: top-k classes of the clean output considered (incl. the label), >= 2.
        max_residue_ratio: ``d`` of Ranjan et al. eq. 8 (None: unbounded), judged on the returned,
            clipped example (see the module docstring).

    Raises ``ValueError`` when the model returns NaN/Inf logits at any iterate.
    """

    supports_targeted = False

    def __init__(self, model, steps: int = 50, overshoot: float = 0.02, *, num_candidates: int = 10,
                 max_residue_ratio: Optional[float] = None, lo: float = 0.0, hi: float = 1.0,
                 progress: bool = False, seed: Optional[int] = None, targeted: bool = False):
        super().__init__(model, targeted=targeted, lo=lo, hi=hi, seed=seed, progress=progress)
        self.steps = check_nonneg(steps, "steps", integer=True)
        self.overshoot = check_nonneg(overshoot, "overshoot")
        self.num_candidates = check_nonneg(num_candidates, "num_candidates", integer=True)
        if self.num_candidates < 2:
            raise ValueError(f"num_candidates must be >= 2, got {num_candidates}")
        self.max_residue_ratio = None if max_residue_ratio is None else check_nonneg(
            max_residue_ratio, "max_residue_ratio", positive=True)

    def _attack(self, x, y):
        n = x.shape[0]
        shape1 = (-1,) + (1,) * (x.dim() - 1)
        with torch.no_grad():
            clean = self.logits(x)
        k = min(self.num_candidates, clean.shape[1])
        # Candidates: the label first, then the k-1 highest other classes of the clean output.
        other = clean.scatter(1, y[:, None], float("-inf"))
        cand = torch.cat([y[:, None], other.topk(k - 1, dim=1).indices], 1)  # [N, k]
        x_norm = x.reshape(n, -1).norm(dim=1)
        limit = None if self.max_residue_ratio is None else self.max_residue_ratio * x_norm
        r_tot = torch.zeros_like(x)
        x_adv = x.clone()
        iters = torch.zeros(n, dtype=torch.long, device=x.device)
        active = clean.argmax(1) == y
        for _ in maybe_progress(range(self.steps), self.progress, desc="DeepFool"):
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            xa = x_adv[idx].clone().requires_grad_(True)
            ca = cand[idx]
            with torch.enable_grad():
                logits = self.logits(xa)
                still = logits.argmax(1) == ca[:, 0]
                fk = logits.gather(1, ca)  # [A, k]
                grads = []
                for j in range(k):
                    (g,) = torch.autograd.grad(fk[:, j].sum(), xa, retain_graph=j < k - 1)
                    grads.append(sanitize_gradient(g))
            fk = fk.detach()
            grads = torch.stack(grads, 1)  # [A, k, ...]
            w = grads[:, 1:] - grads[:, :1]
            f = (fk[:, 1:] - fk[:, :1]).abs()
            wn = w.flatten(2).norm(dim=2)  # [A, k-1]
            dist = f / (wn + 1e-8)
            best = dist.argmin(1)
            ar = torch.arange(idx.numel(), device=x.device)
            wb, fb, wnb = w[ar, best], f[ar, best], wn[ar, best]
            r_i = ((fb + 1e-4) / (wnb ** 2 + 1e-8)).view(shape1) * wb
            # samples already misclassified at this iterate stop without another step
            r_i = r_i * still.view(shape1).to(r_i.dtype)
            new_tot = r_tot[idx] + r_i
            cand_x = torch.clamp(x[idx] + (1 + self.overshoot) * new_tot, self.lo, self.hi)
            done = ~still
            if limit is not None:  # eq. 8 on the clipped candidate that would be returned
                over = (cand_x - x[idx]).reshape(idx.numel(), -1).norm(dim=1) > limit[idx]
                done = done | over
                keep = still & ~over
            else:
                keep = still
            upd = idx[keep]
            r_tot[upd] = new_tot[keep]
            x_adv[upd] = cand_x[keep]
            iters[upd] += 1
            active[idx[done]] = False
        x_adv = x_adv.detach()
        pert = x_adv - x
        ratio = pert.reshape(n, -1).norm(dim=1) / x_norm.clamp_min(1e-12)
        with torch.no_grad():
            success = self.predict(x_adv) != y
        return DeepFoolResult(x_adv, pert, ratio.mean(), ratio, success, iters)


def deepfool(model, x, y=None, steps: int = 50, overshoot: float = 0.02, **kw) -> DeepFoolResult:
    """Functional :class:`DeepFool`: returns a :class:`DeepFoolResult`."""
    return DeepFool(model, steps, overshoot, **kw)(x, y)
