"""forest_leaf_masks (the compiled leaf-mask forest of robustops.detect) against an independent
numpy evaluation of synthetic grouped forests, the eager reference, opcheck, hypothesis and bad
input.

Synthetic tables: group g reads K_g inputs (0 allowed); each input has a sorted list of the
group's thresholds, and tree t cuts input f at a random subset of them (possibly none), so it
has one leaf per cell of its own grid (row-major). The independent answer counts the tree's
own thresholds below each value and takes ``ravel_multi_index`` of those bins -- no group bin,
no bin map, no mask. The op's tables are built from the same trees: the group bin of a value
among the group's thresholds, the bin map from it to each tree's bin, and per (tree, input,
bin) the mask of the leaves whose index on that input is the bin.
"""
import numpy as np
import pytest
import torch
from torch.library import opcheck

from robustops.ops import forest_leaf_masks, forest_leaf_masks_reference


def _tables(seed, ks=(3, 0, 2), t=5, n=7, c=2, width=9, max_cuts=3, words=None, map16=False, m_cols=11):
    rng = np.random.default_rng(seed)
    g_n = len(ks)
    p_n = int(sum(ks))
    columns = rng.choice(m_cols, size=p_n, replace=p_n > m_cols).astype(np.int64)
    input_start = np.r_[0, np.cumsum(ks)].astype(np.int64)
    gcuts = [np.sort(rng.choice(np.arange(1, 4 * width), size=width, replace=False)).astype(np.float32) / 4
             for _ in range(p_n)]
    # tree (g, t) cuts input p at tcuts[g][t][f] (a subset of p's group cuts)
    tcuts = [[[np.sort(rng.choice(gcuts[input_start[g] + f], size=rng.integers(0, max_cuts + 1), replace=False))
               for f in range(ks[g])] for _ in range(t)] for g in range(g_n)]
    dims = [[[c_.size + 1 for c_ in tree] for tree in grp] for grp in tcuts]
    leaves = [[int(np.prod(d)) if d else 1 for d in grp] for grp in dims]
    need = -(-max(max(grp) for grp in leaves) // 63)
    words = max(need, words or 1)
    # x: random values, some exactly on a cut (x <= cut goes left)
    x = (rng.integers(0, 4 * width + 2, size=(n, m_cols)) / 4).astype(np.float32)
    groups = rng.integers(0, g_n, size=n).astype(np.int64)
    leaf_start = np.r_[0, np.cumsum([leaves[g][tt] for g in range(g_n) for tt in range(t)])].astype(np.int64)
    value = rng.random((int(leaf_start[-1]), c))
    # independent answer
    ref = np.zeros((n, c))
    for s in range(n):
        g = groups[s]
        acc = np.zeros(c)
        for tt in range(t):
            tb = tuple(int((tcuts[g][tt][f] < x[s, columns[input_start[g] + f]]).sum()) for f in range(ks[g]))
            leaf = np.ravel_multi_index(tb, tuple(dims[g][tt])) if ks[g] else 0
            acc = acc + value[leaf_start[g * t + tt] + leaf]
        ref[s] = acc / t
    # the op's tables
    cut_start = np.r_[0, np.cumsum([gc.size for gc in gcuts])].astype(np.int64)
    bin_map = np.zeros(t * (int(cut_start[-1]) + p_n), np.int16 if map16 else np.uint8)
    mask_rows, mask_start = [], [0]
    for g in range(g_n):
        for tt in range(t):
            for f in range(ks[g]):
                p = input_start[g] + f
                base = t * (cut_start[p] + p)
                for b in range(gcuts[p].size + 1):               # group bin b: values in (gcuts[b-1], gcuts[b]]
                    probe = gcuts[p][b - 1] if b else -np.inf
                    bin_map[base + b * t + tt] = int((tcuts[g][tt][f] <= probe).sum()) if b else 0
                index_f = np.unravel_index(np.arange(leaves[g][tt]), tuple(dims[g][tt]))[f]
                for u in range(dims[g][tt][f]):
                    row = np.zeros(words, np.int64)
                    for leaf in np.flatnonzero(index_f == u):
                        row[leaf // 63] |= np.int64(1) << np.int64(leaf % 63)
                    mask_rows.append(row)
                mask_start.append(mask_start[-1] + dims[g][tt][f])
    masks = np.stack(mask_rows) if mask_rows else np.zeros((0, words), np.int64)
    arrays = (x, groups, columns, input_start, np.concatenate(gcuts) if gcuts else np.zeros(0, np.float32), cut_start,
              bin_map, np.asarray(mask_start, np.int64), masks, leaf_start, value)
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays), torch.from_numpy(ref)


NAMES = ("x", "groups", "columns", "input_start", "cuts", "cut_start", "bin_map", "mask_start", "masks", "leaf_start",
         "value")


@pytest.mark.parametrize("words", [1, 2, 3])
def test_matches_independent_evaluation_and_reference(words):
    args, ref = _tables(0, ks=(3, 0, 2, 1), t=70, n=40, c=2, max_cuts=4, words=words)   # 70 trees: two chunks
    out = forest_leaf_masks(*args)
    assert out.dtype == torch.float64 and out.shape == (40, 2)
    assert torch.equal(out, ref)                                          # same order of additions: bit for bit
    assert torch.equal(forest_leaf_masks_reference(*args), ref)


def test_int16_map_and_many_leaves_per_tree():
    # one input cut up to 300 times per tree: 301 leaves per tree (5 mask words), tree bins above 255
    args, ref = _tables(1, ks=(1,), t=3, n=11, c=1, width=400, max_cuts=300, map16=True)
    assert args[6].dtype == torch.int16 and int(args[6].max()) > 255 and args[8].shape[1] >= 5
    assert torch.equal(forest_leaf_masks(*args), ref)


def test_threads_and_empty_batch():
    args, ref = _tables(2, ks=(4, 2), t=130, n=50, c=3, max_cuts=2)
    prev = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch.equal(forest_leaf_masks(*args), ref)
    finally:
        torch.set_num_threads(prev)
    out = forest_leaf_masks(args[0][:0], args[1][:0], *args[2:])
    assert out.shape == (0, 3) and out.dtype == torch.float64


def test_equals_sklearn_through_the_detector_forest():
    """The op behind TensorForest's leaf-mask form: scikit-learn's predict_proba bit for bit."""
    from sklearn.ensemble import RandomForestClassifier

    from robustops.detect.forest import TensorForest
    rng = np.random.default_rng(3)
    X = rng.random((400, 5)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] * X[:, 2] + 0.3 * rng.normal(size=400) > 0.8).astype(int)
    rf = RandomForestClassifier(n_estimators=60, random_state=0).fit(X[:300], y[:300])
    sp = TensorForest.from_sklearn(rf).specialize(torch.arange(5))
    assert sp.form == "leaf_masks"
    assert np.array_equal(sp.predict_proba(torch.from_numpy(X)).numpy(), rf.predict_proba(X))


def test_opcheck():
    args, _ = _tables(4, ks=(2, 1), t=6, n=5, c=2)
    opcheck(torch.ops.robustops.forest_leaf_masks.default, args,
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_bad_input_named():
    args, _ = _tables(5, ks=(2, 1), t=4, n=3, c=2)
    a = dict(zip(NAMES, args))

    def call(**kw):
        return forest_leaf_masks(*[kw.get(k, a[k]) for k in NAMES])

    with pytest.raises(TypeError, match="groups"):
        call(groups=a["groups"].int())
    with pytest.raises(TypeError, match="bin_map"):
        call(bin_map=a["bin_map"].long())
    with pytest.raises(TypeError, match="value"):
        call(value=a["value"].float())
    with pytest.raises(TypeError, match="x"):
        call(x=a["x"].double())
    with pytest.raises(TypeError, match="masks"):
        call(masks=[1, 2])
    with pytest.raises(ValueError, match="masks"):
        call(masks=a["masks"][0])
    with pytest.raises(ValueError, match="groups"):
        call(groups=a["groups"][:-1])
    with pytest.raises(ValueError, match="cut_start"):
        call(cut_start=a["cut_start"][:-1])
    with pytest.raises(ValueError, match="bin_map"):
        call(bin_map=a["bin_map"][:-1])
    with pytest.raises(ValueError, match="mask_start"):
        call(mask_start=a["mask_start"][:-1])
    with pytest.raises(ValueError, match="leaf_start"):
        call(leaf_start=a["leaf_start"][:-1])
    with pytest.raises(ValueError, match="value"):
        call(value=a["value"][:, 0])
    with pytest.raises(ValueError, match="device"):
        call(value=a["value"].to("meta"))


def test_corrupt_tables_and_bad_values_raise_not_crash():
    args, _ = _tables(6, ks=(2, 1), t=4, n=6, c=2)
    a = dict(zip(NAMES, args))
    op = torch.ops.robustops.forest_leaf_masks           # below the wrapper: the C++ checks

    def call(**kw):
        return op(*[kw.get(k, a[k]) for k in NAMES])

    def edit(name, index, v):
        t = a[name].clone()
        t[index] = v
        return t

    read = int(a["columns"][int(a["input_start"][int(a["groups"][0])])])    # a column sample 0's forest reads
    with pytest.raises(RuntimeError, match="groups"):
        call(groups=edit("groups", 2, 2))
    with pytest.raises(RuntimeError, match="groups"):
        call(groups=edit("groups", 0, -1))
    with pytest.raises(RuntimeError, match="not finite"):
        call(x=edit("x", (0, read), float("nan")))
    with pytest.raises(RuntimeError, match="not finite"):
        call(x=edit("x", (0, read), float("inf")))
    with pytest.raises(RuntimeError, match="tree bin"):
        call(bin_map=torch.full_like(a["bin_map"], 200))                # past every tree's bins
    with pytest.raises(RuntimeError, match="exactly one leaf"):
        call(masks=torch.zeros_like(a["masks"]))
    with pytest.raises(RuntimeError, match="exactly one leaf"):
        call(masks=torch.full_like(a["masks"], -1))                     # every bit, bit 63 too
    with pytest.raises(RuntimeError, match="columns"):
        call(columns=edit("columns", 0, 11))                             # past the columns of x
    with pytest.raises(RuntimeError, match="input_start"):
        call(input_start=edit("input_start", 1, 4))                      # decreasing
    with pytest.raises(RuntimeError, match="cut_start"):
        call(cut_start=edit("cut_start", -1, int(a["cut_start"][-1]) + 1))   # points past cuts
    with pytest.raises(RuntimeError, match="bin_map"):
        call(bin_map=a["bin_map"][:-1])
    with pytest.raises(RuntimeError, match="mask_start"):
        call(mask_start=edit("mask_start", -1, int(a["mask_start"][-1]) + 1))   # points past masks
    with pytest.raises(RuntimeError, match="increase"):
        call(mask_start=edit("mask_start", 1, 0))                       # a (tree, input) with no bin
    with pytest.raises(RuntimeError, match="leaf_start"):
        call(leaf_start=edit("leaf_start", -1, int(a["leaf_start"][-1]) + 1))   # points past value
    with pytest.raises(RuntimeError, match="leaves"):
        call(leaf_start=edit("leaf_start", 1, int(a["leaf_start"][2])))        # a tree with no leaf
    with pytest.raises(RuntimeError, match="T >= 1"):
        call(leaf_start=a["leaf_start"][:2])                             # 2 groups, 1 tree slot
    with pytest.raises(RuntimeError, match="int64"):
        call(groups=a["groups"].int())


def test_non_contiguous_inputs():
    args, ref = _tables(7, ks=(3, 1), t=9, n=8, c=2)
    a = dict(zip(NAMES, args))
    wide = torch.zeros(a["x"].shape[0], 2 * a["x"].shape[1])
    wide[:, ::2] = a["x"]
    x_nc = wide[:, ::2]                                        # same values, strided columns
    value_nc = a["value"].t().contiguous().t()
    assert not x_nc.is_contiguous() and not value_nc.is_contiguous()
    a.update(x=x_nc, value=value_nc)
    assert torch.equal(forest_leaf_masks(*[a[k] for k in NAMES]), ref)


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(deadline=None, max_examples=60)
@given(seed=st.integers(0, 2**31 - 1), ks=st.lists(st.integers(0, 3), min_size=1, max_size=4),
       t=st.integers(1, 80), n=st.integers(0, 12), c=st.integers(1, 3), max_cuts=st.integers(0, 4),
       words=st.integers(1, 3), map16=st.booleans())
def test_property_matches_independent_evaluation(seed, ks, t, n, c, max_cuts, words, map16):
    args, ref = _tables(seed, ks=tuple(ks), t=t, n=n, c=c, max_cuts=max_cuts, words=words, map16=map16)
    assert torch.equal(forest_leaf_masks(*args), ref)
