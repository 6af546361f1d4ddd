"""Matplotlib figures of heatmaps (Klawikowska et al. 2020, Fig. 3) and of embeddings (Figs. 4-6).

matplotlib is part of the ``robustops[xai]`` extra; figures are returned, never shown or saved.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .errors import MissingExtraError

__all__ = ["plot_heatmaps", "plot_embedding"]


def _plt():
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise MissingExtraError("plotting needs matplotlib, part of the robustops[xai] extra: "
                                "pip install 'robustops[xai]'") from err
    return plt


def _as_maps(maps) -> np.ndarray:
    """``[N, H, W]`` numpy from ``[N, H, W]`` or ``[N, C, H, W]`` (channels summed)."""
    if isinstance(maps, torch.Tensor):
        maps = maps.detach().to("cpu", torch.float64).numpy()
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim == 4:
        maps = maps.sum(1)
    if maps.ndim != 3:
        raise ValueError(f"heatmaps must be [N, H, W] or [N, C, H, W], got shape {maps.shape}")
    return maps


def _as_images(images) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().to("cpu", torch.float64).numpy()
    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 4:
        images = images[:, 0] if images.shape[1] == 1 else np.moveaxis(images, 1, -1)
    if images.ndim not in (3, 4):
        raise ValueError(f"images must be [N, C, H, W] or [N, H, W], got shape {images.shape}")
    return np.clip(images, 0, 1)


def plot_heatmaps(maps, images=None, titles: Optional[Sequence[str]] = None, *, cmap: str = "bwr",
                  symmetric: bool = True, max_images: int = 8, figsize_per: float = 1.8):
    """A grid of heatmaps, optionally under the images they explain.

    Args:
        maps: ``[N, H, W]`` / ``[N, C, H, W]`` (channels summed; LRP maps are like ``x``), or an
            :class:`~robustops.xai.ExplanationPair` (then ``images`` may be ``(x, x_adv)`` and the
            rows are clean image, clean map, attacked image, attacked map, difference).
        images: ``[N, C, H, W]`` / ``[N, H, W]`` in [0, 1], shown in a row above the maps.
        titles: one title per column (e.g. predicted classes).
        cmap: colour map; ``"bwr"`` shows positive relevance red, negative blue (the paper's).
        symmetric: colour range ``[-m, m]`` with ``m`` the largest ``|value|`` of each map.
        max_images: at most this many columns.

    Returns:
        a ``matplotlib.figure.Figure``.
    """
    from .pair import ExplanationPair

    plt = _plt()
    rows = []
    if isinstance(maps, ExplanationPair):
        imgs = (None, None) if images is None else images
        if len(imgs) != 2:
            raise ValueError("with an ExplanationPair, images must be (x, x_adv) or None")
        for img, m, label in ((imgs[0], maps.clean, "clean"), (imgs[1], maps.adv, "attacked")):
            if img is not None:
                rows.append(("image", _as_images(img), f"{label} input"))
            rows.append(("map", _as_maps(m), f"{label} map"))
        rows.append(("map", _as_maps(maps.diff), "difference"))
        if titles is None:
            titles = [f"{int(a)} -> {int(b)}" for a, b in zip(maps.pred_clean, maps.pred_adv)]
    else:
        if images is not None:
            rows.append(("image", _as_images(images), "input"))
        rows.append(("map", _as_maps(maps), "relevance"))
    n = min(min(r[1].shape[0] for r in rows), int(max_images))
    if n < 1:
        raise ValueError("nothing to plot (0 maps)")
    fig, axes = plt.subplots(len(rows), n, figsize=(figsize_per * n, figsize_per * len(rows)), squeeze=False)
    for i, (kind, data, label) in enumerate(rows):
        for j in range(n):
            ax = axes[i, j]
            if kind == "image":
                ax.imshow(data[j], cmap="gray" if data.ndim == 3 else None, vmin=0, vmax=1)
            else:
                m = data[j]
                lim = float(np.abs(m).max()) or 1.0
                kw = dict(vmin=-lim, vmax=lim) if symmetric else {}
                ax.imshow(m, cmap=cmap, **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
            if i == 0 and titles is not None and j < len(titles):
                ax.set_title(str(titles[j]), fontsize=8)
    fig.tight_layout()
    return fig


def plot_embedding(embedding, labels=None, success=None, adversarial=None, *,
                   class_names: Optional[Sequence[str]] = None, title: Optional[str] = None,
                   point_size: float = 12.0):
    """Scatter plots of a 2-D embedding (:func:`~robustops.xai.project`), paper Figs. 4-6.

    Args:
        embedding: ``[N, 2]`` tensor or array.
        labels: ``[N]`` classes: the first panel is coloured by class.
        success: ``[N]`` bool, "attack succeeded": a panel coloured by it (grey: not attacked or
            failed, red: succeeded).
        adversarial: ``[N]`` bool, which points are attacked inputs: drawn as crosses, clean ones
            as dots, in every panel.
        class_names: legend names for the classes.

    Returns:
        a ``matplotlib.figure.Figure`` with one panel per colouring given (one plain panel when
        neither ``labels`` nor ``success`` is given).
    """
    plt = _plt()
    emb = embedding.detach().cpu().numpy() if isinstance(embedding, torch.Tensor) else np.asarray(embedding)
    if emb.ndim != 2 or emb.shape[1] != 2:
        raise ValueError(f"embedding must be [N, 2], got shape {emb.shape}")
    n = emb.shape[0]

    def vec(v, name, dtype):
        if v is None:
            return None
        a = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        if a.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {a.shape}")
        return a.astype(dtype)

    labels = vec(labels, "labels", np.int64)
    success = vec(success, "success", bool)
    adversarial = vec(adversarial, "adversarial", bool)
    panels = [p for p in (("class", labels), ("attack succeeded", success)) if p[1] is not None] or [("points", None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    groups = [(np.ones(n, bool), "o", None)] if adversarial is None else \
        [(~adversarial, "o", "clean"), (adversarial, "x", "attacked")]
    cmap = plt.get_cmap("tab10")
    for ax, (kind, values) in zip(axes[0], panels):
        for mask, marker, gname in groups:
            if not mask.any():
                continue
            if kind == "class":
                for c in np.unique(values[mask]):
                    sel = mask & (values == c)
                    name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
                    ax.scatter(emb[sel, 0], emb[sel, 1], s=point_size, marker=marker, color=cmap(int(c) % 10),
                               label=f"{name}" + (f" ({gname})" if gname else ""))
            elif kind == "attack succeeded":
                for flag, colour, fname in ((False, "0.6", "no"), (True, "tab:red", "yes")):
                    sel = mask & (values == flag)
                    if sel.any():
                        ax.scatter(emb[sel, 0], emb[sel, 1], s=point_size, marker=marker, color=colour,
                                   label=f"success: {fname}" + (f" ({gname})" if gname else ""))
            else:
                ax.scatter(emb[mask, 0], emb[mask, 1], s=point_size, marker=marker, label=gname)
        ax.set_title(f"coloured by {kind}" if kind != "points" else "embedding", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, markerscale=1.0, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
