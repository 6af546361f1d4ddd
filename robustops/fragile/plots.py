"""Plots of the fragile-kernel analysis (matplotlib, an optional extra: ``pip install robustops[xai]``).

* :func:`plot_kernel_performance` - paper Fig. 1: performance with each kernel removed, the mean
  line, fragile kernels (below) and null kernels (above).
* :func:`plot_targeting` - paper Figs. 2/3: % of examples attacking S per eps, before / after.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Union

import torch

from .dropout import KernelDropoutResult
from .split import FragileSplit, fragile_split
from .targeting import TargetingResult

__all__ = ["plot_kernel_performance", "plot_targeting"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("robustops.fragile.plots needs matplotlib: pip install robustops[xai]") from exc
    return plt


def plot_kernel_performance(result: KernelDropoutResult, path: Union[str, os.PathLike], *,
                            split: Optional[FragileSplit] = None, metric: str = "clean_accuracy",
                            title: Optional[str] = None) -> str:
    """Fig. 1: per-kernel accuracy with that kernel removed, mean line, S (circles) and S' (stars)."""
    plt = _pyplot()
    split = split if split is not None else fragile_split(result, metric=metric)
    scores = getattr(result, metric).double()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    idx = torch.arange(scores.numel())
    ax.scatter(idx[split.fragile], scores[split.fragile], marker="o", facecolors="none", edgecolors="tab:blue",
               label=f"fragile S ({split.fragile.numel()})")
    ax.scatter(idx[split.null], scores[split.null], marker="*", color="black", label=f"null S' ({split.null.numel()})")
    ax.axhline(float(scores.mean()), color="tab:red", label="mean")
    base = result.baseline_accuracy if metric == "clean_accuracy" else result.baseline_adversarial_accuracy
    if base is not None and metric != "clean_loss":
        ax.axhline(base, color="grey", linestyle="--", label="no kernel removed")
    ax.set_xlabel(f"kernel of {result.layer} removed")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(title or f"One-kernel dropout of {result.layer}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_targeting(curves: Dict[str, TargetingResult], path: Union[str, os.PathLike], *,
                   title: Optional[str] = None, log_eps: bool = False) -> str:
    """Figs. 2/3: percentage of examples attacking the fragile kernels S per eps, one line per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, r in curves.items():
        ax.plot(r.eps.numpy(), r.percentage.numpy(), marker="o", label=label)
    ax.axhline(50, color="grey", linestyle=":", linewidth=1)
    if log_eps:
        ax.set_xscale("log")
    ax.set_xlabel("FGSM eps")
    ax.set_ylabel("% examples attacking S")
    ax.set_ylim(0, 100)
    ax.set_title(title or "Adversarial targeting (Alg. 1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
