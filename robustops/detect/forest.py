"""A fitted scikit-learn random forest as plain tensors: exact, batched predict; safe to save.

``TensorForest.from_sklearn(rf)`` copies every tree's node arrays (feature, threshold, children,
leaf class fractions) into padded tensors ``[T, max_nodes]``; :meth:`TensorForest.state_dict`
is what a saved detector stores (no pickled scikit-learn object, so it loads with
``torch.load(weights_only=True)``).

Inference is compiled from those arrays (:meth:`TensorForest.specialize`) into three exact
forms, chosen per *group* of samples:

* **Table** (few inputs): the forest is a step function of its inputs, constant on the cells of
  the grid cut by its thresholds. When that grid is small (``max_cells``) the forest's
  probabilities are painted into a table once; predicting is one ``searchsorted`` over the
  inputs and one gather, whatever the number or depth of the trees.
* **Per-tree tables** (more inputs, each tree cutting few of them): one small table per tree on
  the grid of that tree's own cuts, holding its leaf value. An input's bin among the group's
  cuts maps to its bin in every tree through a precomputed map: one ``searchsorted``, one
  gather for all trees and inputs, one gather of the values, then the sum over trees.
* **Per-tree leaf masks** (many cuts per input, few inputs): each tree's leaves are boxes of
  its own bins; per tree, input and bin a bit mask of the leaves whose box spans the bin. The
  AND of an input's masks over the inputs leaves one bit: its leaf (QuickScorer's bit vectors,
  on boxes). Costs a map from the group's bins to every tree's bins (uint8) -- tens of MB for
  the detector's 1000-tree default (``MAX_MASK_BYTES`` per group) -- and no per-level work.
* **Walk** (any forest): every tree for every sample at once, one level per step. Node ids are
  doubled so a child is found as ``child[2 n + (x[f_n] <= t_n)]`` (one gather, no branch);
  every other level the (tree, sample) pairs already at a leaf are dropped once they are a large
  share (most paths end far above the deepest leaf). All walking groups share one walk.

Grouping is what the relevant-neuron detector needs with ``use_label=True``: an image of
predicted class j has zeros in every input outside class j's block, so every split on another
block's input is decided in advance (``0 <= t``). ``specialize(columns, blocks, G)`` resolves
those splits (pointer jumping over the node arrays), leaving per class a forest over that class's
few inputs, shallow enough for a table or per-tree tables in most classes. Inputs are read
straight from the columns of the wide descriptor matrix (no design matrix is built).

Exactness: the result equals ``rf.predict_proba`` bit for bit. Splits compare the float32
input with the float64 threshold as scikit-learn does (``x <= t``): the threshold is stored as
the largest float32 ``<= t``, which decides every float32 ``x`` the same way. Leaf fractions are
float64 and the trees' contributions are summed in tree order from zero (a sequential
``cumsum`` over trees, or sequential table accumulation), then divided by T, as scikit-learn's
``out += tree.predict_proba(X)`` loop does. Inputs are expected finite (NaN routing is not
scikit-learn's).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch

from .._ops import forest_leaf_masks

__all__ = ["TensorForest", "SpecializedForest"]

#: largest table (grid cells) :meth:`TensorForest.specialize` builds for one group.
MAX_CELLS = 1 << 18
#: largest painting work (cells x trees) for one group's table.
MAX_TABLE_WORK = 1 << 25
#: largest total of the per-tree tables (cells summed over trees) for one group.
MAX_TREE_CELLS = 1 << 20
#: a group whose leaves are all pure (class fractions 0 or 1, as in fully grown trees) and that
#: cuts at most MAX_COUNT_INPUTS inputs gets a table of up to MAX_COUNT_CELLS cells whatever the
#: number of trees: the per-cell sums are integer counts (exact in any order), built with
#: difference arrays (2^k corners per leaf box) instead of painting every tree's grid.
MAX_COUNT_CELLS = 1 << 18
MAX_COUNT_INPUTS = 4
#: largest memory (bytes) of one group's per-tree leaf masks (:class:`_TreeMasks`: a map from the
#: group's bins to every tree's bins, uint8 / int16, plus the masks). The detector's 1000-tree
#: forests need ~5-50 MB per class with many thresholds; 0 disables the form.
MAX_MASK_BYTES = 1 << 26
#: most 63-bit mask words per tree (leaves <= 63 x this; the op's limit).
MAX_MASK_WORDS = 64


def _f32_floor(t: np.ndarray) -> np.ndarray:
    """Largest float32 ``<= t`` (elementwise) for float64 ``t``: then ``x <= t`` equals
    ``x <= floor32(t)`` for every float32 ``x``."""
    t32 = t.astype(np.float32)
    up = t32.astype(np.float64) > t
    t32[up] = np.nextafter(t32[up], np.float32(-np.inf))
    return t32


def _sklearn_normalises_leaves() -> bool:
    """scikit-learn < 1.4 stores class counts in ``tree_.value`` and normalises in predict_proba;
    >= 1.4 stores the fractions and returns them as they are."""
    import sklearn
    try:
        major, minor = (int(p) for p in sklearn.__version__.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) < (1, 4)


class TensorForest:
    """A random forest as padded node arrays (``T`` trees, ``K`` = most nodes in a tree).

    Attributes: ``feature`` ``[T, K]`` int64 (input index; 0 at leaves), ``threshold`` ``[T, K]``
    float32 (largest float32 ``<=`` scikit-learn's float64 threshold), ``left`` / ``right``
    ``[T, K]`` int64 (child node in the same tree; the node itself at leaves), ``value``
    ``[T, K, n_classes]`` float64 (class fractions of the training samples in the node),
    ``max_depth``.
    """

    def __init__(self, feature: torch.Tensor, threshold: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                 value: torch.Tensor, max_depth: int):
        self.feature = feature
        self.threshold = threshold
        self.left = left
        self.right = right
        self.value = value
        self.max_depth = int(max_depth)
        self._plain: Optional[SpecializedForest] = None

    @classmethod
    def from_sklearn(cls, rf) -> "TensorForest":
        """Copy a fitted ``sklearn.ensemble.RandomForestClassifier`` (single output)."""
        trees = [est.tree_ for est in rf.estimators_]
        k = max(t.node_count for t in trees)
        n_t = len(trees)
        n_cls = int(rf.n_classes_)
        feature = np.zeros((n_t, k), np.int64)
        threshold = np.zeros((n_t, k), np.float32)
        left = np.tile(np.arange(k, dtype=np.int64), (n_t, 1))
        right = left.copy()
        value = np.zeros((n_t, k, n_cls), np.float64)
        normalise = _sklearn_normalises_leaves()
        depth = 0
        for i, t in enumerate(trees):
            nc = t.node_count
            leaf = t.children_left[:nc] == -1
            feature[i, :nc] = np.where(leaf, 0, t.feature[:nc])
            threshold[i, :nc] = np.where(leaf, np.float32(0), _f32_floor(t.threshold[:nc].astype(np.float64)))
            left[i, :nc] = np.where(leaf, np.arange(nc), t.children_left[:nc])
            right[i, :nc] = np.where(leaf, np.arange(nc), t.children_right[:nc])
            v = np.array(t.value[:nc, 0, :n_cls], dtype=np.float64)
            if normalise:
                s = v.sum(axis=1)[:, None]
                s[s == 0.0] = 1.0
                v /= s
            value[i, :nc] = v
            depth = max(depth, t.max_depth)
        return cls(torch.from_numpy(feature), torch.from_numpy(threshold), torch.from_numpy(left),
                   torch.from_numpy(right), torch.from_numpy(value), depth)

    def to(self, device) -> "TensorForest":
        return TensorForest(self.feature.to(device), self.threshold.to(device), self.left.to(device),
                            self.right.to(device), self.value.to(device), self.max_depth)

    @property
    def n_trees(self) -> int:
        return self.feature.shape[0]

    @property
    def n_inputs(self) -> int:
        """Number of inputs the forest reads (1 + the largest feature index at a split)."""
        internal = self.left != torch.arange(self.left.shape[1], device=self.left.device)
        return int(self.feature[internal].max()) + 1 if bool(internal.any()) else 0

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[N, n_classes]`` (float64) of inputs ``x [N, F]`` (compared as
        float32): equal to the scikit-learn forest's ``predict_proba``."""
        if x.dim() != 2:
            raise ValueError(f"x must be [N, F], got shape {tuple(x.shape)}")
        if self._plain is None or self._plain.device != x.device:
            cols = torch.arange(max(self.n_inputs, 1))
            self._plain = self.specialize(cols).to(x.device)
        if x.shape[1] < self._plain.n_columns:
            raise ValueError(f"x has {x.shape[1]} columns, the forest reads {self._plain.n_columns}")
        return self._plain.predict_proba(x)

    def specialize(self, columns: torch.Tensor, blocks: Optional[torch.Tensor] = None, num_groups: Optional[int] = None,
                   max_cells: int = MAX_CELLS, max_table_work: int = MAX_TABLE_WORK,
                   max_tree_cells: int = MAX_TREE_CELLS, max_mask_bytes: int = MAX_MASK_BYTES) -> "SpecializedForest":
        """Compile the forest for inputs read from columns of a wider matrix, optionally by group.

        Args:
            columns: int64 ``[F]``: forest input i is column ``columns[i]`` of the ``x`` given to
                :meth:`SpecializedForest.predict_proba`.
            blocks: int64 ``[F]`` (optional): the group of each input. ``predict_proba(x, groups)``
                then evaluates each sample ``n`` as if every input of another group than
                ``groups[n]`` were 0 (the detector's "with label" input), exactly.
            num_groups: G (default ``max(blocks) + 1``).
            max_cells / max_table_work / max_tree_cells: how each group is evaluated (all exact):
                a group whose threshold grid has at most ``max_cells`` cells (and ``cells x trees
                <= max_table_work``) becomes one table; else, when the trees' own grids total at
                most ``max_tree_cells`` cells, one table per tree; else, when the per-tree bin map
                and leaf masks take at most ``max_mask_bytes`` bytes, per-tree leaf bit masks
                (:class:`_TreeMasks`); else a level-by-level walk.
        """
        columns = torch.as_tensor(columns, dtype=torch.int64).cpu()
        n_in = self.n_inputs
        if columns.dim() != 1 or columns.numel() < n_in:
            raise ValueError(f"columns must be [F] with F >= {n_in} (the forest's inputs), "
                             f"got {tuple(columns.shape)}")
        raw = _RawArrays(self)
        caps = (max(max_cells, 1), max_table_work, max_tree_cells, min(max_cells, MAX_COUNT_CELLS), max_mask_bytes)
        if blocks is None:
            grouped = [_compile(raw, np.ones(columns.numel(), bool), columns.numpy(), *caps)]
        else:
            blocks = torch.as_tensor(blocks, dtype=torch.int64).cpu()
            if blocks.shape != columns.shape:
                raise ValueError(f"blocks must have the shape of columns {tuple(columns.shape)}, "
                                 f"got {tuple(blocks.shape)}")
            g = int(num_groups) if num_groups is not None else (int(blocks.max()) + 1 if blocks.numel() else 1)
            if blocks.numel() and (int(blocks.min()) < 0 or int(blocks.max()) >= g):
                raise ValueError(f"blocks must lie in [0, {g}), got [{int(blocks.min())}, {int(blocks.max())}]")
            b = blocks.numpy()
            grouped = [_compile(raw, b == j, columns.numpy(), *caps) for j in range(g)]
        return SpecializedForest(grouped, self.n_trees, int(self.value.shape[-1]),
                                 int(columns.max()) + 1 if columns.numel() else 0, grouped=blocks is not None)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"feature": self.feature.cpu(), "threshold": self.threshold.cpu(), "left": self.left.cpu(),
                "right": self.right.cpu(), "value": self.value.cpu(),
                "max_depth": torch.tensor(self.max_depth)}

    @classmethod
    def from_state_dict(cls, d: Dict[str, torch.Tensor]) -> "TensorForest":
        need = ("feature", "threshold", "left", "right", "value", "max_depth")
        missing = [k for k in need if k not in d]
        if missing:
            raise ValueError(f"saved forest lacks {missing}")
        feature, left, right = d["feature"].long(), d["left"].long(), d["right"].long()
        threshold, value = d["threshold"].float(), d["value"].double()
        if not (feature.shape == threshold.shape == left.shape == right.shape == value.shape[:2]) or feature.dim() != 2:
            raise ValueError("saved forest arrays have inconsistent shapes")
        k = feature.shape[1]
        if feature.numel() and (int(left.min()) < 0 or int(left.max()) >= k or int(right.min()) < 0
                                or int(right.max()) >= k or int(feature.min()) < 0):
            raise ValueError("saved forest has out-of-range node or feature indices")
        if feature.numel() and not _is_forest(left.numpy(), right.numpy()):
            raise ValueError("saved forest's children do not form trees (a node below itself or shared)")
        return cls(feature, threshold, left, right, value, int(d["max_depth"]))


def _is_forest(left: np.ndarray, right: np.ndarray) -> bool:
    """Every node reached from its tree's root at most once, leaves self-looping (a loaded file
    could otherwise make a walk cycle or a table painting loop forever)."""
    t, k = left.shape
    ar = np.arange(k)
    internal = (left != ar) | (right != ar)
    if np.any(internal & ((left == ar) | (right == ar))):
        return False
    seen = np.zeros((t, k), np.int64)
    tree = np.arange(t)
    node = np.zeros(t, np.int64)
    for _ in range(k + 1):
        np.add.at(seen, (tree, node), 1)
        if seen.max() > 1:
            return False
        m = internal[tree, node]
        if not m.any():
            return True
        tree, node = np.r_[tree[m], tree[m]], np.r_[left[tree[m], node[m]], right[tree[m], node[m]]]
    return False


class _RawArrays:
    """The forest's arrays flattened to global node ids ``g = tree * K + node`` (numpy)."""

    def __init__(self, f: TensorForest):
        t, k = f.feature.shape
        base = (np.arange(t, dtype=np.int64) * k)[:, None]
        self.n_trees, self.k = t, k
        self.feature = f.feature.cpu().numpy().reshape(-1)
        self.threshold = f.threshold.cpu().numpy().reshape(-1)
        self.left = (f.left.cpu().numpy() + base).reshape(-1)
        self.right = (f.right.cpu().numpy() + base).reshape(-1)
        self.value = f.value.cpu().numpy().reshape(t * k, -1)
        ids = np.arange(t * k)
        self.internal = (self.left != ids) | (self.right != ids)
        self.roots = np.arange(t, dtype=np.int64) * k


def _compile(raw: _RawArrays, inputs: np.ndarray, columns: np.ndarray, max_cells: int, max_table_work: int,
             max_tree_cells: int, max_count_cells: int, max_mask_bytes: int = 0):
    """One group: resolve splits on inputs outside ``inputs`` (value 0), keep the reachable nodes,
    and build a table (small threshold grid), per-tree tables, per-tree leaf masks or a walk."""
    n = raw.feature.shape[0]
    ids = np.arange(n)
    mine = np.zeros(n, bool)
    mine[raw.internal] = inputs[raw.feature[raw.internal]]
    fixed = raw.internal & ~mine
    # a split on an input fixed at 0 goes left iff 0 <= t (float32 comparison, as the walk does)
    step = np.where(fixed, np.where(np.float32(0) <= raw.threshold, raw.left, raw.right), ids)
    while True:                                              # pointer jumping: step -> first kept node below
        nxt = step[step]
        if np.array_equal(nxt, step):
            break
        step = nxt
    left, right, roots = step[raw.left], step[raw.right], step[raw.roots]
    keep_internal = raw.internal & mine
    # reachable nodes (level by level) and each tree's depth
    reach = np.zeros(n, bool)
    reach[roots] = True
    depth = np.zeros(raw.n_trees, np.int64)
    front, tree, level = roots, np.arange(raw.n_trees), 0
    while True:
        m = keep_internal[front]
        front, tree = front[m], tree[m]
        if front.size == 0:
            break
        level += 1
        depth[tree] = level
        front, tree = np.r_[left[front], right[front]], np.r_[tree, tree]
        reach[front] = True
    kept = np.flatnonzero(reach)                             # sorted: tree-major
    new = np.full(n, -1, np.int64)
    new[kept] = np.arange(kept.size)
    internal = keep_internal[kept]
    local = np.full(inputs.shape[0], -1, np.int64)           # forest input -> position among the used ones
    used = np.unique(raw.feature[kept][internal])
    local[used] = np.arange(used.size)
    node = {"feature": np.where(internal, local[raw.feature[kept]], 0),
            "threshold": np.where(internal, raw.threshold[kept], np.float32(0)).astype(np.float32),
            "left": np.where(internal, new[left[kept]], np.arange(kept.size)),
            "right": np.where(internal, new[right[kept]], np.arange(kept.size)),
            "internal": internal, "value": raw.value[kept], "roots": new[roots], "depth": depth,
            "tree": kept // raw.k}
    cols = torch.from_numpy(np.ascontiguousarray(columns[used]))
    cuts = [np.unique(node["threshold"][internal & (node["feature"] == f)]) for f in range(used.size)]
    cells = float(np.exp2(min(sum(np.log2(c.size + 1) for c in cuts), 64.0)))      # log scale: no overflow
    leaf_values = node["value"][~internal]
    pure = bool(np.all((leaf_values == 0) | (leaf_values == 1))) and used.size <= MAX_COUNT_INPUTS
    if cells <= max_cells and (cells * raw.n_trees <= max_table_work or (pure and cells <= max_count_cells)):
        return _Table(node, cols, cuts, by_counts=pure)
    cut = _tree_cuts(node, used.size)
    tree_cells = float(np.exp2(np.minimum(np.log2(cut["dims"]).sum(1), 64.0)).sum())
    bin_map = used.size * raw.n_trees * (max([c.size for c in cuts], default=0) + 1)
    if tree_cells <= max_tree_cells and bin_map <= max_tree_cells:
        return _TreeTables(node, cols, cut, cuts)
    if max_mask_bytes > 0 and _TreeMasks.nbytes(node, cut, cuts) <= max_mask_bytes:
        return _TreeMasks(node, cols, cut, cuts)
    return (node, cols)                                      # a walk, merged with the others


def _leaf_boxes(node, rank: np.ndarray, dims: np.ndarray):
    """Each tree's leaves as boxes ``[lo, hi)`` of bins (``dims [T, k]`` bins per input and tree):
    going left at a split of rank r keeps bins ``<= r``, going right bins ``> r``. Returns
    ``(leaf node, tree, lo [L, k], hi [L, k])`` sorted by tree."""
    t = node["roots"].size
    k = dims.shape[1]
    front, tree = node["roots"], np.arange(t)
    lo, hi = np.zeros((t, k), np.int64), dims.astype(np.int64).copy()
    parts = []
    while front.size:
        m = node["internal"][front]
        parts.append((front[~m], tree[~m], lo[~m], hi[~m]))
        front, tree, lo, hi = front[m], tree[m], lo[m], hi[m]
        if front.size == 0:
            break
        f, r, rows = node["feature"][front], rank[front] + 1, np.arange(front.size)
        hi_l, lo_r = hi.copy(), lo.copy()
        hi_l[rows, f] = np.minimum(hi_l[rows, f], r)
        lo_r[rows, f] = np.maximum(lo_r[rows, f], r)
        front = np.r_[node["left"][front], node["right"][front]]
        tree = np.r_[tree, tree]
        lo, hi = np.r_[lo, lo_r], np.r_[hi_l, hi]
    leaf, tree, lo, hi = (np.concatenate([p[i] for p in parts]) for i in range(4))
    order = np.argsort(tree, kind="stable")
    return leaf[order], tree[order], lo[order], hi[order]


def _padded_cuts(cuts: List[np.ndarray], width: int) -> np.ndarray:
    out = np.full((len(cuts), width), np.inf, np.float32)  # +inf padding is never < x
    for f, c in enumerate(cuts):
        out[f, :c.size] = c
    return out


def _row_major_strides(dims: np.ndarray) -> np.ndarray:
    """``[..., k]`` strides of a row-major grid of shape ``dims[..., :]``."""
    strides = np.ones_like(dims)
    for f in range(dims.shape[-1] - 2, -1, -1):
        strides[..., f] = strides[..., f + 1] * dims[..., f + 1]
    return strides


def _to(obj, device):
    out = object.__new__(type(obj))
    out.__dict__.update({k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in obj.__dict__.items()})
    return out


def _gather_inputs(x: torch.Tensor, cols: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """``x[rows][:, cols]`` transposed: ``[k, n]`` contiguous."""
    v = x if rows is None else x.index_select(0, rows)
    return v.index_select(1, cols).t().contiguous()


def _tree_sum(values: torch.Tensor, index: torch.Tensor, t: int, n: int, column: Optional[int]) -> torch.Tensor:
    """Mean over trees of ``values[:, index]`` (``values [C, *]``, ``index [T * n]`` tree-major),
    summed sequentially in tree order (``cumsum``) as scikit-learn does: ``[n, C]``, or ``[n]``
    for one ``column``."""
    if column is not None:
        return values[column].index_select(0, index).view(t, n).cumsum(0)[-1] / t
    return torch.stack([v.index_select(0, index).view(t, n).cumsum(0)[-1] for v in values], 1) / t


class _Table:
    """The whole forest as a step function on the grid of its thresholds (exact for float32).

    Input f falls in bin ``#{cuts_f < x_f}`` (``searchsorted``); ``x_f <= t`` iff its bin is at
    most the rank of ``t`` among the cuts. Each tree's leaves are boxes of bins; the table is the
    sum over trees, in scikit-learn's order, of each tree's painted grid, divided by T.
    """

    def __init__(self, node, cols: torch.Tensor, cuts: List[np.ndarray], by_counts: bool = False):
        k = len(cuts)
        dims = np.asarray([c.size + 1 for c in cuts], np.int64)
        t = node["roots"].size
        n_cls = node["value"].shape[1]
        rank = np.zeros(node["feature"].size, np.int64)
        for f, c in enumerate(cuts):
            sel = node["internal"] & (node["feature"] == f)
            rank[sel] = np.searchsorted(c, node["threshold"][sel])
        leaf, ltree, lo, hi = _leaf_boxes(node, rank, np.tile(dims, (t, 1)))
        if by_counts:
            # pure leaves: each cell's sum over trees is an integer count, the same in any order;
            # +-1 at the 2^k corners of every non-empty box, then a prefix sum along each axis
            nonempty = np.all(hi > lo, axis=1)
            leaf, lo, hi = leaf[nonempty], lo[nonempty], hi[nonempty]
            vals = node["value"][leaf].astype(np.int64)     # [L, C] of 0 / 1
            diff = np.zeros(tuple(dims + 1) + (n_cls,), np.int64)
            if k == 0:                                       # one cell: every tree is a single leaf
                diff += vals.sum(0)
            for corner in range(1 << k if k else 0):
                bits = [(corner >> f) & 1 for f in range(k)]
                idx = tuple(hi[:, f] if b else lo[:, f] for f, b in enumerate(bits))
                np.add.at(diff, idx, vals if sum(bits) % 2 == 0 else -vals)
            for axis in range(k):
                diff = np.cumsum(diff, axis=axis)
            acc = diff[tuple(slice(0, d) for d in dims)].astype(np.float64)
        else:
            acc = np.zeros(tuple(dims) + (n_cls,), np.float64)
            grid = np.empty_like(acc)
            starts = np.searchsorted(ltree, np.arange(t + 1))
            for i in range(t):                               # trees in scikit-learn's summation order
                for p in range(starts[i], starts[i + 1]):
                    grid[tuple(slice(a, b) for a, b in zip(lo[p], hi[p]))] = node["value"][leaf[p]]
                acc += grid
        acc /= t
        self.table = torch.from_numpy(np.ascontiguousarray(acc.reshape(-1, n_cls).T))   # [C, cells]
        self.cuts = torch.from_numpy(_padded_cuts(cuts, max([c.size for c in cuts], default=0)))
        self.strides = torch.from_numpy(_row_major_strides(dims))[:, None]
        self.cols = cols

    def to(self, device) -> "_Table":
        return _to(self, device)

    def __call__(self, x: torch.Tensor, rows: Optional[torch.Tensor], column: Optional[int]) -> torch.Tensor:
        table = self.table if column is None else self.table[column:column + 1]
        if self.cols.numel() == 0:
            n = x.shape[0] if rows is None else rows.numel()
            return table[:, 0].expand(n, table.shape[0]) if column is None else table[0, 0].expand(n)
        bins = torch.searchsorted(self.cuts, _gather_inputs(x, self.cols, rows))   # [k, n]: #{cuts < x}
        out = table.index_select(1, (bins * self.strides).sum(0))
        return out.t() if column is None else out[0]


def _tree_cuts(node, k: int) -> dict:
    """Per tree and input the distinct thresholds (``d_tree``, ``d_feat``, ``d_thr``), the grid
    shape ``dims [T, k]`` (number of cuts + 1) and each internal node's rank among its cuts."""
    t = node["roots"].size
    internal = node["internal"]
    idx = np.flatnonzero(internal)
    it, f, thr = node["tree"][idx], node["feature"][idx], node["threshold"][idx]
    order = np.lexsort((thr, f, it))
    idx, it, f, thr = idx[order], it[order], f[order], thr[order]
    first = np.ones(idx.size, bool)
    first[1:] = (it[1:] != it[:-1]) | (f[1:] != f[:-1]) | (thr[1:] != thr[:-1])
    u = np.cumsum(first) - 1                             # distinct cut of each sorted node
    seg = (it * k + f)[first]                            # (tree, input) of each distinct cut
    count = np.bincount(seg, minlength=t * k).reshape(t, k)
    seg_start = np.r_[0, np.cumsum(count.reshape(-1))][:-1]
    pos = np.arange(seg.size) - seg_start[seg]           # rank of each distinct cut within its (tree, input)
    rank = np.zeros(internal.size, np.int64)
    rank[idx] = pos[u]
    return {"dims": count + 1, "rank": rank, "d_tree": it[first], "d_feat": f[first], "d_thr": thr[first]}


class _TreeTables:
    """One small table per tree, on the grid of that tree's own thresholds, holding the value of
    the leaf each cell reaches. An input's bin among the group's cuts (one ``searchsorted``)
    maps to its bin in every tree (a precomputed map, one gather for all trees and inputs);
    the trees' values are then summed in order (as the walk does)."""

    def __init__(self, node, cols: torch.Tensor, cut: dict, gcuts: List[np.ndarray]):
        t, k = node["roots"].size, cut["dims"].shape[1]
        dims = cut["dims"]
        strides = _row_major_strides(dims)
        cells = dims.prod(1)
        offsets = np.r_[0, np.cumsum(cells)][:-1]
        leaf, ltree, lo, hi = _leaf_boxes(node, cut["rank"], dims)
        n_cls = node["value"].shape[1]
        table = np.empty((int(cells.sum()), n_cls), np.float64)
        split = dims > 1                                     # a tree's grid only spans the inputs it cuts
        for p in range(leaf.size):
            i = ltree[p]
            view = table[offsets[i]:offsets[i] + cells[i]].reshape(tuple(dims[i][split[i]]) + (n_cls,))
            view[tuple(slice(a, b) for a, b in zip(lo[p][split[i]], hi[p][split[i]]))] = node["value"][leaf[p]]
        # group bin b of input f (x in (gcuts_f[b-1], gcuts_f[b]]) -> bin in tree t: the number
        # of t's cuts on f of group rank < b; stored times the stride (plus the tree's offset)
        width = max(c.size for c in gcuts) + 1
        grank = np.zeros(cut["d_thr"].size, np.int64)
        for f, c in enumerate(gcuts):
            sel = cut["d_feat"] == f
            grank[sel] = np.searchsorted(c, cut["d_thr"][sel])
        counts = np.zeros((k, t, width), np.int64)
        counts[cut["d_feat"], cut["d_tree"], grank + 1] = 1
        bin_map = np.cumsum(counts, axis=2) * strides.T[:, :, None]
        bin_map[0] += offsets[:, None]
        self.bin_map = torch.from_numpy(bin_map.reshape(-1))
        self.base = torch.from_numpy((np.arange(k * t, dtype=np.int64) * width).reshape(k, t, 1))
        self.cuts = torch.from_numpy(_padded_cuts(gcuts, width - 1))
        self.table = torch.from_numpy(np.ascontiguousarray(table.T))         # [C, cells]
        self.cols = cols
        self.n_trees = t

    def to(self, device) -> "_TreeTables":
        return _to(self, device)

    def __call__(self, x: torch.Tensor, rows: Optional[torch.Tensor], column: Optional[int]) -> torch.Tensor:
        xt = _gather_inputs(x, self.cols, rows)              # [k, n]
        n, t = xt.shape[1], self.n_trees
        bins = torch.searchsorted(self.cuts, xt)            # [k, n]: group bins
        cell = self.bin_map.index_select(0, (self.base + bins[:, None, :]).view(-1)).view(-1, t, n).sum(0)  # [T, n]
        return _tree_sum(self.table, cell.reshape(-1), t, n, column)


class _TreeMasks:
    """Per-tree leaf bit masks (the bit-vector idea of QuickScorer, Lucchese et al., SIGIR 2015,
    on boxes): a tree's leaves are boxes of its own bins that partition its grid, so the leaf an
    input reaches is the one leaf whose box contains the input's bin on every input. Per tree,
    input and bin the set of leaves whose box spans that bin is a bit mask (63 leaves per int64
    word); the AND of the masks over the inputs has exactly one bit set: the leaf.

    Predicting: one ``searchsorted`` of the inputs among the group's cuts, then the compiled op
    ``robustops::forest_leaf_masks`` (``csrc/ops/forest_leaf_masks.cpp``): per sample and tree
    the group bin -> tree bin map, the AND of the masks over the inputs, the leaf from its bit,
    and the trees' leaf values summed in tree order (as the walk does), so the result is bit for
    bit the walk's and scikit-learn's. Memory: the bin map ``[k, cuts+1, T]`` (uint8 when every tree cuts an input fewer than 255
    times, else int16) and the masks ``[k, T, bins, words]`` int64 (:meth:`nbytes`)."""

    @staticmethod
    def _map_dtype(cut: dict):
        return np.uint8 if int(cut["dims"].max(initial=1)) <= 255 else np.int16

    @staticmethod
    def nbytes(node, cut: dict, gcuts: List[np.ndarray]) -> float:
        t, k = cut["dims"].shape
        if k == 0 or int(cut["dims"].max()) > 32767:
            return float("inf")
        width = max(c.size for c in gcuts) + 1
        leaves = np.bincount(node["tree"][~node["internal"]], minlength=t)
        words = max(1, -(-int(leaves.max()) // 63))
        if words > MAX_MASK_WORDS:
            return float("inf")
        return (float(k) * width * t * np.dtype(_TreeMasks._map_dtype(cut)).itemsize
                + float(cut["dims"].sum()) * words * 8)

    def __init__(self, node, cols: torch.Tensor, cut: dict, gcuts: List[np.ndarray]):
        t, k = node["roots"].size, cut["dims"].shape[1]
        dims = cut["dims"]
        leaf, ltree, lo, hi = _leaf_boxes(node, cut["rank"], dims)
        ok = np.all(hi > lo, axis=1)                         # empty boxes: leaves no input reaches
        leaf, ltree, lo, hi = leaf[ok], ltree[ok], lo[ok], hi[ok]
        start = np.searchsorted(ltree, np.arange(t + 1))
        pos = np.arange(leaf.size) - start[ltree]
        words = max(1, -(-int(np.diff(start).max()) // 63))     # <= MAX_MASK_WORDS (nbytes)
        maxb = int(dims.max())
        word, bit = pos // 63, np.left_shift(np.int64(1), (pos % 63).astype(np.int64))
        masks = np.zeros((k, t, maxb + 1, words), np.int64)
        for f in range(k):                                   # +bit where the box starts, -bit past its end
            np.add.at(masks[f], (ltree, lo[:, f], word), bit)
            np.subtract.at(masks[f], (ltree, hi[:, f], word), bit)
        masks = np.cumsum(masks, axis=2)[:, :, :maxb]        # distinct bits: the sums are ORs
        width = max(c.size for c in gcuts) + 1
        grank = np.zeros(cut["d_thr"].size, np.int64)
        for f, c in enumerate(gcuts):
            sel = cut["d_feat"] == f
            grank[sel] = np.searchsorted(c, cut["d_thr"][sel])
        dt = self._map_dtype(cut)
        bin_map = np.empty((k, width, t), dt)
        for f in range(k):                                   # tree bin = #{tree's cuts of group rank < b}
            cnt = np.zeros((width, t), np.int32)
            sel = cut["d_feat"] == f
            cnt[grank[sel] + 1, cut["d_tree"][sel]] = 1
            bin_map[f] = np.cumsum(cnt, axis=0)
        self.bin_map = torch.from_numpy(np.ascontiguousarray(bin_map))                    # [k, width, T]
        # tree by tree, input by input, only the bins the tree has: [sum(dims), words]
        used = np.arange(maxb)[None, None, :] < dims[:, :, None]                          # [T, k, maxb]
        self.masks = torch.from_numpy(np.ascontiguousarray(masks.transpose(1, 0, 2, 3)[used]))
        self.mask_start = torch.from_numpy(np.r_[0, np.cumsum(dims.reshape(-1))].astype(np.int64))   # [T * k + 1]
        self.leaf_start = torch.from_numpy(start.astype(np.int64))                        # [T + 1]
        value = np.ascontiguousarray(node["value"][leaf])                                  # [leaves, C]
        self.value = torch.from_numpy(value)
        self.value_columns = [torch.from_numpy(np.ascontiguousarray(value[:, c:c + 1])) for c in range(value.shape[1])]
        self.cuts = torch.from_numpy(_padded_cuts(gcuts, width - 1))
        self.cols = cols
        self.words = words
        self.n_trees = t

    def to(self, device) -> "_TreeMasks":
        out = _to(self, device)
        out.value_columns = [v.to(device) for v in self.value_columns]
        return out

    def __call__(self, x: torch.Tensor, rows: Optional[torch.Tensor], column: Optional[int]) -> torch.Tensor:
        bins = torch.searchsorted(self.cuts, _gather_inputs(x, self.cols, rows))     # [k, n]: group bins
        value = self.value if column is None else self.value_columns[column]
        out = forest_leaf_masks(bins, self.bin_map, self.masks, self.mask_start, self.leaf_start, value)
        return out if column is None else out[:, 0]


class _Walk:
    """Every tree for every sample, level by level, for one or several groups at once (one set
    of tensor ops per level whatever the number of groups). Pairs (tree, sample) that reached a
    leaf are dropped from the work arrays every other level once they are a large share (most
    paths end far above the deepest leaf)."""

    def __init__(self, nodes: List[dict], cols: List[torch.Tensor]):
        node_off = np.cumsum([0] + [nd["feature"].size for nd in nodes])
        col_off = np.cumsum([0] + [c.numel() for c in cols])
        threshold = np.concatenate([nd["threshold"] for nd in nodes])
        value = np.concatenate([nd["value"] for nd in nodes])
        internal = np.concatenate([nd["internal"] for nd in nodes])
        feature = np.concatenate([nd["feature"] + o for nd, o in zip(nodes, col_off)])
        left = np.concatenate([nd["left"] + o for nd, o in zip(nodes, node_off)])
        right = np.concatenate([nd["right"] + o for nd, o in zip(nodes, node_off)])
        roots = np.stack([nd["roots"] + o for nd, o in zip(nodes, node_off)])              # [G, T]
        self.roots = torch.from_numpy(np.ascontiguousarray(2 * roots.T))                    # [T, G], doubled ids
        self.depth = int(np.stack([nd["depth"] for nd in nodes]).max(initial=0))
        # doubled ids: node g lives at 2g and 2g+1; child[2g] = right, child[2g+1] = left
        self.feature2 = torch.from_numpy(np.repeat(feature, 2))
        self.threshold2 = torch.from_numpy(np.repeat(threshold, 2))
        self.internal2 = torch.from_numpy(np.repeat(internal, 2))
        self.child2 = torch.from_numpy(np.stack([2 * right, 2 * left], 1).reshape(-1))
        self.value = torch.from_numpy(np.ascontiguousarray(value.T))                       # [C, nodes]
        self.cols = torch.cat(cols)

    def to(self, device) -> "_Walk":
        return _to(self, device)

    def __call__(self, x: torch.Tensor, rows: Optional[torch.Tensor], column: Optional[int],
                 which: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``which``: the walk group of each sample (default: all in the first)."""
        xt = _gather_inputs(x, self.cols, rows)              # [k, n]
        n = xt.shape[1]
        t = self.roots.shape[0]
        xflat = xt.reshape(-1)
        if which is None:
            node = self.roots[:, :1].expand(t, n).reshape(-1)   # pair p = tree * n + sample
        else:
            node = self.roots.index_select(1, which).reshape(-1)
        col = torch.arange(n, device=node.device).repeat(t)
        feature_n = self.feature2 * n                        # row offsets of the inputs in xflat
        final, pair = None, None                             # leaves of the dropped pairs; kept pairs' ids
        for level in range(self.depth):
            at = feature_n.index_select(0, node).add_(col)
            go_left = xflat.index_select(0, at) <= self.threshold2.index_select(0, node)
            node = self.child2.index_select(0, node + go_left)
            if level >= 2 and level + 1 < self.depth:
                live = self.internal2.index_select(0, node)
                n_live = int(live.sum())
                if n_live < 0.7 * node.numel():               # drop the finished pairs
                    if final is None:
                        final = node.clone()
                    else:
                        final.index_copy_(0, pair, node)
                    if n_live == 0:
                        node = None
                        break
                    keep = live.nonzero().squeeze(1)
                    node, col = node.index_select(0, keep), col.index_select(0, keep)
                    pair = keep if pair is None else pair.index_select(0, keep)
        if final is None:
            final = node
        elif node is not None:
            final.index_copy_(0, pair, node)
        return _tree_sum(self.value, final >> 1, t, n, column)   # tree-major: scikit-learn's order


class SpecializedForest:
    """A :class:`TensorForest` compiled by :meth:`TensorForest.specialize`: per group a table,
    per-tree tables, or a walk (all walking groups share one walk)."""

    def __init__(self, compiled: list, n_trees: int, n_classes: int, n_columns: int, grouped: bool):
        self.n_trees = n_trees
        self.n_classes = n_classes
        self.n_columns = n_columns
        self.grouped = grouped
        self.device = torch.device("cpu")
        self.groups: list = []                               # per group: a table object, or None (walks)
        self.walk_of = torch.full((len(compiled),), -1, dtype=torch.int64)
        walks = [(j, c) for j, c in enumerate(compiled) if isinstance(c, tuple)]
        for j, c in enumerate(compiled):
            self.groups.append(None if isinstance(c, tuple) else c)
        for i, (j, _) in enumerate(walks):
            self.walk_of[j] = i
        self.walk = _Walk([c[0] for _, c in walks], [c[1] for _, c in walks]) if walks else None

    def to(self, device) -> "SpecializedForest":
        out = object.__new__(SpecializedForest)
        out.__dict__.update(self.__dict__)
        out.groups = [None if g is None else g.to(device) for g in self.groups]
        out.walk = None if self.walk is None else self.walk.to(device)
        out.walk_of = self.walk_of.to(device)
        out.device = torch.device(device)
        return out

    def kinds(self) -> List[str]:
        """How each group is evaluated: ``"table"``, ``"tree_tables"``, ``"tree_masks"`` or ``"walk"``."""
        kind = {_Table: "table", _TreeTables: "tree_tables", _TreeMasks: "tree_masks"}
        return ["walk" if g is None else kind[type(g)] for g in self.groups]

    def predict_proba(self, x: torch.Tensor, groups: Optional[torch.Tensor] = None,
                      column: Optional[int] = None) -> torch.Tensor:
        """Class probabilities ``[N, n_classes]`` float64 of ``x [N, >= n_columns]`` (read as
        float32), or ``[N]`` for one class ``column``. Grouped forests need ``groups`` (int64
        ``[N]`` in ``[0, G)``); ungrouped ones ignore it."""
        x = x.to(device=self.device, dtype=torch.float32)
        if x.dim() != 2 or x.shape[1] < self.n_columns:
            raise ValueError(f"x must be [N, >= {self.n_columns}], got shape {tuple(x.shape)}")
        if column is not None and not 0 <= int(column) < self.n_classes:
            raise ValueError(f"column must lie in [0, {self.n_classes}), got {column}")
        if not self.grouped:
            g = self.groups[0]
            return self.walk(x, None, column) if g is None else g(x, None, column)
        if groups is None or groups.shape != (x.shape[0],):
            raise ValueError(f"groups must be [N] = [{x.shape[0]}] for a grouped forest")
        groups = groups.to(self.device)
        n_groups = len(self.groups)
        counts = torch.bincount(groups, minlength=n_groups)
        if counts.numel() > n_groups:
            raise ValueError(f"groups must lie in [0, {n_groups})")
        shape = (x.shape[0],) if column is not None else (x.shape[0], self.n_classes)
        out = torch.empty(shape, dtype=torch.float64, device=self.device)
        order = torch.argsort(groups, stable=True)
        start, walking = 0, []
        for j, c in enumerate(counts.tolist()):
            if c:
                rows = order[start:start + c]
                start += c
                if self.groups[j] is None:
                    walking.append(rows)
                else:
                    out.index_copy_(0, rows, self.groups[j](x, rows, column))
        if walking:
            rows = torch.cat(walking)
            out.index_copy_(0, rows, self.walk(x, rows, column, self.walk_of.index_select(0, groups[rows])))
        return out
