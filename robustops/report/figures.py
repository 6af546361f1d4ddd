"""Figures of the report (matplotlib, Agg backend, PNG files)."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["have_matplotlib", "fgsm_curves", "roc_curves", "heatmap_grid", "embedding", "speedups",
           "dropout_panels", "targeting_lines", "PALETTE"]

PALETTE = ["#1f5fa8", "#d1495b", "#2e933c", "#edae49", "#6a4c93", "#00798c"]


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "axes.spines.top": False,
        "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.25, "legend.frameon": False,
        "figure.dpi": 110, "savefig.bbox": "tight",
    })
    return plt


def _save(fig, path: str) -> str:
    plt = _plt()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fgsm_curves(curves: Dict[str, Tuple[Sequence[float], Sequence[float]]], path: str,
                pgd: Optional[Dict[str, Tuple[float, float]]] = None,
                autoattack: Optional[Dict[str, Tuple[float, float]]] = None) -> str:
    """Accuracy vs eps, one line per model; PGD / AutoAttack points at their eps."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    for i, (label, (eps, acc)) in enumerate(curves.items()):
        c = PALETTE[i % len(PALETTE)]
        ax.plot(eps, 100 * np.asarray(acc), marker="o", ms=3.5, color=c, label=f"{label}: FGSM")
        if pgd and label in pgd:
            e, a = pgd[label]
            ax.scatter([e], [100 * a], marker="s", s=36, color=c, edgecolor="black", zorder=5,
                       label=f"{label}: PGD")
        if autoattack and label in autoattack:
            e, a = autoattack[label]
            ax.scatter([e], [100 * a], marker="X", s=50, color=c, edgecolor="black", zorder=6,
                       label=f"{label}: AutoAttack")
    ax.set_xlabel("L-inf budget eps (pixels in [0, 1])")
    ax.set_ylabel("accuracy under attack (%)")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=7.5, loc="upper right")
    ax.set_title("Accuracy vs attack strength")
    return _save(fig, path)


def roc_curves(per_model: Dict[str, Dict[str, Tuple[np.ndarray, np.ndarray, float]]], path: str) -> str:
    """One panel per model: ROC curve of every detector, AUC in the legend."""
    plt = _plt()
    n = len(per_model)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), squeeze=False)
    for ax, (label, dets) in zip(axes[0], per_model.items()):
        for i, (name, (fpr, tpr, auc)) in enumerate(dets.items()):
            ax.plot(fpr, tpr, color=PALETTE[i % len(PALETTE)], label=f"{name} (AUC {auc:.3f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_xlabel("false-positive rate (clean flagged)")
        ax.set_ylabel("true-positive rate (adversarial caught)")
        ax.set_title(label)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def _show_image(ax, img: np.ndarray):
    if img.shape[0] == 1:
        ax.imshow(img[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(np.clip(img.transpose(1, 2, 0), 0, 1), interpolation="nearest")


def _show_heat(ax, heat: np.ndarray, signed: bool, scale: float):
    if signed:
        ax.imshow(heat, cmap="bwr", vmin=-scale, vmax=scale, interpolation="nearest")
    else:
        ax.imshow(heat, cmap="magma", vmin=0, vmax=scale, interpolation="nearest")


def heatmap_grid(rows: List[dict], columns: List[Tuple[str, str, bool]], path: str, title: str) -> str:
    """A grid: one row per example, columns ``(key, header, signed)``; image keys hold ``[C, H, W]``
    arrays in [0, 1], heatmap keys ``[H, W]``. Each heatmap row pair (clean/adv) shares one colour
    scale so their magnitudes compare; ``row["caption"]`` labels the row."""
    plt = _plt()
    nr, nc = len(rows), len(columns)
    fig, axes = plt.subplots(nr, nc, figsize=(1.35 * nc + 0.4, 1.45 * nr + 0.5), squeeze=False)
    for r, row in enumerate(rows):
        scales = {}
        for key, _, signed in columns:
            v = row.get(key)
            if v is not None and v.ndim == 2:
                group = key.split(":")[0]
                scales[group] = max(scales.get(group, 0.0), float(np.abs(v).max()) or 1e-12)
        for c, (key, header, signed) in enumerate(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            v = row.get(key)
            if v is None:
                ax.axis("off")
            elif v.ndim == 3:
                _show_image(ax, v)
            else:
                _show_heat(ax, v, signed, scales[key.split(":")[0]])
            if r == 0:
                ax.set_title(header, fontsize=7.5)
            if c == 0:
                ax.set_ylabel(row.get("caption", ""), fontsize=7)
    fig.suptitle(title, fontsize=9.5)
    fig.tight_layout()
    return _save(fig, path)


def embedding(panels: Dict[str, dict], path: str) -> str:
    """Per model two scatter plots of a 2-D embedding: coloured by class, and by clean / adversarial
    (attack succeeded) / adversarial (attack failed)."""
    plt = _plt()
    n = len(panels)
    fig, axes = plt.subplots(n, 2, figsize=(8.2, 3.5 * n), squeeze=False)
    for r, (label, p) in enumerate(panels.items()):
        emb, cls, kind = np.asarray(p["emb"]), np.asarray(p["cls"]), np.asarray(p["kind"])
        ax = axes[r][0]
        sc = ax.scatter(emb[:, 0], emb[:, 1], c=cls, cmap="tab10", s=7, alpha=0.8, linewidths=0)
        ax.set_title(f"{label}: coloured by class ({p['method']})")
        handles, _ = sc.legend_elements(num=sorted(set(cls.tolist())))
        ax.legend(handles, [str(k) for k in sorted(set(cls.tolist()))], fontsize=6, ncol=2, loc="best",
                  title="class", title_fontsize=6)
        ax = axes[r][1]
        styles = [(0, "clean", "#9aa5b1", "o"), (1, "adversarial, attack succeeded", "#d1495b", "^"),
                  (2, "adversarial, attack failed", "#1f5fa8", "s")]
        for k, name, color, marker in styles:
            m = kind == k
            if m.any():
                ax.scatter(emb[m, 0], emb[m, 1], s=8, c=color, marker=marker, alpha=0.75, linewidths=0,
                           label=f"{name} ({int(m.sum())})")
        ax.set_title(f"{label}: clean vs attacked")
        ax.legend(fontsize=6.5, loc="best")
        for a in axes[r]:
            a.set_xticks([])
            a.set_yticks([])
    fig.tight_layout()
    return _save(fig, path)


def speedups(records: List[dict], path: str) -> str:
    """Horizontal bars: speed-up of each compiled op over its eager reference (1x line)."""
    plt = _plt()
    labels = [f"{r['op']}\n{r['shape']}" for r in records]
    vals = [r["speedup"] for r in records]
    fig, ax = plt.subplots(figsize=(6.0, 0.55 * len(records) + 0.9))
    y = np.arange(len(records))
    colors = [PALETTE[2] if v >= 1 else PALETTE[1] for v in vals]
    ax.barh(y, vals, color=colors, height=0.55)
    ax.axvline(1.0, color="black", linewidth=1)
    for yi, v in zip(y, vals):
        ax.text(v, yi, f" {v:.2f}x", va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7.5)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over the eager reference (this run, same process)")
    ax.set_xlim(0, max(vals + [1.0]) * 1.25)
    ax.grid(axis="y", visible=False)
    return _save(fig, path)


def dropout_panels(per_model: Dict[str, dict], path: str) -> str:
    """Per model (columns): accuracy with each kernel removed, mean line, S / S' markers (top row);
    accuracy on the fixed FGSM set with each kernel removed (bottom row)."""
    plt = _plt()
    n = len(per_model)
    fig, axes = plt.subplots(2, n, figsize=(4.6 * n, 5.2), squeeze=False, sharex="col")
    for c, (label, p) in enumerate(per_model.items()):
        acc = 100 * np.asarray(p["clean"])
        idx = np.arange(acc.size)
        fr = np.asarray(p["fragile"], dtype=int)
        nu = np.asarray(p["null"], dtype=int)
        ax = axes[0][c]
        ax.axhline(100 * p["baseline"], color="grey", linestyle="--", linewidth=1, label="no kernel removed")
        ax.axhline(acc.mean(), color=PALETTE[1], linewidth=1, label="mean (split line)")
        ax.scatter(idx[fr], acc[fr], marker="o", facecolors="none", edgecolors=PALETTE[0], s=30,
                   label=f"fragile S ({fr.size})")
        ax.scatter(idx[nu], acc[nu], marker="*", color="black", s=30, label=f"null S' ({nu.size})")
        ax.set_ylabel("clean accuracy (%)")
        ax.set_title(f"{label}: {p['layer']}")
        ax.legend(fontsize=6.5, loc="lower left")
        ax = axes[1][c]
        if p.get("adv") is not None:
            adv = 100 * np.asarray(p["adv"])
            if p.get("adv_baseline") is not None:
                ax.axhline(100 * p["adv_baseline"], color="grey", linestyle="--", linewidth=1,
                           label="no kernel removed")
            ax.bar(idx, adv, color=[PALETTE[0] if k in set(fr.tolist()) else "#444444" for k in idx], width=0.7)
            lo = max(0.0, adv.min() - 5)
            ax.set_ylim(lo, min(100.0, max(adv.max(), 100 * (p.get("adv_baseline") or 0)) + 3))
            ax.set_ylabel(f"FGSM eps {p['adv_eps']:g} accuracy (%)")
            ax.legend(fontsize=6.5, loc="upper right", framealpha=0.9, frameon=True)
        ax.set_xlabel(f"kernel of {p['layer']} removed (blue: S, dark: S')")
    fig.tight_layout()
    return _save(fig, path)


def targeting_lines(per_model: Dict[str, Tuple[Sequence[float], Sequence[float]]], path: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 3.2))
    for i, (label, (eps, pct)) in enumerate(per_model.items()):
        ax.plot(eps, pct, marker="o", ms=4, color=PALETTE[i % len(PALETTE)], label=label)
    ax.axhline(50, color="grey", linestyle=":", linewidth=1)
    ax.set_ylim(0, 100)
    ax.set_xlabel("FGSM eps")
    ax.set_ylabel("% of examples hitting S harder than S'")
    ax.set_title("Adversarial targeting (Algorithm 1)")
    ax.legend(fontsize=7.5)
    return _save(fig, path)
