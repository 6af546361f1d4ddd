"""forest_leaf_masks (the compiled leaf-mask forest of robustops.detect) against an independent
numpy evaluation of synthetic trees, the eager reference, opcheck, hypothesis and bad input.

Synthetic tables: tree ``t`` cuts input ``f`` into ``dims[t, f]`` bins and has one leaf per cell
of that grid (row-major), so the leaf a sample reaches is ``ravel_multi_index`` of its tree bins
-- a second, mask-free way to the same answer. The mask of (tree t, input f, bin b) holds the
leaves whose f-th index is b; ``bin_map`` sends each group bin to any tree bin in range.
"""
import numpy as np
import pytest
import torch
from torch.library import opcheck

from robustops.ops import forest_leaf_masks, forest_leaf_masks_reference


def _tables(seed, k=3, t=5, n=7, c=2, w_bins=9, max_dim=3, words=None, map_dtype=np.uint8, min_dim=1):
    rng = np.random.default_rng(seed)
    dims = rng.integers(min_dim, max_dim + 1, size=(t, k))
    leaves = dims.prod(1)
    need = -(-int(leaves.max()) // 63)
    words = max(need, words or 1)
    mask_start = np.r_[0, np.cumsum(dims.reshape(-1))].astype(np.int64)      # tree by tree, input by input
    masks = np.zeros((int(mask_start[-1]), words), np.int64)
    for tt in range(t):
        for leaf in range(int(leaves[tt])):
            idx = np.unravel_index(leaf, tuple(dims[tt]))
            for f in range(k):
                masks[mask_start[tt * k + f] + idx[f], leaf // 63] |= np.int64(1) << np.int64(leaf % 63)
    bin_map = np.stack([rng.integers(0, dims[:, f][None, :], size=(w_bins, t)) for f in range(k)]).astype(map_dtype)
    bins = rng.integers(0, w_bins, size=(k, n))
    leaf_start = np.r_[0, np.cumsum(leaves)].astype(np.int64)
    value = rng.random((int(leaves.sum()), c))
    # independent answer: tree bins -> leaf by ravel_multi_index, leaf values added in tree order
    ref = np.zeros((n, c))
    for s in range(n):
        acc = np.zeros(c)
        for tt in range(t):
            tb = tuple(int(bin_map[f, bins[f, s], tt]) for f in range(k))
            acc = acc + value[leaf_start[tt] + np.ravel_multi_index(tb, tuple(dims[tt]))]
        ref[s] = acc / t
    args = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in (bins, bin_map, masks, mask_start, leaf_start, value))
    return args, torch.from_numpy(ref)


@pytest.mark.parametrize("words", [1, 2, 3])
def test_matches_independent_evaluation_and_reference(words):
    args, ref = _tables(0, k=3, t=70, n=23, c=2, max_dim=4, words=words)   # 70 trees: two chunks
    out = forest_leaf_masks(*args)
    assert out.dtype == torch.float64 and out.shape == (23, 2)
    assert torch.equal(out, ref)                                          # same order of additions: bit for bit
    assert torch.equal(forest_leaf_masks_reference(*args), ref)


def test_int16_map_and_many_leaves_per_tree():
    # one input cut into 300 bins: 300 leaves per tree (5 mask words), tree bins above 255 (int16 map)
    args, ref = _tables(1, k=1, t=3, n=11, c=1, w_bins=400, max_dim=300, min_dim=280,
                        map_dtype=np.int16)
    assert args[1].dtype == torch.int16 and int(args[1].max()) > 255 and args[2].shape[1] >= 5
    assert torch.equal(forest_leaf_masks(*args), ref)


def test_threads_and_empty_batch():
    args, ref = _tables(2, k=4, t=130, n=50, c=3, max_dim=3)
    prev = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch.equal(forest_leaf_masks(*args), ref)
    finally:
        torch.set_num_threads(prev)
    bins, bin_map, masks, mask_start, leaf_start, value = args
    out = forest_leaf_masks(bins[:, :0], bin_map, masks, mask_start, leaf_start, value)
    assert out.shape == (0, 3) and out.dtype == torch.float64


def test_equals_sklearn_through_the_detector_forest():
    """The op behind TensorForest's leaf-mask form: scikit-learn's predict_proba bit for bit."""
    from sklearn.ensemble import RandomForestClassifier

    from robustops.detect.forest import TensorForest
    rng = np.random.default_rng(3)
    X = rng.random((400, 5)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] * X[:, 2] + 0.3 * rng.normal(size=400) > 0.8).astype(int)
    rf = RandomForestClassifier(n_estimators=60, random_state=0).fit(X[:300], y[:300])
    sp = TensorForest.from_sklearn(rf).specialize(torch.arange(5), max_cells=1, max_tree_cells=1)
    assert sp.kinds() == ["tree_masks"]
    assert np.array_equal(sp.predict_proba(torch.from_numpy(X)).numpy(), rf.predict_proba(X))


def test_opcheck():
    args, _ = _tables(4, k=2, t=6, n=5, c=2)
    opcheck(torch.ops.robustops.forest_leaf_masks.default, args,
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_bad_input_named():
    args, _ = _tables(5, k=2, t=4, n=3, c=2)
    bins, bin_map, masks, mask_start, leaf_start, value = args
    with pytest.raises(TypeError, match="bins"):
        forest_leaf_masks(bins.int(), bin_map, masks, mask_start, leaf_start, value)
    with pytest.raises(TypeError, match="bin_map"):
        forest_leaf_masks(bins, bin_map.long(), masks, mask_start, leaf_start, value)
    with pytest.raises(TypeError, match="value"):
        forest_leaf_masks(bins, bin_map, masks, mask_start, leaf_start, value.float())
    with pytest.raises(TypeError, match="masks"):
        forest_leaf_masks(bins, bin_map, [1, 2], mask_start, leaf_start, value)
    with pytest.raises(ValueError, match="masks"):
        forest_leaf_masks(bins, bin_map, masks[0], mask_start, leaf_start, value)
    with pytest.raises(ValueError, match="mask_start"):
        forest_leaf_masks(bins, bin_map, masks, mask_start[:-1], leaf_start, value)
    with pytest.raises(ValueError, match="leaf_start"):
        forest_leaf_masks(bins, bin_map, masks, mask_start, leaf_start[:-1], value)
    with pytest.raises(ValueError, match="value"):
        forest_leaf_masks(bins, bin_map, masks, mask_start, leaf_start, value[:, 0])
    with pytest.raises(ValueError, match="device"):
        forest_leaf_masks(bins, bin_map, masks, mask_start, leaf_start, value.to("meta"))


def test_corrupt_tables_raise_not_crash():
    args, _ = _tables(6, k=2, t=4, n=3, c=2, w_bins=5)
    bins, bin_map, masks, mask_start, leaf_start, value = args
    op = torch.ops.robustops.forest_leaf_masks           # below the wrapper: the C++ checks

    def call(**kw):
        a = dict(bins=bins, bin_map=bin_map, masks=masks, mask_start=mask_start, leaf_start=leaf_start, value=value)
        a.update(kw)
        return op(a["bins"], a["bin_map"], a["masks"], a["mask_start"], a["leaf_start"], a["value"])

    def edit(t, index, v):
        t = t.clone()
        t[index] = v
        return t

    with pytest.raises(RuntimeError, match="bins"):
        call(bins=edit(bins, (1, 2), 5))
    with pytest.raises(RuntimeError, match="bins"):
        call(bins=edit(bins, (0, 0), -1))
    with pytest.raises(RuntimeError, match="tree bin"):
        call(bin_map=edit(bin_map, (0, slice(None), 2), 200))            # past every tree's bins
    with pytest.raises(RuntimeError, match="exactly one leaf"):
        call(masks=torch.zeros_like(masks))
    with pytest.raises(RuntimeError, match="exactly one leaf"):
        call(masks=torch.full_like(masks, -1))                          # every bit, bit 63 too
    with pytest.raises(RuntimeError, match="mask_start"):
        call(mask_start=edit(mask_start, -1, int(mask_start[-1]) + 1))  # points past masks
    with pytest.raises(RuntimeError, match="increase"):
        call(mask_start=edit(mask_start, 1, 0))                         # a (tree, input) with no bin
    with pytest.raises(RuntimeError, match="leaf_start"):
        call(leaf_start=edit(leaf_start, -1, int(leaf_start[-1]) + 1))  # points past value
    with pytest.raises(RuntimeError, match="leaves"):
        call(leaf_start=edit(leaf_start, 1, int(leaf_start[2])))        # a tree with no leaf
    with pytest.raises(RuntimeError, match="K >= 1"):
        op(bins[:0], bin_map[:0], masks, mask_start[:1], leaf_start, value)
    with pytest.raises(RuntimeError, match="int64"):
        call(bins=bins.int())


def test_non_contiguous_inputs():
    args, ref = _tables(7, k=3, t=9, n=8, c=2)
    bins, bin_map, masks, mask_start, leaf_start, value = args
    bins_nc = bins.t().contiguous().t()                       # same values, transposed strides
    value_nc = value.t().contiguous().t()
    assert not bins_nc.is_contiguous() and not value_nc.is_contiguous()
    assert torch.equal(forest_leaf_masks(bins_nc, bin_map, masks, mask_start, leaf_start, value_nc), ref)


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 3), t=st.integers(1, 80), n=st.integers(0, 12),
       c=st.integers(1, 3), max_dim=st.integers(1, 4), words=st.integers(1, 3),
       map16=st.booleans())
def test_property_matches_independent_evaluation(seed, k, t, n, c, max_dim, words, map16):
    args, ref = _tables(seed, k=k, t=t, n=n, c=c, max_dim=max_dim, words=words,
                        map_dtype=np.int16 if map16 else np.uint8)
    assert torch.equal(forest_leaf_masks(*args), ref)
