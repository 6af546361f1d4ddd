"""Clean vs adversarial explanations side by side (Klawikowska et al. 2020, Fig. 3)."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .._checks import as_logits, check_model
from .._guard import frozen_model, model_device
from .core import _check_batch, _targets, lrp
from .gradcam import gradcam

__all__ = ["ExplanationPair", "explain_pair"]


class ExplanationPair(NamedTuple):
    """Explanations of clean inputs and their adversarial versions (:func:`explain_pair`).

    Fields: ``clean``, ``adv`` (maps: like ``x`` for LRP, ``[N, H, W]`` for Grad-CAM), ``diff``
    (``adv - clean``), ``target_clean`` / ``target_adv`` (``[N]`` classes explained; equal unless
    ``target="own"``), ``pred_clean`` / ``pred_adv`` (``[N]`` predictions), ``success``
    (``[N]`` bool: the prediction changed).
    """

    clean: torch.Tensor
    adv: torch.Tensor
    diff: torch.Tensor
    target_clean: torch.Tensor
    target_adv: torch.Tensor
    pred_clean: torch.Tensor
    pred_adv: torch.Tensor
    success: torch.Tensor


def explain_pair(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, method: str = "lrp", target=None, *,
                 layer=None, **kwargs) -> ExplanationPair:
    """Explain ``x`` and ``x_adv`` side by side (Klawikowska et al. 2020, Fig. 3).

    Args:
        x, x_adv: clean and attacked batches of the same shape ``[N, ...]``.
        method: ``"lrp"`` (``kwargs`` go to :func:`lrp`: ``composite``, ``start``, ...) or
            ``"gradcam"`` (needs ``layer``; ``kwargs`` go to :func:`~robustops.xai.gradcam`).
        target: aligned targets, so the two maps answer the same question: None (default) explains
            both w.r.t. the clean prediction; an int / ``[N]`` labels for both; ``"own"`` explains
            each input w.r.t. its own prediction (what made the attacked input look like its new class).

    Returns:
        :class:`ExplanationPair` (fields ``clean``, ``adv``, ``diff``, ``target_clean``,
        ``target_adv``, ``pred_clean``, ``pred_adv``, ``success``), on ``x``'s device.
    """
    x = _check_batch(x, "x")
    x_adv = _check_batch(x_adv, "x_adv")
    if x.shape != x_adv.shape:
        raise ValueError(f"x and x_adv must have the same shape, got {tuple(x.shape)} and {tuple(x_adv.shape)}")
    if method not in ("lrp", "gradcam"):
        raise ValueError(f"method must be 'lrp' or 'gradcam', got {method!r}")
    check_model(model)
    n = x.shape[0]
    with frozen_model(model), torch.no_grad():
        device = model_device(model, default=x.device)
        logits = as_logits(model(torch.cat([x, x_adv]).to(device)), 2 * n)
    pred = logits.argmax(1).to(x.device)
    pred_clean, pred_adv = pred[:n], pred[n:]
    if isinstance(target, str):
        if target != "own":
            raise ValueError(f"target must be None, an int, [N] labels or 'own', got {target!r}")
        t_clean, t_adv = pred_clean, pred_adv
    else:
        t_clean = _targets(target, logits[:n]).to(x.device) if target is not None else pred_clean
        t_adv = t_clean
    both = torch.cat([x, x_adv])
    tt = torch.cat([t_clean, t_adv])
    if method == "lrp":
        if layer is not None:
            raise TypeError("layer is a Grad-CAM argument; for LRP pass composite=... instead")
        maps = lrp(model, both, tt, **kwargs)
    else:
        if layer is None:
            raise ValueError("method='gradcam' needs layer= (a module name or module)")
        maps = gradcam(model, both, layer, tt, **kwargs).to(x.device)
    clean, adv = maps[:n], maps[n:]
    return ExplanationPair(clean, adv, adv - clean, t_clean, t_adv, pred_clean, pred_adv, pred_clean != pred_adv)
