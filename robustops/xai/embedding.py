"""Global view (Klawikowska et al. 2020, Sec. 3, Figs. 4-6): project LRP signatures to 2-D.

UMAP (McInnes et al. 2018) via umap-learn, the ``robustops[xai]`` extra; PCA (scikit-learn) first
when the signatures are wide, which keeps UMAP's neighbour search fast and denoises it.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch

from .errors import MissingExtraError

__all__ = ["project"]

METHODS = ("umap", "pca")


def _import_umap():
    try:
        import umap  # noqa: F401
    except ImportError as err:
        raise MissingExtraError(
            "project(method='umap') needs umap-learn, part of the robustops[xai] extra: "
            "pip install 'robustops[xai]' (or pip install umap-learn); method='pca' works without it"
        ) from err
    return umap


def project(signatures: Union[torch.Tensor, np.ndarray], method: str = "umap", seed: int = 0, *,
            n_components: int = 2, pca_components: int = 50, n_neighbors: int = 15, min_dist: float = 0.1,
            **umap_kwargs) -> Union[torch.Tensor, np.ndarray]:
    """Embed ``[N, D]`` signatures in ``n_components`` dimensions.

    Args:
        signatures: ``[N, D]`` tensor or array (e.g. :func:`~robustops.xai.lrp_signatures`), finite,
            N >= 3.
        method: ``"umap"`` (needs umap-learn) or ``"pca"``.
        seed: random state; the same seed gives the same embedding (UMAP then runs single-threaded).
        pca_components: with UMAP, signatures wider than this are first reduced by PCA to this many
            components (0 disables).
        n_neighbors, min_dist, **umap_kwargs: passed to ``umap.UMAP`` (``n_neighbors`` capped at N - 1).

    Returns:
        ``[N, n_components]`` float32, a tensor if ``signatures`` is one (on its device), else an array.

    Raises:
        :class:`~robustops.xai.errors.MissingExtraError` (an ``ImportError``) naming the ``[xai]``
        extra when umap-learn is missing; ``ValueError`` / ``TypeError`` for bad arguments.
    """
    is_tensor = isinstance(signatures, torch.Tensor)
    if is_tensor:
        device = signatures.device
        arr = signatures.detach().to("cpu", torch.float64).numpy()
    elif isinstance(signatures, np.ndarray):
        arr = signatures.astype(np.float64)
    else:
        raise TypeError(f"signatures must be a tensor or a numpy array, got {type(signatures).__name__}")
    if arr.ndim != 2:
        raise ValueError(f"signatures must be [N, D], got shape {arr.shape}")
    n, d = arr.shape
    if n < 3:
        raise ValueError(f"need at least 3 signatures to embed, got {n}")
    if not np.isfinite(arr).all():
        raise ValueError("signatures contain NaN or Inf")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(n_components, bool) or not isinstance(n_components, int) or not 1 <= n_components < n:
        raise ValueError(f"n_components must be an int in [1, N), got {n_components!r}")
    from sklearn.decomposition import PCA

    if method == "pca":
        k = min(n_components, d)
        emb = PCA(n_components=k, random_state=seed).fit_transform(arr)
        if k < n_components:
            emb = np.pad(emb, ((0, 0), (0, n_components - k)))
    else:
        umap = _import_umap()
        x = arr
        if pca_components and d > pca_components and n > pca_components:
            x = PCA(n_components=pca_components, random_state=seed).fit_transform(arr)
        nn_ = max(2, min(int(n_neighbors), n - 1))
        reducer = umap.UMAP(n_components=n_components, n_neighbors=nn_, min_dist=min_dist, random_state=seed,
                            **umap_kwargs)
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*n_jobs.*")
            warnings.filterwarnings("ignore", message=".*random_state.*")
            emb = reducer.fit_transform(x)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return torch.from_numpy(emb).to(device) if is_tensor else emb
