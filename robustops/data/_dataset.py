"""The in-memory image dataset every ``robustops.data`` loader returns, and small helpers."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

__all__ = ["ImageDataset", "as_tensors"]


class ImageDataset(Dataset):
    """Images and labels held as two tensors (the whole set fits in memory for every dataset here).

    Attributes:
        data: ``float32`` tensor ``[N, C, H, W]`` with pixels in ``[0, 1]`` (normalisation belongs
            in the model, as for every robustops attack).
        targets: ``int64`` tensor ``[N]`` of class indices in ``[0, len(classes))``.
        classes: class names, index ``k`` names label ``k``.
        name: short name of the source (``"digits"``, ``"mnist"``, ...), for reprs and reports.

    ``dataset[i]`` returns ``(image [C, H, W], label [])`` so the set works with a plain
    :class:`torch.utils.data.DataLoader`; :func:`as_tensors` gives the whole set at once.
    """

    def __init__(self, data: torch.Tensor, targets: torch.Tensor, classes: Sequence[str],
                 name: str = "dataset") -> None:
        if not isinstance(data, torch.Tensor) or data.dim() != 4:
            raise ValueError(f"ImageDataset: data must be a 4-D tensor [N, C, H, W], got "
                             f"{type(data).__name__} with shape {tuple(getattr(data, 'shape', ()))}")
        if data.dtype != torch.float32:
            raise ValueError(f"ImageDataset: data must be float32, got {data.dtype}")
        if not isinstance(targets, torch.Tensor) or targets.dim() != 1 or targets.dtype != torch.int64:
            raise ValueError("ImageDataset: targets must be a 1-D int64 tensor, got "
                             f"{getattr(targets, 'dtype', type(targets).__name__)} with shape "
                             f"{tuple(getattr(targets, 'shape', ()))}")
        if data.shape[0] != targets.shape[0]:
            raise ValueError(f"ImageDataset: {data.shape[0]} images but {targets.shape[0]} labels")
        self.data = data
        self.targets = targets
        self.classes = list(classes)
        self.name = name

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.data[index], self.targets[index]

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.data.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        return (f"ImageDataset(name={self.name!r}, n={len(self)}, image=({c}, {h}, {w}), "
                f"classes={self.num_classes})")


def _check_limit(limit: Optional[int]) -> Optional[int]:
    # bool is an int subclass: `limit=True` is almost surely a mistake, so reject it explicitly.
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be None or a non-negative int, got {limit!r}")
    return limit


def _check_split(split: str, allowed: Sequence[str] = ("train", "test", "all")) -> str:
    if split not in allowed:
        raise ValueError(f"split must be one of {', '.join(repr(s) for s in allowed)}; got {split!r}")
    return split


def as_tensors(dataset: Union[Dataset, Subset, TensorDataset],
               device: Optional[Union[str, torch.device]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return the whole dataset as ``(x, y)`` tensors.

    For an :class:`ImageDataset` this is ``(dataset.data, dataset.targets)`` without a copy (unless
    ``device`` moves them). A :class:`~torch.utils.data.TensorDataset` gives its first two tensors, a
    :class:`~torch.utils.data.Subset` is indexed through to its parent, and any other map-style
    dataset of ``(image, label)`` pairs is stacked item by item.
    """
    if isinstance(dataset, ImageDataset):
        x, y = dataset.data, dataset.targets
    elif isinstance(dataset, TensorDataset):
        if len(dataset.tensors) < 2:
            raise ValueError("as_tensors: TensorDataset needs at least two tensors (x, y)")
        x, y = dataset.tensors[0], dataset.tensors[1]
    elif isinstance(dataset, Subset):
        px, py = as_tensors(dataset.dataset)
        idx = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        x, y = px[idx], py[idx]
    else:
        # Generic fallback: one __getitem__ per example (slow for big sets, but always correct).
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError("as_tensors: cannot infer tensor shapes from an empty dataset")
        xs, ys = zip(*(dataset[i] for i in range(n)))
        x = torch.stack([torch.as_tensor(v) for v in xs])
        y = torch.as_tensor([int(v) for v in ys], dtype=torch.int64)
    if device is not None:
        x, y = x.to(device), y.to(device)
    return x, y
