"""Datasets for robustness experiments, read from local files only (never a download).

Every loader returns an :class:`ImageDataset`: ``.data`` float32 ``[N, C, H, W]`` in [0, 1],
``.targets`` int64 ``[N]``, ``.classes`` names. Pixels stay in [0, 1] because attacks clamp there;
normalisation belongs in the model.

=================  ===========  ==========================================================
name               image        where the files come from
=================  ===========  ==========================================================
``digits``         1 x 8 x 8    embedded in scikit-learn (1,797 images); ``size=`` upsamples
``fashion-mnist``  1 x 28 x 28  ``apt-get install dataset-fashion-mnist`` (60k / 10k)
``mnist``          1 x 28 x 28  IDX files you downloaded: ``root=`` or ``$ROBUSTOPS_DATA``
``cifar10``        3 x 32 x 32  python batches you downloaded: ``root=`` or ``$ROBUSTOPS_DATA``
=================  ===========  ==========================================================

Example::

    from robustops import data
    train = data.load("digits", split="train", size=28)
    x, y = data.as_tensors(data.load("fashion-mnist", split="test", limit=1000))
"""
from __future__ import annotations

import os
from typing import Any, List, Optional, Tuple, Union

from ._dataset import ImageDataset, _check_limit, _check_split, as_tensors
from .cifar import (CIFAR10_CLASSES, CIFAR10_FOLDER, cifar10_dir, load_cifar10,
                    read_cifar_batch)
from .digits import DIGITS_CLASSES, digits_split_indices, load_digits
from .idx import (FASHION_MNIST_CLASSES, MNIST_CLASSES, find_idx_files, idx_file_names, load_idx,
                  read_idx)

__all__ = [
    "DATASETS", "ENV_VAR", "FASHION_MNIST_ROOT", "ImageDataset", "as_tensors", "load",
    "load_digits", "digits_split_indices", "load_mnist", "load_fashion_mnist", "load_cifar10",
    "read_idx", "load_idx", "idx_file_names", "find_idx_files", "read_cifar_batch", "cifar10_dir",
    "DIGITS_CLASSES", "MNIST_CLASSES", "FASHION_MNIST_CLASSES", "CIFAR10_CLASSES",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Names accepted by :func:`load`.
DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10")
#: Environment variable naming a parent folder of downloaded data sets (``<it>/mnist``, ``<it>/cifar10``...).
ENV_VAR = "ROBUSTOPS_DATA"
#: Where Debian's ``dataset-fashion-mnist`` package puts the IDX files.
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"

# Spellings people use for the same data set (torchvision class names, underscores...).
_ALIASES = {
    "digits": "digits", "sklearn-digits": "digits",
    "fashion-mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
    "mnist": "mnist",
    "cifar10": "cifar10", "cifar-10": "cifar10",
}


def _env_dirs(name: str) -> List[str]:
    env = os.environ.get(ENV_VAR)
    if not env:
        return []
    return [os.path.join(env, name), env]


def _idx_dirs(roots: List[str], torchvision_folder: str) -> List[str]:
    # Besides the folder itself, accept a torchvision-style layout (<root>/MNIST/raw, <root>/raw)
    # so data a user already downloaded with torchvision is found without moving it.
    dirs: List[str] = []
    for r in roots:
        for d in (r, os.path.join(r, "raw"), os.path.join(r, torchvision_folder, "raw")):
            if d not in dirs:
                dirs.append(d)
    return dirs


def _load_idx_split(name: str, roots: List[str], torchvision_folder: str, split: str,
                    classes: Tuple[str, ...], limit: Optional[int], hint: str):
    _check_split(split)
    limit = _check_limit(limit)
    dirs = _idx_dirs(roots, torchvision_folder)
    parts = ["train", "test"] if split == "all" else [split]
    found = []
    for part in parts:
        pair, tried = find_idx_files(dirs, part)
        if pair is None:
            raise FileNotFoundError(f"{name} {part} files not found; looked for: "
                                    + ", ".join(tried) + f". {hint}")
        found.append(pair)
    sets = []
    for images_path, labels_path in found:
        remaining = None if limit is None else limit - sum(len(s) for s in sets)
        if remaining is not None and remaining <= 0 and sets:
            break
        sets.append(load_idx(images_path, labels_path, classes=classes, limit=remaining, name=name))
    if len(sets) == 1:
        return sets[0]
    import torch  # local: only the rare split="all" needs to concatenate
    return ImageDataset(torch.cat([s.data for s in sets]), torch.cat([s.targets for s in sets]),
                        classes, name=name)


def load_mnist(root: Optional[PathLike] = None, split: str = "train", *,
               limit: Optional[int] = None) -> ImageDataset:
    """Load MNIST from IDX files (plain or ``.gz``) as ``[N, 1, 28, 28]`` images in [0, 1].

    ``root`` is the folder with ``train-images-idx3-ubyte`` etc. (``<root>/raw`` and
    ``<root>/MNIST/raw`` are also searched); without it, ``$ROBUSTOPS_DATA/mnist`` and
    ``$ROBUSTOPS_DATA``. ``split`` is ``"train"`` (60k), ``"test"`` (10k) or ``"all"``.
    """
    if root is not None:
        roots = [os.fspath(root)]
    else:
        roots = _env_dirs("mnist")
        if not roots:
            raise FileNotFoundError(
                f"MNIST has no default location: download the four IDX files yourself "
                f"({', '.join(idx_file_names('train') + idx_file_names('test'))}, optionally .gz) "
                f"and pass root=<their folder>, or set {ENV_VAR} to a folder holding them in 'mnist/'.")
    return _load_idx_split("mnist", roots, "MNIST", split, MNIST_CLASSES, limit,
                           "Download MNIST yourself and pass root=<folder> "
                           f"(or set {ENV_VAR}); robustops never downloads.")


def load_fashion_mnist(root: Optional[PathLike] = None, split: str = "train", *,
                       limit: Optional[int] = None) -> ImageDataset:
    """Load Fashion-MNIST from IDX files as ``[N, 1, 28, 28]`` images in [0, 1].

    Without ``root`` it looks in ``$ROBUSTOPS_DATA/fashion-mnist`` (when the variable is set) and
    then in :data:`FASHION_MNIST_ROOT`, where ``apt-get install dataset-fashion-mnist`` puts the
    real 60k/10k set. ``split`` is ``"train"``, ``"test"`` or ``"all"``.
    """
    roots = [os.fspath(root)] if root is not None else _env_dirs("fashion-mnist") + [FASHION_MNIST_ROOT]
    return _load_idx_split("fashion-mnist", roots, "FashionMNIST", split, FASHION_MNIST_CLASSES,
                           limit, "Install it with `apt-get install dataset-fashion-mnist` (files go "
                           f"to {FASHION_MNIST_ROOT}) or pass root=<folder with the IDX files>.")


def _load_cifar10(root: Optional[PathLike], split: str, limit: Optional[int]) -> ImageDataset:
    if root is not None:
        return load_cifar10(root, split, limit=limit)
    env = os.environ.get(ENV_VAR)
    if not env:
        raise FileNotFoundError(
            f"CIFAR-10 has no default location: download the python version yourself "
            f"(cifar-10-python.tar.gz), extract it and pass root=<the '{CIFAR10_FOLDER}' folder or "
            f"its parent>, or set {ENV_VAR} to a folder holding 'cifar10/{CIFAR10_FOLDER}'.")
    first = os.path.join(env, "cifar10")
    # Prefer $ROBUSTOPS_DATA/cifar10[/cifar-10-batches-py]; fall back to $ROBUSTOPS_DATA itself.
    if os.path.isdir(cifar10_dir(first)):
        return load_cifar10(first, split, limit=limit)
    return load_cifar10(env, split, limit=limit)


def load(name: str, root: Optional[PathLike] = None, split: str = "train", **kw: Any) -> ImageDataset:
    """Load a data set by name from local files.

    Args:
        name: one of :data:`DATASETS` (``"digits"``, ``"fashion-mnist"``, ``"mnist"``,
            ``"cifar10"``); case, ``_`` for ``-`` and a few aliases (``"FashionMNIST"``) are accepted.
        root: folder with the files; ignored by ``"digits"`` (embedded in scikit-learn).
        split: ``"train"``, ``"test"`` or ``"all"``.
        **kw: passed to the loader: ``limit=`` for all; ``size=``, ``test_fraction=``, ``seed=`` for
            digits.

    Raises:
        ValueError: unknown name (the message lists the valid ones), bad split or argument.
        FileNotFoundError: files missing; the message names every path looked for and how to get them.
    """
    if not isinstance(name, str):
        raise ValueError(f"dataset name must be a string, one of {', '.join(DATASETS)}; got {name!r}")
    key = _ALIASES.get(name.strip().lower().replace("_", "-"))
    if key is None:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    _check_split(split)
    if key == "digits":
        return load_digits(split, **kw)
    extra = set(kw) - {"limit"}
    if extra:
        raise TypeError(f"load({key!r}) got unexpected keyword argument(s) {sorted(extra)}; "
                        f"only 'limit' is accepted")
    limit = kw.get("limit")
    if key == "fashion-mnist":
        return load_fashion_mnist(root, split, limit=limit)
    if key == "mnist":
        return load_mnist(root, split, limit=limit)
    return _load_cifar10(root, split, limit)
