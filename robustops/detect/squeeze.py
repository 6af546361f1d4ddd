"""Feature Squeezing (Xu, Evans & Qi, NDSS 2018, "Feature Squeezing: Detecting Adversarial
Examples in Deep Neural Networks"), Sec. 3-5.

Score of an image: ``max_k || softmax(f(x)) - softmax(f(squeeze_k(x))) ||_1`` over the squeezers;
adversarial when the score exceeds a threshold chosen on clean images only so that a fraction
``fpr`` of them is flagged (the paper uses 5%).

Squeezers (all batched torch ops):

* ``"bit_depth_<b>"`` (b = 1..8): ``round(x * (2^b - 1)) / (2^b - 1)`` (Sec. 3.1).
* ``"median_<k>x<k>"`` (k = 2..5): median filter over a k x k window per channel (Sec. 3.2),
  as ``scipy.ndimage.median_filter(size=k, mode="reflect")`` computes it: for even k the window
  covers rows/cols ``i - k//2 .. i + k//2 - 1`` and the median of the k^2 values is the upper one
  (rank k^2 // 2).

Which squeezers: the paper picks them per data set (MNIST: 1-bit depth + 2x2 median; CIFAR-10
and ImageNet: 5-bit depth + 2x2 median + non-local means, the last not offered here).
:func:`select_squeezers` makes that choice from clean images only: a squeezer that changes the
model's prediction on more than ``fpr`` of the clean images pushes the threshold to a
class-changing distance (up to 2) and then detects almost nothing -- e.g. 1-bit depth on
Fashion-MNIST's grey-level images, which changes the prediction of ~23% of them.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Dict, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import as_logits, check_images
from .._guard import frozen_model, model_device
from .base import Detector, read_saved
from .features import _iter_images

__all__ = ["FeatureSqueezingDetector", "bit_depth", "median_filter", "select_squeezers", "squeezer_agreement", "SQUEEZERS",
           "CANDIDATE_SQUEEZERS"]

FORMAT = "robustops.detect.FeatureSqueezingDetector/1"


def bit_depth(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Reduce ``x`` in [0, 1] to ``bits`` bits per value (``2**bits`` levels)."""
    levels = float(2 ** bits - 1)
    return torch.round(x * levels) / levels


def median_filter(x: torch.Tensor, k: int) -> torch.Tensor:
    """k x k median filter of every channel of ``x [N, C, H, W]`` (scipy ``median_filter``
    semantics with ``mode="reflect"``: the edge is mirrored including the edge pixel)."""
    if x.dim() != 4:
        raise ValueError(f"median filtering needs images [N, C, H, W], got shape {tuple(x.shape)}")
    before = k // 2
    after = k - 1 - before
    n, c, h, w = x.shape
    xp = x
    # scipy's "reflect" (d c b a | a b c d): symmetric padding, taken by flipping edge slices
    if before or after:
        top = x[:, :, :before].flip(2) if before else x[:, :, :0]
        bottom = x[:, :, h - after:].flip(2) if after else x[:, :, :0]
        xp = torch.cat([top, x, bottom], 2)
        left = xp[:, :, :, :before].flip(3) if before else xp[:, :, :, :0]
        right = xp[:, :, :, w - after:].flip(3) if after else xp[:, :, :, :0]
        xp = torch.cat([left, xp, right], 3)
    patches = xp.unfold(2, k, 1).unfold(3, k, 1)            # [N, C, H, W, k, k]
    flat = patches.reshape(n, c, h, w, k * k)
    return flat.sort(dim=-1).values[..., (k * k) // 2]


_BIT = re.compile(r"^bit_depth_([1-8])$")
_MED = re.compile(r"^median_([2-5])x\1$")


def _squeezer(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if not isinstance(name, str):
        raise TypeError(f"squeezer names must be strings, got {type(name).__name__}")
    m = _BIT.match(name)
    if m:
        b = int(m.group(1))
        return lambda x: bit_depth(x, b)
    m = _MED.match(name)
    if m:
        k = int(m.group(1))
        return lambda x: median_filter(x, k)
    raise ValueError(f"unknown squeezer {name!r}: use 'bit_depth_<1..8>' or 'median_<k>x<k>' with k in 2..5")


SQUEEZERS = ("bit_depth_1", "bit_depth_4", "median_2x2", "median_3x3")

#: Candidates of :func:`select_squeezers`: the bit depths and median windows of the paper's Sec. 4.
CANDIDATE_SQUEEZERS = ("bit_depth_1", "bit_depth_2", "bit_depth_3", "bit_depth_4", "bit_depth_5",
                       "median_2x2", "median_3x3")


def _strength(name: str):
    """(family, strength): fewer bits / a wider window squeeze more."""
    m = _BIT.match(name)
    if m:
        return "bit_depth", -int(m.group(1))
    m = _MED.match(name)
    if m:
        return "median", int(m.group(1))
    _squeezer(name)                      # raises the named error
    raise AssertionError(name)  # pragma: no cover


def squeezer_agreement(model: nn.Module, x_clean, squeezers: Sequence[str] = CANDIDATE_SQUEEZERS,
                       batch_size: int = 512) -> Dict[str, float]:
    """Fraction of ``x_clean`` (images ``[N, C, H, W]`` in [0, 1], or batches) on which each
    squeezer keeps the model's predicted class: ``{name: agreement in [0, 1]}``."""
    if isinstance(squeezers, str):
        squeezers = (squeezers,)
    fns = {s: _squeezer(s) for s in squeezers}
    same = {s: 0 for s in fns}
    n = 0
    with frozen_model(model), torch.no_grad():
        for xb in _iter_images(x_clean, batch_size, "x_clean"):
            check_images(xb, name="x_clean")
            xb = xb.to(model_device(model, xb.device))
            pred = as_logits(model(xb), xb.shape[0]).argmax(1)
            for s, fn in fns.items():
                same[s] += int((as_logits(model(fn(xb)), xb.shape[0]).argmax(1) == pred).sum())
            n += xb.shape[0]
    return {s: same[s] / n for s in fns}


def select_squeezers(model: nn.Module, x_clean, candidates: Sequence[str] = CANDIDATE_SQUEEZERS,
                     min_agreement: float = 0.99, batch_size: int = 512) -> tuple:
    """Choose Feature Squeezing's squeezers for a data set from clean images only.

    Per family (bit depth, median filter) the strongest candidate (fewest bits, widest window)
    whose squeezed clean images keep the model's predicted class on at least ``min_agreement``
    of ``x_clean``; a family with no such candidate is left out. This formalises the paper's
    per-data-set choice (Xu et al. 2018, Sec. 4-5: squeezers that cost little clean accuracy)
    without looking at adversarial examples. ``min_agreement`` should stay well above
    ``1 - fpr``: a squeezer that changes more than ``fpr`` of the clean predictions sets the
    threshold at a class-changing L1 distance.

    Args:
        model: classifier returning logits; never modified.
        x_clean: clean images ``[N, C, H, W]`` in [0, 1] (or batches), e.g. the images ``fit``
            will use.
        candidates: squeezer names (``"bit_depth_<b>"``, ``"median_<k>x<k>"``).
        min_agreement: in (0, 1].

    Returns:
        a tuple of squeezer names for ``FeatureSqueezingDetector(model, squeezers=...)``:
        the chosen bit depth first, then the chosen median.

    Raises:
        ValueError: unknown squeezer, ``min_agreement`` outside (0, 1], or no candidate passes.
    """
    if isinstance(min_agreement, bool) or not isinstance(min_agreement, (int, float)) or not 0 < min_agreement <= 1:
        raise ValueError(f"min_agreement must be a number in (0, 1], got {min_agreement!r}")
    if isinstance(candidates, str):
        candidates = (candidates,)
    candidates = tuple(candidates)
    if not candidates:
        raise ValueError("candidates must name at least one squeezer")
    strength = {c: _strength(c) for c in candidates}
    agree = squeezer_agreement(model, x_clean, candidates, batch_size)
    chosen = []
    for family in ("bit_depth", "median"):
        ok = [c for c in candidates if strength[c][0] == family and agree[c] >= min_agreement]
        if ok:
            chosen.append(max(ok, key=lambda c: strength[c][1]))
    if not chosen:
        raise ValueError(f"no squeezer keeps the model's prediction on {min_agreement:.0%} of the clean images "
                         f"(agreement: {', '.join(f'{k} {v:.3f}' for k, v in agree.items())})")
    return tuple(chosen)


class FeatureSqueezingDetector(Detector):
    """Feature Squeezing detector: ``FeatureSqueezingDetector(model, squeezers=("bit_depth_1",
    "median_2x2"), fpr=0.05).fit(x_clean)``.

    ``fit(x_clean, x_adv=None)`` uses the clean images only (``x_adv`` is accepted for the common
    interface and ignored, as in the paper): the threshold is the ``1 - fpr`` quantile of the
    clean scores. ``score(x)`` is the L1 distance between softmax outputs (in [0, 2]), maximised
    over squeezers; ``predict(x)`` is ``score > threshold_``. One forward of ``x`` plus one per
    squeezer.

    Raises: ``ValueError`` for an unknown squeezer, an empty list or ``fpr`` outside (0, 1).
    """

    def __init__(self, model: nn.Module, squeezers: Sequence[str] = ("bit_depth_1", "median_2x2"),
                 fpr: float = 0.05, batch_size: int = 512):
        super().__init__(model, batch_size)
        if isinstance(squeezers, str):
            squeezers = (squeezers,)
        squeezers = tuple(squeezers)
        if not squeezers:
            raise ValueError("squeezers must name at least one squeezer")
        self._fns = [_squeezer(s) for s in squeezers]
        self.squeezers = squeezers
        if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0 < fpr < 1:
            raise ValueError(f"fpr must be a number in (0, 1), got {fpr!r}")
        self.fpr = float(fpr)

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, name="x")
        model = self.model
        with frozen_model(model), torch.no_grad():
            dev = model_device(model, x.device)
            x = x.to(dev)
            p = F.softmax(as_logits(model(x), x.shape[0]).float(), 1)
            # all squeezed versions in one forward
            xs = torch.cat([fn(x) for fn in self._fns])
            ps = F.softmax(as_logits(model(xs), xs.shape[0]).float(), 1).view(len(self._fns), x.shape[0], -1)
        return (ps - p[None]).abs().sum(2).amax(0)

    def score(self, x) -> torch.Tensor:
        """Squeezing score ``[N]`` (L1 distance of softmax outputs, max over squeezers)."""
        return torch.cat([self._scores(xb) for xb in _iter_images(x, self.batch_size, "x")])

    def fit(self, x_clean, x_adv=None) -> "FeatureSqueezingDetector":
        """Set ``threshold_`` so that a fraction ``fpr`` of ``x_clean`` scores above it.

        ``x_clean``: clean images ``[N, C, H, W]`` in [0, 1] (or batches); ``x_adv`` is ignored.
        The false-positive rate holds for images like ``x_clean`` (same distribution), up to the
        sampling error of a quantile of ``N`` scores (about ``sqrt(fpr (1 - fpr) / N)``): for an
        FPR that holds on new data, pass clean images the model was not trained on when it may
        treat its training images differently (e.g. an overfitted model)."""
        s = self.score(x_clean).double().cpu()
        self.threshold_ = float(torch.quantile(s, 1 - self.fpr))
        self.clean_scores_ = s
        self._fitted = True
        return self

    def save(self, path: Union[str, os.PathLike]) -> None:
        """``torch.save`` of ``{format, squeezers, fpr, threshold}`` (plain values only)."""
        self._check_fitted("save")
        torch.save({"format": FORMAT, "squeezers": list(self.squeezers), "fpr": self.fpr,
                    "threshold": self.threshold_, "batch_size": self.batch_size}, os.fspath(path))

    @classmethod
    def load(cls, path: Union[str, os.PathLike], model: nn.Module) -> "FeatureSqueezingDetector":
        """Read a file written by :meth:`save` (``torch.load(weights_only=True)``)."""
        state = read_saved(path, FORMAT, "FeatureSqueezingDetector")
        det = cls(model, state["squeezers"], state["fpr"], state["batch_size"])
        det.threshold_ = float(state["threshold"])
        det._fitted = True
        return det
