"""Tests of robustops.data: embedded digits, IDX and CIFAR-10 readers on files written here.

(torch.allclose rather than torch.testing.assert_close: the latter's first call costs ~1 s here.)
"""
import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from robustops import data
from robustops.data import (ImageDataset, as_tensors, load, load_cifar10, load_digits, load_idx,
                            read_cifar_batch, read_idx)

FASHION = data.FASHION_MNIST_ROOT


# --------------------------------------------------------------------------------------------
# helpers writing tiny files in the real formats


def _idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    dt = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[type_code]
    header = bytes([0, 0, type_code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + np.ascontiguousarray(arr, dtype=dt).tobytes()


def _write(path, payload: bytes, gz: bool = False) -> str:
    path = str(path) + (".gz" if gz else "")
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(payload)
    return path


def _fake_mnist(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255  # make sure both ends of the range occur
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels


def _write_mnist_dir(folder, n_train=12, n_test=7, gz=False):
    os.makedirs(folder, exist_ok=True)
    out = {}
    for split, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = _fake_mnist(n, seed)
        _write(os.path.join(folder, f"{split}-images-idx3-ubyte"), _idx_bytes(images), gz)
        _write(os.path.join(folder, f"{split}-labels-idx1-ubyte"), _idx_bytes(labels), gz)
        out[split] = (images, labels)
    return out


def _cifar_batch(n: int, seed: int):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    # The real files store each image as 3072 bytes: R plane, G plane, B plane, rows of 32.
    return images, labels, {b"batch_label": b"fake", b"labels": labels,
                            b"data": images.reshape(n, 3072), b"filenames": [b"x.png"] * n}


def _write_cifar_dir(folder, sizes=(3, 2, 4, 1, 2), n_test=5, meta=True):
    os.makedirs(folder, exist_ok=True)
    train_x, train_y = [], []
    for k, n in enumerate(sizes, start=1):
        x, y, d = _cifar_batch(n, seed=k)
        with open(os.path.join(folder, f"data_batch_{k}"), "wb") as f:
            pickle.dump(d, f, protocol=2)
        train_x.append(x)
        train_y += y
    tx, ty, d = _cifar_batch(n_test, seed=99)
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump(d, f, protocol=2)
    if meta:
        names = [b"airplane", b"automobile", b"bird", b"cat", b"deer",
                 b"dog", b"frog", b"horse", b"ship", b"truck"]
        with open(os.path.join(folder, "batches.meta"), "wb") as f:
            pickle.dump({b"label_names": names, b"num_cases_per_batch": 10000}, f, protocol=2)
    return (np.concatenate(train_x), np.array(train_y)), (tx, np.array(ty))


# --------------------------------------------------------------------------------------------
# digits


def test_digits_shapes_range_and_split_sizes():
    tr, te, al = load_digits("train"), load_digits("test"), load_digits("all")
    assert isinstance(tr, ImageDataset) and isinstance(tr, torch.utils.data.Dataset)
    assert len(al) == 1797 and len(tr) + len(te) == 1797
    assert abs(len(te) - 0.25 * 1797) <= 10
    for ds in (tr, te, al):
        assert ds.data.dtype == torch.float32 and ds.targets.dtype == torch.int64
        assert ds.data.shape[1:] == (1, 8, 8) and ds.data.is_contiguous()
        assert ds.data.min() >= 0 and ds.data.max() <= 1
        assert ds.classes == [str(k) for k in range(10)]
    assert al.data.max() == 1.0 and al.data.min() == 0.0
    # values are k/16: the original 0..16 intensities
    assert torch.equal(al.data * 16, (al.data * 16).round())
    x, y = tr[3]
    assert x.shape == (1, 8, 8) and y.dtype == torch.int64


def test_digits_split_is_deterministic_disjoint_and_stratified():
    labels = load_digits("all").targets
    tr1, te1 = data.digits_split_indices(labels, 0.25, seed=0)
    tr2, te2 = data.digits_split_indices(labels, 0.25, seed=0)
    assert torch.equal(tr1, tr2) and torch.equal(te1, te2)
    assert set(tr1.tolist()).isdisjoint(te1.tolist())
    assert sorted(tr1.tolist() + te1.tolist()) == list(range(1797))
    # every class is represented in the test part at ~25 %
    counts = torch.bincount(labels[te1], minlength=10).float()
    totals = torch.bincount(labels, minlength=10).float()
    assert torch.all((counts / totals - 0.25).abs() < 0.01)
    # another seed, another split
    _, te3 = data.digits_split_indices(labels, 0.25, seed=1)
    assert not torch.equal(te1, te3)
    # the loaders follow the indices
    al = load_digits("all")
    te = load_digits("test", seed=0)
    assert torch.equal(te.data, al.data[te1]) and torch.equal(te.targets, labels[te1])
    a, b = load_digits("train", seed=5), load_digits("train", seed=5)
    assert torch.equal(a.data, b.data) and torch.equal(a.targets, b.targets)
    assert len(load_digits("test", test_fraction=0.5)) == pytest.approx(1797 / 2, abs=10)


def test_digits_upsampling_and_limit():
    small = load_digits("test", limit=10)
    big = load_digits("test", size=28, limit=10)
    assert len(small) == 10 and big.data.shape == (10, 1, 28, 28)
    assert big.data.min() >= 0 and big.data.max() <= 1
    assert torch.equal(big.targets, small.targets)
    ref = torch.nn.functional.interpolate(small.data, size=(28, 28), mode="bilinear",
                                          align_corners=False)
    assert torch.allclose(big.data, ref, atol=1e-6, rtol=0)
    assert load_digits("train", size=(16, 12), limit=2).data.shape == (2, 1, 16, 12)
    assert torch.equal(load_digits("train", size=8).data, load_digits("train").data)
    assert len(load_digits("train", limit=0)) == 0
    assert len(load_digits("test", limit=10**6)) == len(load_digits("test"))


@pytest.mark.parametrize("kw", [dict(split="validation"), dict(test_fraction=0.0),
                                dict(test_fraction=1.0), dict(split="all", test_fraction=2.0),
                                dict(limit=-1), dict(limit=True), dict(size=0), dict(size=(3,))])
def test_digits_bad_arguments(kw):
    with pytest.raises(ValueError):
        load_digits(**kw)


# --------------------------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    images, labels = _fake_mnist(5)
    pi = _write(tmp_path / "img", _idx_bytes(images), gz)
    pl = _write(tmp_path / "lab", _idx_bytes(labels), gz)
    np.testing.assert_array_equal(read_idx(pi), images)
    np.testing.assert_array_equal(read_idx(pl, ndim=1), labels)
    # multi-byte big-endian types decode to native values
    ints = np.array([[1, -2, 70000], [3, 4, -5]], dtype=np.int32)
    got = read_idx(_write(tmp_path / "ints", _idx_bytes(ints, 0x0C), gz))
    np.testing.assert_array_equal(got, ints)
    assert got.dtype.isnative and got.flags.writeable
    floats = np.array([0.5, -1.25], dtype=np.float64)
    np.testing.assert_array_equal(read_idx(_write(tmp_path / "f", _idx_bytes(floats, 0x0E), gz)), floats)


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_pair(tmp_path, gz):
    images, labels = _fake_mnist(9)
    pi = _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(images), gz)
    pl = _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(labels), gz)
    ds = load_idx(pi, pl)
    assert ds.data.shape == (9, 1, 28, 28) and ds.data.dtype == torch.float32
    assert ds.targets.dtype == torch.int64
    assert torch.allclose(ds.data[:, 0], torch.from_numpy(images).float() / 255, atol=1e-6, rtol=0)
    assert ds.targets.tolist() == labels.tolist()
    assert ds.data.min() == 0.0 and ds.data.max() == 1.0
    assert len(load_idx(pi, pl, limit=4)) == 4


def test_read_idx_errors_name_the_file(tmp_path):
    images, labels = _fake_mnist(4)
    good = _idx_bytes(images)

    bad_magic = _write(tmp_path / "bad-magic", b"\x00\x01" + good[2:])
    with pytest.raises(ValueError, match="magic") as e:
        read_idx(bad_magic)
    assert str(bad_magic) in str(e.value)

    bad_type = _write(tmp_path / "bad-type", b"\x00\x00\x07\x03" + good[4:])
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad_type)

    truncated = _write(tmp_path / "truncated", good[:-10])
    with pytest.raises(ValueError, match="truncated") as e:
        read_idx(truncated)
    assert str(truncated) in str(e.value)

    short_header = _write(tmp_path / "short-header", good[:9])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(short_header)

    tiny = _write(tmp_path / "tiny", b"\x00\x00")
    with pytest.raises(ValueError):
        read_idx(tiny)

    trailing = _write(tmp_path / "trailing", good + b"\x00")
    with pytest.raises(ValueError, match="trailing"):
        read_idx(trailing)

    with pytest.raises(ValueError, match="dimensions"):
        read_idx(_write(tmp_path / "labels-as-images", _idx_bytes(labels)), ndim=3)

    # truncated gzip stream (the archive itself cut short)
    gz_path = _write(tmp_path / "cut", good, gz=True)
    with open(gz_path, "rb") as f:
        blob = f.read()
    with open(gz_path, "wb") as f:
        f.write(blob[: len(blob) // 2])
    with pytest.raises(ValueError) as e:
        read_idx(gz_path)
    assert gz_path in str(e.value)

    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "does-not-exist")


def test_load_idx_count_mismatch_and_bad_labels(tmp_path):
    images, labels = _fake_mnist(6)
    pi = _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(images))
    pl = _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(labels[:5]))
    with pytest.raises(ValueError, match="5 labels") as e:
        load_idx(pi, pl)
    assert pl in str(e.value) and pi in str(e.value)

    bad = labels.copy()
    bad[2] = 10
    pl2 = _write(tmp_path / "bad-labels", _idx_bytes(bad))
    with pytest.raises(ValueError, match="out of range"):
        load_idx(pi, pl2)

    # images file given where labels belong, and vice versa
    with pytest.raises(ValueError, match="dimensions"):
        load_idx(pl, pi)
    # 16-bit pixels are not MNIST
    pw = _write(tmp_path / "wide", _idx_bytes(images.astype(np.int16), 0x0B))
    with pytest.raises(ValueError, match="uint8"):
        load_idx(pw, pl)


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_from_root(tmp_path, gz):
    ref = _write_mnist_dir(tmp_path / "mnist", gz=gz)
    tr = load("mnist", root=tmp_path / "mnist", split="train")
    te = load("mnist", root=str(tmp_path / "mnist"), split="test", limit=3)
    assert tr.data.shape == (12, 1, 28, 28) and len(te) == 3
    assert tr.targets.tolist() == ref["train"][1].tolist()
    assert te.targets.tolist() == ref["t10k"][1][:3].tolist()
    al = load("mnist", root=tmp_path / "mnist", split="all")
    assert len(al) == 19
    assert torch.equal(al.data[:12], tr.data)
    assert len(load("mnist", root=tmp_path / "mnist", split="all", limit=14)) == 14
    assert tr.classes == [str(k) for k in range(10)]


def test_mnist_torchvision_layout_and_env(tmp_path, monkeypatch):
    _write_mnist_dir(tmp_path / "tv" / "MNIST" / "raw")
    assert len(load("mnist", root=tmp_path / "tv")) == 12
    _write_mnist_dir(tmp_path / "env" / "mnist", n_train=5)
    monkeypatch.setenv("ROBUSTOPS_DATA", str(tmp_path / "env"))
    assert len(load("mnist")) == 5


def test_fashion_mnist_with_root_has_fashion_classes(tmp_path):
    _write_mnist_dir(tmp_path / "fm", gz=True)
    ds = load("fashion_mnist", root=tmp_path / "fm", split="test")
    assert len(ds) == 7 and ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"


def test_missing_files_messages_name_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("ROBUSTOPS_DATA", raising=False)
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        load("mnist", root=root)
    msg = str(e.value)
    assert str(root / "train-images-idx3-ubyte") in msg and "train-images-idx3-ubyte.gz" in msg
    assert str(root / "train-labels-idx1-ubyte") in msg and "root=" in msg

    with pytest.raises(FileNotFoundError) as e:
        load("fashion-mnist", root=root, split="test")
    msg = str(e.value)
    assert str(root / "t10k-images-idx3-ubyte") in msg and "apt-get install dataset-fashion-mnist" in msg

    with pytest.raises(FileNotFoundError) as e:
        load("cifar10", root=root)
    msg = str(e.value)
    assert str(root / "cifar-10-batches-py" / "data_batch_1") in msg and "root=" in msg

    # no root and no env var: say how to provide one
    with pytest.raises(FileNotFoundError, match="ROBUSTOPS_DATA"):
        load("mnist")
    with pytest.raises(FileNotFoundError, match="ROBUSTOPS_DATA"):
        load("cifar10")

    # labels present but images missing: the missing one is named
    _write(root / "train-labels-idx1-ubyte", _idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(FileNotFoundError) as e:
        load("mnist", root=root)
    assert str(root / "train-images-idx3-ubyte") in str(e.value)


def test_load_argument_errors():
    with pytest.raises(ValueError) as e:
        load("imagenet")
    for name in data.DATASETS:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="split"):
        load("digits", split="val")
    with pytest.raises(ValueError, match="split"):
        load("mnist", root="/nonexistent", split="val")
    with pytest.raises(TypeError):
        load("mnist", root="/nonexistent", size=28)
    assert len(load("Digits", split="test", limit=7)) == 7
    assert load("digits", size=28, limit=1).data.shape == (1, 1, 28, 28)


# --------------------------------------------------------------------------------------------
# CIFAR-10


def test_read_cifar_batch_layout(tmp_path):
    images, labels, d = _cifar_batch(4, seed=3)
    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps(d, protocol=2))
    x, y = read_cifar_batch(p)
    np.testing.assert_array_equal(x, images)  # NCHW straight from the R/G/B plane layout
    assert y.tolist() == labels and y.dtype == np.int64
    # red plane of image 0 is the first 1024 bytes of its row
    np.testing.assert_array_equal(x[0, 0].ravel(), d[b"data"][0, :1024])
    # str keys (a re-pickled file) are accepted as well
    p2 = tmp_path / "str_keys"
    p2.write_bytes(pickle.dumps({"data": d[b"data"], "labels": labels}))
    np.testing.assert_array_equal(read_cifar_batch(p2)[0], images)


@pytest.mark.parametrize("parent", [False, True])
def test_load_cifar10(tmp_path, parent):
    folder = tmp_path / "cifar-10-batches-py"
    (trx, try_), (tex, tey) = _write_cifar_dir(folder)
    root = tmp_path if parent else folder
    tr = load("cifar10", root=root, split="train")
    assert tr.data.shape == (12, 3, 32, 32) and tr.data.dtype == torch.float32
    assert torch.allclose(tr.data, torch.from_numpy(trx).float() / 255, atol=1e-6, rtol=0)
    assert tr.targets.tolist() == try_.tolist() and tr.targets.dtype == torch.int64
    assert tr.classes[0] == "airplane" and tr.classes[9] == "truck"
    te = load_cifar10(root, "test")
    assert te.targets.tolist() == tey.tolist() and len(te) == 5
    assert len(load("cifar10", root=root, split="all")) == 17
    lim = load("cifar10", root=root, limit=4)  # crosses the batch_1 / batch_2 boundary
    assert len(lim) == 4 and torch.equal(lim.data, tr.data[:4])
    assert len(load("cifar10", root=root, limit=0)) == 0


def test_cifar10_env_and_missing_meta(tmp_path, monkeypatch):
    _write_cifar_dir(tmp_path / "cifar10" / "cifar-10-batches-py", meta=False)
    monkeypatch.setenv("ROBUSTOPS_DATA", str(tmp_path))
    ds = load("cifar10", split="test")
    assert len(ds) == 5 and ds.classes == list(data.CIFAR10_CLASSES)


def test_cifar_malformed_batches(tmp_path):
    _, labels, d = _cifar_batch(3, seed=0)
    cases = {
        "short_labels": {b"data": d[b"data"], b"labels": labels[:2]},
        "wrong_width": {b"data": d[b"data"][:, :100], b"labels": labels},
        "bad_label": {b"data": d[b"data"], b"labels": [0, 1, 10]},
        "no_data": {b"labels": labels},
        "float_data": {b"data": d[b"data"].astype(np.float32), b"labels": labels},
    }
    for name, obj in cases.items():
        p = tmp_path / name
        p.write_bytes(pickle.dumps(obj, protocol=2))
        with pytest.raises(ValueError) as e:
            read_cifar_batch(p)
        assert str(p) in str(e.value), name
    truncated = tmp_path / "truncated"
    truncated.write_bytes(pickle.dumps(d, protocol=2)[:500])
    with pytest.raises(ValueError, match="truncated|pickle"):
        read_cifar_batch(truncated)
    not_dict = tmp_path / "not_dict"
    not_dict.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="dict"):
        read_cifar_batch(not_dict)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_unpickler_refuses_arbitrary_globals(tmp_path):
    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [0]}, protocol=2))
    with pytest.raises(ValueError, match="not allowed"):
        read_cifar_batch(p)


def test_cifar_reads_python2_numpy_module_names(tmp_path):
    # Real batches were pickled by Python 2 numpy, naming numpy.core.multiarray._reconstruct.
    _, labels, d = _cifar_batch(2, seed=7)
    blob = pickle.dumps(d, protocol=2)
    if b"numpy._core.multiarray" in blob:  # protocol 2 spells globals as text lines: safe to swap
        blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in blob
    p = tmp_path / "py2_batch"
    p.write_bytes(blob)
    x, y = read_cifar_batch(p)
    assert x.shape == (2, 3, 32, 32) and y.tolist() == labels


# --------------------------------------------------------------------------------------------
# as_tensors


def test_as_tensors_variants():
    ds = load_digits("test", limit=20)
    x, y = as_tensors(ds)
    assert x is ds.data and y is ds.targets
    sub = torch.utils.data.Subset(ds, [3, 1, 7])
    sx, sy = as_tensors(sub)
    assert torch.equal(sx, ds.data[[3, 1, 7]]) and torch.equal(sy, ds.targets[[3, 1, 7]])
    td = torch.utils.data.TensorDataset(ds.data, ds.targets)
    assert as_tensors(td)[0] is ds.data

    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.full((1, 2, 2), float(i)), i

    px, py = as_tensors(Plain())
    assert px.shape == (4, 1, 2, 2) and py.tolist() == [0, 1, 2, 3] and py.dtype == torch.int64
    loader = torch.utils.data.DataLoader(ds, batch_size=8)
    xb, yb = next(iter(loader))
    assert xb.shape == (8, 1, 8, 8) and torch.equal(yb, ds.targets[:8])


def test_image_dataset_validates():
    with pytest.raises(ValueError):
        ImageDataset(torch.zeros(2, 8, 8), torch.zeros(2, dtype=torch.long), ["a"])
    with pytest.raises(ValueError):
        ImageDataset(torch.zeros(2, 1, 8, 8, dtype=torch.float64), torch.zeros(2, dtype=torch.long), ["a"])
    with pytest.raises(ValueError):
        ImageDataset(torch.zeros(2, 1, 8, 8), torch.zeros(3, dtype=torch.long), ["a"])
    with pytest.raises(ValueError):
        ImageDataset(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.int32), ["a"])


# --------------------------------------------------------------------------------------------
# the real Fashion-MNIST (Debian package dataset-fashion-mnist)


@pytest.mark.skipif(not os.path.isdir(FASHION),
                    reason=f"{FASHION} absent (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("ROBUSTOPS_DATA", raising=False)
    tr = load("fashion-mnist", split="train")
    te = load("fashion-mnist", split="test")
    assert len(tr) == 60000 and len(te) == 10000
    assert tr.data.shape == (60000, 1, 28, 28) and te.data.shape == (10000, 1, 28, 28)
    assert tr.data.dtype == torch.float32 and tr.targets.dtype == torch.int64
    assert 0.0 <= float(te.data.min()) and float(te.data.max()) <= 1.0
    assert torch.equal(torch.bincount(tr.targets, minlength=10), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(te.targets, minlength=10), torch.full((10,), 1000))
    assert te.classes[9] == "Ankle boot"
    # limit gives a prefix of the same data
    assert torch.equal(load("fashion-mnist", split="test", limit=50).data, te.data[:50])
