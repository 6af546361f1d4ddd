"""scikit-learn's embedded handwritten digits (1,797 real 8x8 images): the always-available dataset.

It ships inside scikit-learn, so examples and tests can train a real classifier without any
download; ``size=`` upsamples the images (e.g. to MNIST's 28x28) for models built for larger inputs.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ._dataset import ImageDataset, _check_limit, _check_split

__all__ = ["load_digits", "digits_split_indices", "DIGITS_CLASSES"]

DIGITS_CLASSES = tuple(str(k) for k in range(10))


@functools.lru_cache(maxsize=1)
def _raw_digits() -> Tuple[np.ndarray, np.ndarray]:
    # Cached: sklearn re-parses a CSV on every call. The arrays never leave this module: every load
    # indexes them into fresh tensors, so callers cannot change the cache.
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a declared dependency
        raise ImportError("robustops.data.load_digits needs scikit-learn "
                          "(pip install scikit-learn)") from exc
    bunch = _sk_load_digits()
    images = np.ascontiguousarray(bunch.images, dtype=np.float32)  # [1797, 8, 8], values 0..16
    labels = np.ascontiguousarray(bunch.target, dtype=np.int64)
    return images, labels


def _check_fraction(test_fraction: float) -> None:
    if not isinstance(test_fraction, (int, float)) or isinstance(test_fraction, bool) \
            or not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")


def digits_split_indices(labels: Union[np.ndarray, torch.Tensor], test_fraction: float = 0.25,
                         seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Deterministic stratified train/test split of ``labels``.

    Each class is shuffled with one seeded :class:`torch.Generator` (classes visited in ascending
    order) and ``round(n_c * test_fraction)`` of its examples go to the test part. Both index tensors
    are returned sorted, so the split keeps the original (class-interleaved) order of the data.
    """
    _check_fraction(test_fraction)
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    gen = torch.Generator().manual_seed(int(seed))
    train_parts, test_parts = [], []
    for c in torch.unique(labels_t).tolist():  # sorted: the generator is consumed in a fixed order
        idx = torch.nonzero(labels_t == c, as_tuple=False).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_test = int(round(idx.numel() * float(test_fraction)))
        test_parts.append(idx[:n_test])
        train_parts.append(idx[n_test:])
    train = torch.sort(torch.cat(train_parts)).values
    test = torch.sort(torch.cat(test_parts)).values
    return train, test


def load_digits(split: str = "train", *, size: Optional[Union[int, Tuple[int, int]]] = None,
                test_fraction: float = 0.25, seed: int = 0,
                limit: Optional[int] = None) -> ImageDataset:
    """Load scikit-learn's digits as an :class:`ImageDataset` of ``[N, 1, 8, 8]`` images in [0, 1].

    Args:
        split: ``"train"``, ``"test"`` or ``"all"`` (all 1,797 images in their original order).
        size: optional output size, an int (square) or ``(H, W)``; images are upsampled with
            bilinear interpolation (``align_corners=False``), e.g. ``size=28`` for MNIST-shaped input.
        test_fraction: share of each class held out for ``split="test"``; stratified, see
            :func:`digits_split_indices`.
        seed: seed of the split; the same seed always gives the same split.
        limit: keep only the first ``limit`` examples of the split (all of them if fewer).

    Pixels are the original 0..16 intensities divided by 16. No network access.
    """
    _check_split(split)
    limit = _check_limit(limit)
    images, labels = _raw_digits()
    if split == "all":
        # Still validate test_fraction: a bad value should fail whatever the split.
        _check_fraction(test_fraction)
        idx = torch.arange(labels.shape[0])
    else:
        train_idx, test_idx = digits_split_indices(labels, test_fraction, seed)
        idx = train_idx if split == "train" else test_idx
    if limit is not None:
        idx = idx[:limit]
    x = torch.from_numpy(images)[idx].unsqueeze(1) / 16.0  # index copies: cache untouched
    y = torch.from_numpy(labels)[idx]
    if size is not None:
        x = _resize(x, size)
    return ImageDataset(x.contiguous(), y, DIGITS_CLASSES, name="digits")


def _resize(x: torch.Tensor, size: Union[int, Tuple[int, int]]) -> torch.Tensor:
    if isinstance(size, bool):
        raise ValueError(f"size must be an int or (H, W) of positive ints, got {size!r}")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in hw):
        raise ValueError(f"size must be an int or (H, W) of positive ints, got {size!r}")
    if tuple(x.shape[-2:]) == hw:
        return x
    if x.shape[0] == 0:
        return x.new_zeros((0, x.shape[1]) + hw)
    out = F.interpolate(x, size=hw, mode="bilinear", align_corners=False)
    # Bilinear weights are convex so this is a no-op up to rounding; it guarantees the [0, 1] contract.
    return out.clamp_(0.0, 1.0)
