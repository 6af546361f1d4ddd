"""IDX files (the MNIST / Fashion-MNIST format), plain or gzip-compressed.

Format: a 4-byte magic ``0x00 0x00 <type code> <ndim>``, then ``ndim`` big-endian uint32 sizes, then
the data, row-major and big-endian. MNIST images are ``0x00000803`` (uint8, 3 dims: N x 28 x 28),
labels ``0x00000801`` (uint8, 1 dim). Everything is decoded with one ``numpy.frombuffer`` call.
"""
from __future__ import annotations

import gzip
import os
import zlib
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._dataset import ImageDataset, _check_limit

__all__ = ["read_idx", "load_idx", "idx_file_names", "find_idx_files",
           "MNIST_CLASSES", "FASHION_MNIST_CLASSES"]

PathLike = Union[str, "os.PathLike[str]"]

# IDX type code -> big-endian numpy dtype (the format is big-endian whatever the host).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

MNIST_CLASSES = tuple(str(k) for k in range(10))
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

_PREFIX = {"train": "train", "test": "t10k"}


def idx_file_names(split: str) -> Tuple[str, str]:
    """Standard (uncompressed) names of the images and labels files of ``split`` (train/test)."""
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test' for IDX files, got {split!r}")
    p = _PREFIX[split]
    return f"{p}-images-idx3-ubyte", f"{p}-labels-idx1-ubyte"


def _read_bytes(path: str) -> bytes:
    # gzip is recognised by its magic bytes, not the suffix, so a renamed file still reads.
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(0)
        if head != b"\x1f\x8b":
            return f.read()
        try:
            with gzip.GzipFile(fileobj=f, mode="rb") as gz:
                return gz.read()
        except (EOFError, OSError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({exc})") from exc


def read_idx(path: PathLike, *, ndim: Optional[int] = None) -> np.ndarray:
    """Read one IDX file (plain or ``.gz``) into a native-endian, writable numpy array.

    Args:
        path: the file.
        ndim: if given, the number of dimensions the file must declare.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError (naming the file): bad magic number, unknown type code, wrong ``ndim``,
            a header or payload shorter than declared (truncated file), or trailing bytes.
    """
    path = os.fspath(path)
    buf = _read_bytes(path)
    if len(buf) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(buf)} bytes, need a 4-byte magic number)")
    if buf[0] != 0 or buf[1] != 0 or buf[2] not in _IDX_DTYPES or buf[3] == 0:
        raise ValueError(f"{path}: bad IDX magic number 0x{buf[:4].hex()} (expected 0x0000TTNN with "
                         f"type TT in {{08,09,0b,0c,0d,0e}} and NN >= 1 dims; MNIST images are "
                         f"0x00000803, labels 0x00000801)")
    dtype, nd = _IDX_DTYPES[buf[2]], buf[3]
    if ndim is not None and nd != ndim:
        raise ValueError(f"{path}: IDX file has {nd} dimensions, expected {ndim} "
                         f"(magic 0x{buf[:4].hex()})")
    header = 4 + 4 * nd
    if len(buf) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(buf)} bytes, need {header} for {nd} dims)")
    shape = tuple(int(s) for s in np.frombuffer(buf, dtype=">u4", count=nd, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(buf) - header
    if got < expected:
        raise ValueError(f"{path}: truncated IDX file: shape {shape} needs {expected} data bytes, "
                         f"found {got}")
    if got > expected:
        raise ValueError(f"{path}: {got - expected} unexpected trailing bytes after IDX data of "
                         f"shape {shape}")
    arr = np.frombuffer(buf, dtype=dtype, count=expected // dtype.itemsize, offset=header)
    # astype copies into native byte order: the result is writable and safe for torch.from_numpy.
    return arr.reshape(shape).astype(dtype.newbyteorder("="))


def load_idx(images_path: PathLike, labels_path: PathLike, *,
             classes: Sequence[str] = MNIST_CLASSES, limit: Optional[int] = None,
             name: str = "idx") -> ImageDataset:
    """Load an images/labels pair of IDX files as ``[N, 1, H, W]`` float32 images in [0, 1].

    The images file must hold uint8 ``N x H x W`` data (divided by 255), the labels file uint8 ``N``
    labels in ``[0, len(classes))``; a count mismatch or an out-of-range label is a ``ValueError``
    naming the file. ``limit`` keeps the first ``limit`` examples.
    """
    limit = _check_limit(limit)
    images_path, labels_path = os.fspath(images_path), os.fspath(labels_path)
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 pixels (type code 0x08), got {images.dtype}")
    if labels.dtype != np.uint8:
        raise ValueError(f"{labels_path}: expected uint8 labels (type code 0x08), got {labels.dtype}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{labels_path}: has {labels.shape[0]} labels but {images_path} has "
                         f"{images.shape[0]} images")
    if labels.size and int(labels.max()) >= len(classes):
        raise ValueError(f"{labels_path}: label {int(labels.max())} out of range for "
                         f"{len(classes)} classes")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    # Convert only the kept rows; float32 in [0, 1] is the pixel convention of every attack.
    x = torch.from_numpy(images).unsqueeze(1).to(torch.float32).div_(255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return ImageDataset(x.contiguous(), y, classes, name=name)


def find_idx_files(dirs: Sequence[PathLike], split: str) -> Tuple[Optional[Tuple[str, str]], list]:
    """Look for ``split``'s images+labels files in each of ``dirs`` in turn.

    Each file is accepted plain or with ``.gz``; the first directory holding both wins. Returns
    ``((images_path, labels_path) or None, every path looked at)``: the caller reports the latter.
    """
    wanted = idx_file_names(split)
    tried: list = []
    for d in dirs:
        d = os.fspath(d)
        found = []
        for base in wanted:
            hit = None
            for cand in (os.path.join(d, base), os.path.join(d, base + ".gz")):
                tried.append(cand)
                if hit is None and os.path.isfile(cand):
                    hit = cand
            found.append(hit)
        if all(found):
            return (found[0], found[1]), tried
    return None, tried
