"""Shared detector interface: ``fit`` / ``score`` / ``predict``, the named errors, evaluation."""
from __future__ import annotations

import os
from typing import Dict, Union

import numpy as np
import torch
from torch import nn

from .._checks import check_model

__all__ = ["Detector", "NotFittedError", "ShapeMismatchError", "NoAdversarialError", "evaluate_detector"]


class NotFittedError(RuntimeError):
    """``predict`` / ``score`` / ``save`` called before ``fit``."""


class ShapeMismatchError(ValueError):
    """Clean and adversarial sets whose images (or pairing) do not match."""


class NoAdversarialError(ValueError):
    """The adversarial set holds no successful adversarial example (the attack changed no prediction)."""


def read_saved(path: Union[str, os.PathLike], fmt: str, kind: str) -> dict:
    """The dict a detector's ``save`` wrote to ``path``, read with ``torch.load(weights_only=True)``
    (a file holding anything but tensors and plain containers raises ``pickle.UnpicklingError``
    instead of running code). Raises ``ValueError`` when it is not a ``kind`` file (format tag
    ``fmt``)."""
    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise ValueError(f"{os.fspath(path)!r} is not a saved {kind} (format {fmt})")
    return state


class Detector:
    """Base class: a detector of adversarial inputs for one model.

    ``fit(x_clean, x_adv)`` returns self; ``score(x) -> Tensor[N]`` (higher = more adversarial);
    ``predict(x) -> BoolTensor[N]`` (True = adversarial). Inputs are image tensors ``[N, ...]``
    in [0, 1] or iterables of batches (``DataLoader``); the model is run under
    ``robustops._guard.frozen_model`` and never changed.
    """

    def __init__(self, model: nn.Module, batch_size: int = 512):
        self.model = check_model(model)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        self._fitted = False

    @property
    def is_fitted(self) -> bool:
        return self._fitted

    def _check_fitted(self, what: str) -> None:
        if not self._fitted:
            raise NotFittedError(f"{type(self).__name__}.{what}() called before fit(); call fit(x_clean, x_adv) first")

    def score(self, x) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decide(self, scores: torch.Tensor) -> torch.Tensor:
        """Turn scores into decisions (True = adversarial)."""
        self._check_fitted("decide")
        return scores > self.threshold_

    def predict(self, x) -> torch.Tensor:
        """``BoolTensor[N]``: True where ``x`` is judged adversarial."""
        self._check_fitted("predict")
        return self.decide(self.score(x))


def evaluate_detector(det: Detector, x_clean, x_adv) -> Dict[str, float]:
    """Detection metrics of a fitted detector on held-out clean and adversarial images.

    Args:
        det: a fitted detector (``RelevantNeuronDetector``, ``FeatureSqueezingDetector``,
            ``NICDetector``).
        x_clean: clean images ``[Nc, ...]`` in [0, 1] (or batches); label 0.
        x_adv: adversarial images ``[Na, ...]`` (pass only successful ones); label 1.

    Returns:
        ``dict(accuracy, tpr, fpr, roc_auc, n_clean, n_adv)``: accuracy over both sets,
        true-positive rate on ``x_adv``, false-positive rate on ``x_clean``, ROC AUC of
        ``det.score`` (scikit-learn ``roc_auc_score``), and the set sizes. Each image runs
        through the model once (the decision is taken from the same scores).

    Raises:
        NotFittedError: ``det`` is not fitted.
        TypeError: ``det`` is not a detector.
    """
    if not isinstance(det, Detector):
        raise TypeError(f"det must be a robustops.detect detector, got {type(det).__name__}")
    det._check_fitted("evaluate")
    s_clean = det.score(x_clean).detach().cpu()
    s_adv = det.score(x_adv).detach().cpu()
    p_clean = det.decide(s_clean).cpu()
    p_adv = det.decide(s_adv).cpu()
    n_c, n_a = s_clean.numel(), s_adv.numel()
    tp = int(p_adv.sum())
    fp = int(p_clean.sum())
    y = np.r_[np.zeros(n_c), np.ones(n_a)]
    s = torch.cat([s_clean, s_adv]).double().numpy()
    from sklearn.metrics import roc_auc_score
    auc = float(roc_auc_score(y, s)) if n_c and n_a else float("nan")
    return {"accuracy": (tp + (n_c - fp)) / max(n_c + n_a, 1), "tpr": tp / max(n_a, 1), "fpr": fp / max(n_c, 1),
            "roc_auc": auc, "n_clean": n_c, "n_adv": n_a}
