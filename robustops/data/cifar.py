"""CIFAR-10 "python version" batches (``cifar-10-batches-py``) read without a network.

Each batch is a pickled dict with ``b'data'`` (``N x 3072`` uint8: 1024 red, then 1024 green, then
1024 blue values, each plane row-major 32x32) and ``b'labels'`` (``N`` ints); ``batches.meta`` holds
``b'label_names'``. The pickles are read with a restricted unpickler that only accepts numpy array
reconstruction, so a tampered file cannot run code (plain ``pickle.load`` would).
"""
from __future__ import annotations

import io
import os
import pickle
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._dataset import ImageDataset, _check_limit

__all__ = ["read_cifar_batch", "load_cifar10", "cifar10_dir", "CIFAR10_CLASSES",
           "CIFAR10_TRAIN_BATCHES", "CIFAR10_TEST_BATCHES"]

PathLike = Union[str, "os.PathLike[str]"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{k}" for k in range(1, 6))
CIFAR10_TEST_BATCHES = ("test_batch",)
CIFAR10_FOLDER = "cifar-10-batches-py"

# The only globals a genuine batch (pickled by Python 2 numpy, or re-pickled by Python 3) needs.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    # Python 3 writing protocol <= 2 spells bytes as _codecs.encode(str, 'latin1'): a pure function.
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _get(d: dict, key: str) -> Any:
    # The real files have bytes keys (Python 2 str under encoding='bytes'); accept str keys too.
    if key.encode() in d:
        return d[key.encode()]
    return d.get(key)


def _load_pickle(path: str) -> dict:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        obj = _SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # truncated stream, forbidden global, garbage: all "not a batch"
        raise ValueError(f"{path}: not a readable CIFAR-10 pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def read_cifar_batch(path: PathLike, num_classes: int = 10) -> Tuple[np.ndarray, np.ndarray]:
    """Read one batch file into ``(images uint8 [N, 3, 32, 32], labels int64 [N])``.

    Raises ``ValueError`` naming the file when it is not a pickled dict with ``data`` (``N x 3072``
    uint8) and ``labels`` (``N`` values in ``[0, num_classes)``).
    """
    path = os.fspath(path)
    d = _load_pickle(path)
    data, labels = _get(d, "data"), _get(d, "labels")
    if data is None or labels is None:
        raise ValueError(f"{path}: missing b'data' or b'labels' (keys: {sorted(map(repr, d))})")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must be N x 3072, got shape {data.shape}")
    if data.dtype != np.uint8:
        raise ValueError(f"{path}: b'data' must be uint8, got {data.dtype}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise ValueError(f"{path}: {data.shape[0]} images but b'labels' has shape {labels.shape}")
    if labels.size and (not np.issubdtype(labels.dtype, np.integer)
                        or labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: labels must be integers in [0, {num_classes})")
    # Row layout is channel-major (R plane, G plane, B plane), so a reshape gives NCHW directly.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def cifar10_dir(root: PathLike) -> str:
    """The batches folder for ``root``: ``root`` itself if it holds batches, else ``root/cifar-10-batches-py``."""
    root = os.fspath(root)
    if any(os.path.isfile(os.path.join(root, b)) for b in CIFAR10_TRAIN_BATCHES + CIFAR10_TEST_BATCHES):
        return root
    return os.path.join(root, CIFAR10_FOLDER)


def _class_names(folder: str) -> List[str]:
    meta = os.path.join(folder, "batches.meta")
    if not os.path.isfile(meta):
        return list(CIFAR10_CLASSES)  # the meta file only restates the standard names
    names = _get(_load_pickle(meta), "label_names")
    if names is None or len(names) != len(CIFAR10_CLASSES):
        raise ValueError(f"{meta}: expected b'label_names' with {len(CIFAR10_CLASSES)} entries")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def load_cifar10(root: PathLike, split: str = "train", *, limit: Optional[int] = None,
                 batches: Optional[Sequence[str]] = None) -> ImageDataset:
    """Load CIFAR-10 from its python batches as ``[N, 3, 32, 32]`` float32 images in [0, 1].

    Args:
        root: the ``cifar-10-batches-py`` folder or its parent.
        split: ``"train"`` (``data_batch_1..5``), ``"test"`` (``test_batch``) or ``"all"`` (both).
        limit: keep the first ``limit`` examples; batches past the limit are not read.
        batches: explicit batch file names, overriding ``split``'s.

    Raises ``FileNotFoundError`` listing every missing batch path; ``ValueError`` for a bad split or
    a malformed batch.
    """
    limit = _check_limit(limit)
    if batches is None:
        if split == "train":
            batches = CIFAR10_TRAIN_BATCHES
        elif split == "test":
            batches = CIFAR10_TEST_BATCHES
        elif split == "all":
            batches = CIFAR10_TRAIN_BATCHES + CIFAR10_TEST_BATCHES
        else:
            raise ValueError(f"split must be one of 'train', 'test', 'all'; got {split!r}")
    folder = cifar10_dir(root)
    paths = [os.path.join(folder, b) for b in batches]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            "CIFAR-10 batch file(s) not found: " + ", ".join(missing) + ". Download the python "
            "version (cifar-10-python.tar.gz) yourself, extract it and pass root= the "
            f"'{CIFAR10_FOLDER}' folder or its parent (or set ROBUSTOPS_DATA); robustops never downloads.")
    classes = _class_names(folder)
    xs, ys, have = [], [], 0
    for p in paths:
        if limit is not None and have >= limit:
            break
        x, y = read_cifar_batch(p, num_classes=len(classes))
        if limit is not None:
            x, y = x[: limit - have], y[: limit - have]
        xs.append(x)
        ys.append(y)
        have += len(y)
    if xs:
        images, labels = np.concatenate(xs), np.concatenate(ys)
    else:  # limit=0
        images, labels = np.zeros((0, 3, 32, 32), np.uint8), np.zeros((0,), np.int64)
    data = torch.from_numpy(images).to(torch.float32).div_(255.0)
    return ImageDataset(data.contiguous(), torch.from_numpy(labels), classes, name="cifar10")
