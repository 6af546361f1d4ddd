"""The defence of Pravin et al. 2021, Secs. 4.1-4.2: SVD filtering of the null kernels S' and
amplification of the fragile kernels S of one conv layer.

Filtering (Sec. 4.1). Stack the flattened null kernels into ``K`` (``|S'| x k*k*C_in``), take
``K = U diag(sigma) V^T`` and rebuild ``K~ = U diag(sigma~) V^T`` with

* ``mode="clamp"`` (the paper's eq. 4): ``sigma~ = min(sigma, tau)``;
* ``mode="hard"`` (Gavish-Donoho): ``sigma~ = sigma if sigma > tau else 0``.

``tau = lambda(beta) * sqrt(n) * eps_noise`` (eq. 5) with ``beta = m / n``, ``m <= n`` the sides of
``K`` and the Gavish-Donoho ``lambda(beta)`` of eq. 6 (``c1 = 8``, ``c2 = 14``; ``lambda(1) =
4/sqrt(3)``). When the noise level is unknown, ``tau = omega(beta) * median(sigma)`` with
Gavish-Donoho's approximation ``omega(beta) = 0.56 beta^3 - 0.95 beta^2 + 1.82 beta + 1.43`` and
the statistical median of the singular values (for an even count, the mean of the two middle
values, as ``numpy.median``; ``torch.median`` would return the lower one and give a tau 1.6-6%
too low).
``eps_noise`` is found by a systematic search on a held-out sample (:func:`search_noise_level`).

Amplification (Sec. 4.2). The fragile kernels are scaled by ``alpha`` (eq. 8). Eq. 9 as printed,
``alpha = 1 + ||K_S - K~_S||_2``, is circular (``K~_S`` is defined by eq. 8 through ``alpha``). We
read it as the change the filter made to the *null* kernels: ``alpha = 1 + ||K_S' - K~_S'||_2``
(spectral norm), which ties the amplification of S to how much was removed from S' ("we
proportionally amplify fragile kernels"). ``alpha=`` overrides it. Only the weights are changed;
biases are left as they are.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import _ops
from .._checks import as_logits, check_images, check_labels, check_nonneg
from .._gradients import input_gradient
from .._guard import frozen_model, model_device
from ._common import (LayerLike, bounds, check_batch_size, checked_pair, normal_tensor, public_entry,
                      resolve_layer, split_indices, true_median)
from .errors import NoiseLevelError
from .split import FragileSplit, fragile_split
from .targeting import TargetingResult, adversarial_targeting

__all__ = ["gavish_donoho_lambda", "gavish_donoho_omega", "svd_threshold", "svd_filter", "SVDFilterInfo",
           "amplification_factor", "filter_layer_weights", "filtered_model", "search_noise_level",
           "NoiseSearchResult", "apply_filter", "FilterReport", "MODES"]

MODES = ("clamp", "hard")


def gavish_donoho_lambda(beta: float) -> float:
    """Eq. 6: ``sqrt(2(b+1) + 8b / ((b+1) + sqrt(b^2 + 14b + 1)))`` for aspect ratio ``0 < b <= 1``."""
    beta = float(beta)
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    return math.sqrt(2.0 * (beta + 1.0) + 8.0 * beta / ((beta + 1.0) + math.sqrt(beta * beta + 14.0 * beta + 1.0)))


def gavish_donoho_omega(beta: float) -> float:
    """Gavish-Donoho's approximation of the unknown-noise coefficient: tau = omega * median(sigma)."""
    beta = float(beta)
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    return 0.56 * beta ** 3 - 0.95 * beta ** 2 + 1.82 * beta + 1.43


def _check_noise(eps_noise) -> float:
    if isinstance(eps_noise, bool) or not isinstance(eps_noise, (int, float)):
        raise NoiseLevelError(f"eps_noise must be a number > 0 (or 'unknown' / 'search'), got {eps_noise!r}")
    v = float(eps_noise)
    if not math.isfinite(v) or v <= 0:
        raise NoiseLevelError(f"eps_noise must be finite and > 0, got {eps_noise!r}")
    return v


def svd_threshold(K: torch.Tensor, eps_noise: Optional[float] = None) -> Tuple[float, float]:
    """``(tau, beta)`` for matrix ``K``: ``lambda(beta) sqrt(n) eps_noise``, or the unknown-noise
    ``omega(beta) median(sigma)`` when ``eps_noise`` is None."""
    _check_matrix(K)
    m, n = sorted(K.shape)
    beta = m / n
    if eps_noise is None:
        sigma = torch.linalg.svdvals(K.detach().double())
        return gavish_donoho_omega(beta) * true_median(sigma), beta
    return gavish_donoho_lambda(beta) * math.sqrt(n) * _check_noise(eps_noise), beta


def _check_matrix(K, name: str = "K") -> None:
    if not isinstance(K, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(K).__name__}")
    if K.dim() != 2 or K.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 2-D tensor, got shape {tuple(K.shape)}")
    if not K.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {K.dtype}")
    if not bool(torch.isfinite(K).all()):
        raise ValueError(f"{name} contains NaN or Inf values (the kernels to filter must be finite)")


@dataclass
class SVDFilterInfo:
    tau: float
    beta: float
    mode: str
    sigma: torch.Tensor
    sigma_filtered: torch.Tensor
    change_norm: float  # ||K - K~||_2

    @property
    def rank_kept(self) -> int:
        return int((self.sigma_filtered > 0).sum())


def svd_filter(K: torch.Tensor, eps_noise: Optional[float] = None, *, mode: str = "clamp",
               tau: Optional[float] = None) -> Tuple[torch.Tensor, SVDFilterInfo]:
    """Filter matrix ``K`` through its singular values; returns ``(K~, info)``.

    ``tau`` overrides the threshold (``tau=0`` with ``mode="hard"`` keeps every non-zero singular
    value, i.e. rebuilds K exactly up to rounding). Computed in float64, returned in K's dtype.
    ``ValueError`` when K holds NaN/Inf (an SVD of it is undefined), is empty or not 2-D.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_matrix(K)
    if tau is None:
        tau, beta = svd_threshold(K, eps_noise)
    else:
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau < 0:
            raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
        m, n = sorted(K.shape)
        beta = m / n
    Kd = K.detach().double()
    U, S, Vh = torch.linalg.svd(Kd, full_matrices=False)
    if mode == "clamp":
        St = torch.clamp(S, max=float(tau))
    else:
        St = torch.where(S > tau, S, torch.zeros_like(S))
    Kt = (U * St) @ Vh
    change = float(torch.linalg.matrix_norm(Kd - Kt, ord=2)) if Kd.numel() else 0.0
    return Kt.to(K.dtype), SVDFilterInfo(float(tau), beta, mode, S, St, change)


def amplification_factor(K_null: torch.Tensor, K_null_filtered: torch.Tensor) -> float:
    """``alpha = 1 + ||K_S' - K~_S'||_2`` (spectral norm; see the module docstring for this reading)."""
    return 1.0 + float(torch.linalg.matrix_norm((K_null - K_null_filtered).double(), ord=2))


def filter_layer_weights(weight: torch.Tensor, split, eps_noise: Optional[float] = None, *, mode: str = "clamp",
                         alpha: Optional[float] = None, tau: Optional[float] = None
                         ) -> Tuple[torch.Tensor, float, SVDFilterInfo]:
    """New conv weight: null kernels SVD-filtered, fragile kernels scaled by alpha. ``(w~, alpha, info)``.

    ``split`` indices are checked against ``weight.shape[0]`` (``SplitIndexError``: negative
    indices do not wrap around); S may be empty, S' may not (``EmptySplitError``)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        raise TypeError(f"weight must be a conv weight tensor [C_out, C_in, kh, kw], got {type(weight).__name__}")
    s, sn = split_indices(split, weight.shape[0], require_fragile=False)
    w = weight.detach()
    K = w[sn].reshape(sn.numel(), -1)
    Kt, info = svd_filter(K, eps_noise, mode=mode, tau=tau)
    if alpha is None:
        alpha = 1.0 + info.change_norm
    elif isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    out = w.clone()
    out[sn] = Kt.reshape(sn.numel(), *w.shape[1:]).to(w.dtype)
    if s.numel():
        out[s] = w[s] * float(alpha)
    return out, float(alpha), info


def filtered_model(model: nn.Module, layer: LayerLike, split, eps_noise: Optional[float] = None, *,
                   mode: str = "clamp", alpha: Optional[float] = None, tau: Optional[float] = None
                   ) -> Tuple[nn.Module, float, SVDFilterInfo]:
    """A deep copy of ``model`` with ``layer``'s weights filtered; the original is not touched."""
    name, conv = resolve_layer(model, layer)
    new_w, alpha, info = filter_layer_weights(conv.weight, split, eps_noise, mode=mode, alpha=alpha, tau=tau)
    with torch.inference_mode(False):
        m = copy.deepcopy(model)
        with torch.no_grad():
            m.get_submodule(name).weight.copy_(new_w)
    return m, alpha, info


# ---------------------------------------------------------------------------------------------
# evaluation helpers
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    dev = model_device(model)
    correct = 0
    with frozen_model(model):
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].to(dev)
            logits = as_logits(model(xb), xb.shape[0])
            yb = check_labels(y[i:i + batch_size].to(dev), xb.shape[0], num_classes=logits.shape[1])
            correct += int((logits.argmax(1) == yb).sum())
    return correct / x.shape[0]


def _checked_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    y = check_labels(y, logits.shape[0], num_classes=logits.shape[1])
    return torch.nn.functional.cross_entropy(logits, y, reduction="sum")


def _default_fgsm_eps(fgsm_eps, lo: float, hi: float) -> float:
    """``fgsm_eps`` checked; None -> 0.1 of the input range ``hi - lo`` (0.1 for [0, 1])."""
    if fgsm_eps is None:
        return 0.1 * (hi - lo)
    return check_nonneg(fgsm_eps, "fgsm_eps")


@public_entry
def fgsm_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float], batch_size: int = 256,
                  source: Optional[nn.Module] = None, *, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """``Tensor[K]`` (float64): accuracy of ``model`` under FGSM for each of the K eps.

    One input gradient per batch, the fused ``fgsm_step`` clamps ``x + eps * sign(grad)`` to
    ``[lo, hi]`` (default ``[0, 1]``; pass e.g. ``lo=-1, hi=1`` for normalised inputs). The
    gradient comes from ``source`` (default: ``model`` itself, i.e. white-box). x: ``[N, ...]``
    finite in ``[lo, hi]``; y: labels of any integer dtype. Works under
    ``torch.inference_mode()`` with the plain call's result; the models are not modified."""
    lo, hi = bounds(lo, hi)
    batch_size = check_batch_size(batch_size)
    eps_t = _ops.as_eps_tensor(eps)
    x = check_images(normal_tensor(x), lo, hi, name="x")
    y = check_labels(normal_tensor(y), x.shape[0], name="y")
    src = model if source is None else source
    dev = model_device(model)
    correct = torch.zeros(eps_t.numel(), dtype=torch.int64)
    with frozen_model(model), frozen_model(src):
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size].to(dev), y[i:i + batch_size].to(dev)
            grad, _ = input_gradient(src, xb, yb, loss_fn=_checked_ce)
            xa = _ops.fgsm_step(xb, grad, eps_t, lo, hi)
            with torch.no_grad():
                n = xa.shape[0] * xa.shape[1]
                pred = as_logits(model(xa.reshape(-1, *xb.shape[1:])), n).argmax(1).reshape(eps_t.numel(), -1)
            correct += (pred == yb).sum(1).cpu()
    return correct.double() / x.shape[0]


# ---------------------------------------------------------------------------------------------
# noise-level search
# ---------------------------------------------------------------------------------------------
@dataclass
class NoiseSearchResult:
    eps_noise: float
    tau: float
    clean_accuracy: float
    adversarial_accuracy: float
    constraint_met: bool
    baseline_clean_accuracy: float
    baseline_adversarial_accuracy: float
    table: List[Dict[str, float]] = field(default_factory=list)


def _default_candidates(K: torch.Tensor, num: int = 12) -> List[float]:
    """eps_noise values whose tau spans the singular values of K (geometric grid)."""
    m, n = sorted(K.shape)
    lam = gavish_donoho_lambda(m / n) * math.sqrt(n)
    sigma = torch.linalg.svdvals(K.double())
    lo = max(float(sigma.min()), float(sigma.max()) * 1e-3) * 0.5
    hi = float(sigma.max())
    if hi <= 0:
        return [1e-3]
    grid = torch.logspace(math.log10(lo), math.log10(hi), num, dtype=torch.float64)
    return [float(t) / lam for t in grid]


@public_entry
def search_noise_level(model: nn.Module, layer: LayerLike, split, held_out, *, fgsm_eps: Optional[float] = None,
                       clean_margin: float = 0.01, candidates: Optional[Sequence[float]] = None,
                       mode: str = "clamp", alpha: Optional[float] = None, batch_size: int = 256,
                       lo: float = 0.0, hi: float = 1.0) -> NoiseSearchResult:
    """Systematic search for eps_noise (paper Sec. 4.1) on a held-out sample.

    Each candidate builds the filtered (+ amplified) model and measures clean accuracy and FGSM
    accuracy at ``fgsm_eps`` (white-box against the filtered model). The chosen value maximises
    the FGSM accuracy among candidates whose clean accuracy is at least
    ``baseline - clean_margin``; when none qualifies, the candidate with the best clean accuracy
    is returned with ``constraint_met=False``.

    ``held_out``: ``(x, y)`` pair or DataLoader, x finite in ``[lo, hi]`` (FGSM clamps to it);
    ``fgsm_eps`` None means ``0.1 * (hi - lo)``.
    """
    lo, hi = bounds(lo, hi)
    batch_size = check_batch_size(batch_size)
    fgsm_eps = _default_fgsm_eps(fgsm_eps, lo, hi)
    name, conv = resolve_layer(model, layer)
    x, y = checked_pair(held_out, batch_size, lo, hi, "held_out")
    if not (isinstance(clean_margin, (int, float)) and math.isfinite(clean_margin) and clean_margin >= 0):
        raise ValueError(f"clean_margin must be a finite number >= 0, got {clean_margin!r}")
    s, sn = split_indices(split, conv.out_channels, name, require_fragile=False)
    if candidates is None:
        candidates = _default_candidates(conv.weight.detach()[sn].reshape(sn.numel(), -1))
    candidates = [_check_noise(c) for c in candidates]
    if not candidates:
        raise ValueError("candidates is empty")
    base_clean = _accuracy(model, x, y, batch_size)
    base_adv = float(fgsm_accuracy(model, x, y, [fgsm_eps], batch_size, lo=lo, hi=hi)[0])
    table = []
    for e in candidates:
        m, a, info = filtered_model(model, name, (s, sn), e, mode=mode, alpha=alpha)
        clean = _accuracy(m, x, y, batch_size)
        adv = float(fgsm_accuracy(m, x, y, [fgsm_eps], batch_size, lo=lo, hi=hi)[0])
        table.append({"eps_noise": e, "tau": info.tau, "alpha": a, "clean_accuracy": clean,
                      "adversarial_accuracy": adv})
    ok = [r for r in table if r["clean_accuracy"] >= base_clean - clean_margin - 1e-12]
    if ok:
        best = max(ok, key=lambda r: (r["adversarial_accuracy"], r["clean_accuracy"]))
    else:
        best = max(table, key=lambda r: (r["clean_accuracy"], r["adversarial_accuracy"]))
    return NoiseSearchResult(best["eps_noise"], best["tau"], best["clean_accuracy"], best["adversarial_accuracy"],
                             bool(ok), base_clean, base_adv, table)


# ---------------------------------------------------------------------------------------------
# apply_filter
# ---------------------------------------------------------------------------------------------
@dataclass
class FilterReport:
    """What :func:`apply_filter` did and measured."""

    layer: str
    fragile: torch.Tensor
    null: torch.Tensor
    eps_noise: Optional[float]
    tau: float
    beta: float
    alpha: float
    mode: str
    fgsm_eps: float
    clean_accuracy_before: float
    clean_accuracy_after: float
    adversarial_accuracy_before: float   # white-box FGSM on the original model
    adversarial_accuracy_after: float    # white-box FGSM on the filtered model
    adversarial_accuracy_after_transfer: float  # x' crafted on the original, scored on the filtered model
    targeting_before: Optional[TargetingResult]
    targeting_after: Optional[TargetingResult]
    svd: SVDFilterInfo
    search: Optional[NoiseSearchResult] = None


@public_entry
def apply_filter(
    model: nn.Module,
    layer: LayerLike = None,
    data=None,
    *,
    split: Optional[FragileSplit] = None,
    eps_noise: Union[float, str] = "search",
    mode: str = "clamp",
    alpha: Optional[float] = None,
    fgsm_eps: Optional[float] = None,
    targeting_eps: Optional[Sequence[float]] = None,
    held_out=None,
    clean_margin: float = 0.01,
    candidates: Optional[Sequence[float]] = None,
    batch_size: int = 256,
    memory_budget: Optional[int] = None,
    lo: float = 0.0,
    hi: float = 1.0,
) -> Tuple[nn.Module, FilterReport]:
    """Filter the null kernels and amplify the fragile kernels of ``layer``; returns ``(new_model, report)``.

    The user's ``model`` is never modified: the filtered model is a deep copy.

    Args:
        layer: conv layer (name/module; None = the first conv).
        data: ``(x, y)`` pair or DataLoader used for the split (when ``split`` is None), for
            the before/after accuracies and for the targeting percentages.
        split: a precomputed :class:`FragileSplit`; None runs :func:`kernel_dropout` on ``data``
            and splits at the mean line.
        eps_noise: a number > 0, ``"unknown"`` (tau = omega(beta) median(sigma)) or ``"search"``
            (:func:`search_noise_level` on ``held_out``; without ``held_out`` the search uses
            ``data`` itself, which selects on the evaluation set: pass a held-out sample).
        mode: "clamp" (paper) or "hard" (Gavish-Donoho).
        alpha: overrides the amplification factor.
        fgsm_eps: FGSM step for the before/after adversarial accuracy and the search (input
            units); None means ``0.1 * (hi - lo)``.
        targeting_eps: eps values for Algorithm 1 before/after (None skips it).
        lo, hi: the input range (default ``[0, 1]``): x is checked against it and every FGSM
            example is clamped to it.

    Raises ``SplitIndexError`` (negative, out-of-range, repeated or overlapping split indices:
    ``-1`` is an error, not the last kernel), ``EmptySplitError``, ``NoiseLevelError`` and the
    shared ``ValueError``/``TypeError`` for bad inputs. Works under ``torch.inference_mode()``.
    """
    from .dropout import kernel_dropout

    batch_size = check_batch_size(batch_size)
    lo, hi = bounds(lo, hi)
    fgsm_eps = _default_fgsm_eps(fgsm_eps, lo, hi)
    name, conv = resolve_layer(model, layer)
    x, y = checked_pair(data, batch_size, lo, hi)
    if split is None:
        res = kernel_dropout(model, name, (x, y), batch_size=batch_size, memory_budget=memory_budget, lo=lo, hi=hi)
        split = fragile_split(res)
    s, sn = split_indices(split, conv.out_channels, name, require_fragile=False)
    search = None
    if isinstance(eps_noise, str):
        if eps_noise == "unknown":
            noise = None
        elif eps_noise == "search":
            search = search_noise_level(model, name, (s, sn), held_out if held_out is not None else (x, y),
                                        fgsm_eps=fgsm_eps, clean_margin=clean_margin, candidates=candidates,
                                        mode=mode, alpha=alpha, batch_size=batch_size, lo=lo, hi=hi)
            noise = search.eps_noise
        else:
            raise NoiseLevelError(f"eps_noise must be a number > 0, 'unknown' or 'search', got {eps_noise!r}")
    else:
        noise = _check_noise(eps_noise)
    new_model, a, info = filtered_model(model, name, (s, sn), noise, mode=mode, alpha=alpha)
    clean_before = _accuracy(model, x, y, batch_size)
    clean_after = _accuracy(new_model, x, y, batch_size)
    adv_before = float(fgsm_accuracy(model, x, y, [fgsm_eps], batch_size, lo=lo, hi=hi)[0])
    adv_after = float(fgsm_accuracy(new_model, x, y, [fgsm_eps], batch_size, lo=lo, hi=hi)[0])
    adv_transfer = float(fgsm_accuracy(new_model, x, y, [fgsm_eps], batch_size, source=model, lo=lo, hi=hi)[0])
    t_before = t_after = None
    if targeting_eps is not None and s.numel() > 0:
        t_before = adversarial_targeting(model, name, (x, y), targeting_eps, (s, sn), batch_size=batch_size,
                                         lo=lo, hi=hi)
        t_after = adversarial_targeting(new_model, name, (x, y), targeting_eps, (s, sn), batch_size=batch_size,
                                        lo=lo, hi=hi)
    report = FilterReport(name, s, sn, noise, info.tau, info.beta, a, mode, float(fgsm_eps), clean_before,
                          clean_after, adv_before, adv_after, adv_transfer, t_before, t_after, info, search)
    return new_model, report
