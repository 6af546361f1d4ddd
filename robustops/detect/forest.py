"""A fitted scikit-learn random forest as plain tensors: exact, batched predict; safe to save.

``TensorForest.from_sklearn(rf)`` copies every tree's node arrays (feature, threshold, children,
leaf class fractions) into padded tensors ``[T, max_nodes]``; :meth:`TensorForest.state_dict`
is what a saved detector stores (no pickled scikit-learn object, so it loads with
``torch.load(weights_only=True)``).

Inference is compiled from those arrays (:meth:`TensorForest.specialize`) into one of two exact
forms:

* **Leaf masks** (the default): QuickScorer's bit vectors (Lucchese et al., SIGIR 2015) on the
  boxes of each tree's own threshold grid. Per tree and input, the tree's distinct thresholds on
  that input cut it into bins; each leaf is a box of bins; per bin, a bit mask of the leaves
  whose box spans it. The AND of an input's bins' masks over the inputs leaves one bit: the
  leaf. An input value's bin in every tree comes from one binary search among the thresholds
  of all the group's trees on that input (its *group bin*) and a precomputed row, per group
  bin, of the bin in each tree (the *bin map*, one byte per tree and threshold: the bulk of the
  tables). Evaluated by the compiled op ``robustops::forest_leaf_masks``
  (``csrc/ops/forest_leaf_masks.cpp``) for every sample and every group in one call.
* **Walk** (trees with more than 63 x 64 leaves, or bin maps over ``MAX_MAP_BYTES``): every
  tree for every sample at once, one level per step. Node ids are doubled so a child is found
  as ``child[2 n + (x[f_n] <= t_n)]`` (one gather, no branch); every other level the (tree,
  sample) pairs already at a leaf are dropped once they are a large share (most paths end far
  above the deepest leaf).

Grouping is what the relevant-neuron detector needs with ``use_label=True``: an image of
predicted class j has zeros in every input outside class j's block, so every split on another
block's input is decided in advance (``0 <= t``). ``specialize(columns, blocks, G)`` resolves
those splits (pointer jumping over the node arrays), leaving per class a forest over that class's
few inputs. Inputs are read straight from the columns of the wide descriptor matrix (no design
matrix is built).

Exactness: the result equals ``rf.predict_proba`` bit for bit. Splits compare the float32
input with the float64 threshold as scikit-learn does (``x <= t``): the threshold is stored as
the largest float32 ``<= t``, which decides every float32 ``x`` the same way. Leaf fractions are
float64 and the trees' contributions are summed in tree order from zero, then divided by T, as
scikit-learn's ``out += tree.predict_proba(X)`` loop does. Inputs must be finite (the op raises
on a non-finite input it reads).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch

from .. import _ops  # noqa: F401  (registers robustops::forest_leaf_masks)

__all__ = ["TensorForest", "SpecializedForest"]

#: most 63-bit mask words per tree (leaves <= 63 x this; the op's limit); deeper trees walk.
MAX_MASK_WORDS = 64
#: largest bin map (bytes) of the leaf-mask form (:meth:`TensorForest.specialize`): one entry per
#: tree and per distinct threshold of every input of every group. The detector's 1000-tree
#: forests need ~10-50 MB; larger forests walk.
MAX_MAP_BYTES = 1 << 28
#: the compiled forms, for :meth:`TensorForest.specialize`'s ``form``.
FORMS = ("auto", "leaf_masks", "walk")


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
                   form: str = "auto", max_bytes: int = MAX_MAP_BYTES) -> "SpecializedForest":
        """Compile the forest for inputs read from columns of a wider matrix, optionally by group.

        Args:
            columns: int64 ``[F]``: forest input i is column ``columns[i]`` of the ``x`` given to
                :meth:`SpecializedForest.predict_proba`.
            blocks: int64 ``[F]`` (optional): the group of each input. ``predict_proba(x, groups)``
                then evaluates each sample ``n`` as if every input of another group than
                ``groups[n]`` were 0 (the detector's "with label" input), exactly.
            num_groups: G (default ``max(blocks) + 1``).
            form: ``"auto"`` (leaf masks unless a tree has more than 63 x ``MAX_MASK_WORDS``
                leaves or their bin maps would take more than ``max_bytes``; then the walk),
                ``"leaf_masks"`` or ``"walk"`` (all exact; see the module docstring).
            max_bytes: largest bin map (bytes) of the leaf-mask form.

        Raises:
            ValueError: bad ``columns`` / ``blocks`` / ``form``, or ``form="leaf_masks"`` for
                trees too deep for it or bin maps over ``max_bytes``.
        """
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        columns = torch.as_tensor(columns, dtype=torch.int64).cpu()
        n_in = self.n_inputs
        if columns.dim() != 1 or columns.numel() < n_in:
            raise ValueError(f"columns must be [F] with F >= {n_in} (the forest's inputs), "
                             f"got {tuple(columns.shape)}")
        raw = _RawArrays(self)
        if blocks is None:
            grouped = [_specialize_group(raw, np.ones(columns.numel(), bool), columns.numpy())]
        else:
            blocks = torch.as_tensor(blocks, dtype=torch.int64).cpu()
            if blocks.shape != columns.shape:
                raise ValueError(f"blocks must have the shape of columns {tuple(columns.shape)}, "
                                 f"got {tuple(blocks.shape)}")
            g = int(num_groups) if num_groups is not None else (int(blocks.max()) + 1 if blocks.numel() else 1)
            if blocks.numel() and (int(blocks.min()) < 0 or int(blocks.max()) >= g):
                raise ValueError(f"blocks must lie in [0, {g}), got [{int(blocks.min())}, {int(blocks.max())}]")
            b = blocks.numpy()
            grouped = [_specialize_group(raw, b == j, columns.numpy()) for j in range(g)]
        n_cols = int(columns.max()) + 1 if columns.numel() else 0
        n_cls = int(self.value.shape[-1])
        masks = None
        if form != "walk":
            masks = _LeafMasks.build(grouped, max_bytes)
            if masks is None and form == "leaf_masks":
                raise ValueError(f"form='leaf_masks' needs at most {63 * MAX_MASK_WORDS} leaves per tree and "
                                 f"tables of at most max_bytes={max_bytes}; use form='walk' or 'auto'")
        walk = None if masks is not None else _Walk([nd for nd, _ in grouped], [c for _, c in grouped])
        return SpecializedForest(masks, walk, len(grouped), self.n_trees, n_cls, n_cols, grouped=blocks is not None)

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


def _specialize_group(raw: _RawArrays, inputs: np.ndarray, columns: np.ndarray):
    """One group: resolve splits on inputs outside ``inputs`` (value 0) and keep the reachable
    nodes. Returns ``(node arrays, columns of the inputs the group's trees use)``."""
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
    return node, cols


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


def _to(obj, device):
    out = object.__new__(type(obj))
    out.__dict__.update({k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in obj.__dict__.items()})
    return out


def _tree_sum(values: torch.Tensor, index: torch.Tensor, t: int, n: int, column: Optional[int]) -> torch.Tensor:
    """Mean over trees of ``values[:, index]`` (``values [C, *]``, ``index [T * n]`` tree-major),
    summed sequentially in tree order (``cumsum``) as scikit-learn does: ``[n, C]``, or ``[n]``
    for one ``column``."""
    if column is not None:
        return values[column].index_select(0, index).view(t, n).cumsum(0)[-1] / t
    return torch.stack([v.index_select(0, index).view(t, n).cumsum(0)[-1] for v in values], 1) / t


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


class _LeafMasks:
    """Every group's trees as leaf bit masks on the boxes of each tree's own threshold grid (see
    the module docstring and ``csrc/ops/forest_leaf_masks.cpp``, which evaluates them).

    Tables, all groups concatenated (group by group; per group tree by tree, input by input: one
    *segment* per (group, tree, input)): ``columns [P]`` and ``input_start [G + 1]`` (each group's
    inputs); ``cuts [W]`` float32 and ``cut_start [P + 1]`` (each input's distinct thresholds
    over its group's trees, ascending: an input value's *group bin* is the number below it);
    ``bin_map [T * (W + P)]`` uint8 / int16 (per input and group bin, that bin in each of the T
    trees' own grids); ``mask_start [T * P + 1]`` and ``masks [R, words]`` int64 (per segment
    and tree bin, the leaves whose box spans the bin, 63 per word); ``leaf_start [G * T + 1]``
    and ``value [L, C]`` float64 (each tree's reachable leaves, in order)."""

    @classmethod
    def build(cls, grouped: List[tuple], max_bytes: int) -> Optional["_LeafMasks"]:
        """From ``(node arrays, columns)`` per group (:func:`_specialize_group`); ``None`` when a
        tree has more leaves than ``63 * MAX_MASK_WORDS``, cuts an input more than 32,766 times,
        or the tables would exceed ``max_bytes``."""
        t = grouped[0][0]["roots"].size
        parts, words, most_bins, n_map = [], 1, 1, 0
        for node, cols in grouped:
            k = cols.numel()
            cut = _tree_cuts(node, k)
            leaf, ltree, lo, hi = _leaf_boxes(node, cut["rank"], cut["dims"])
            ok = np.all(hi > lo, axis=1)                     # empty boxes: leaves no input reaches
            leaf, ltree, lo, hi = leaf[ok], ltree[ok], lo[ok], hi[ok]
            counts = np.bincount(ltree, minlength=t)
            most = int(counts.max(initial=1))
            words = max(words, -(-most // 63))
            most_bins = max(most_bins, int(cut["dims"].max(initial=1)))
            gcuts = [np.unique(cut["d_thr"][cut["d_feat"] == f]) for f in range(k)]
            n_map += t * sum(c.size + 1 for c in gcuts)
            parts.append((node, cols, cut, gcuts, leaf, ltree, lo, hi, counts))
        map_dtype = np.uint8 if most_bins <= 255 else np.int16
        if words > MAX_MASK_WORDS or most_bins > 32767 or n_map * np.dtype(map_dtype).itemsize > max_bytes:
            return None
        out = object.__new__(cls)
        cuts, maps, dims_all, masks, leaf_counts, values, columns, input_start = [], [], [], [], [], [], [], [0]
        for node, cols, cut, gcuts, leaf, ltree, lo, hi, counts in parts:
            k = cols.numel()
            dims = cut["dims"].reshape(-1)                   # tree bins per segment, tree-major
            seg_row = np.r_[0, np.cumsum(dims)][:-1]          # each segment's first mask row
            n_rows = int(dims.sum())
            first = np.r_[0, np.cumsum(counts)]
            pos = np.arange(leaf.size) - first[ltree]        # leaf position within its tree
            word, bit = pos // 63, np.left_shift(np.int64(1), (pos % 63).astype(np.int64))
            # +bit at the row where a leaf's box starts, -bit past its end (at most the next
            # segment's first row), then a running sum: the leaves' bits are distinct, so sums are ORs
            diff = np.zeros((n_rows + 1, words), np.int64)
            for f in range(k):
                row = seg_row[ltree * k + f]
                np.add.at(diff, (row + lo[:, f], word), bit)
                np.subtract.at(diff, (row + hi[:, f], word), bit)
            masks.append(np.cumsum(diff, axis=0)[:n_rows])
            for f in range(k):                               # tree bin of group bin b: the tree's cuts below b
                sel = cut["d_feat"] == f
                grank = np.searchsorted(gcuts[f], cut["d_thr"][sel])
                below = np.zeros((gcuts[f].size + 1, t), np.int32)
                below[grank + 1, cut["d_tree"][sel]] = 1
                maps.append(np.cumsum(below, axis=0).astype(map_dtype).reshape(-1))
                cuts.append(gcuts[f])
            dims_all.append(dims)
            leaf_counts.append(counts)
            values.append(node["value"][leaf])
            columns.append(cols)
            input_start.append(input_start[-1] + k)
        value = np.ascontiguousarray(np.concatenate(values))
        out.columns = torch.cat(columns)
        out.input_start = torch.tensor(input_start, dtype=torch.int64)
        out.cuts = torch.from_numpy(np.concatenate(cuts).astype(np.float32) if cuts else np.zeros(0, np.float32))
        out.cut_start = torch.from_numpy(np.r_[0, np.cumsum([c.size for c in cuts], dtype=np.int64)].astype(np.int64))
        out.bin_map = torch.from_numpy(np.concatenate(maps) if maps else np.zeros(0, map_dtype))
        out.mask_start = torch.from_numpy(np.r_[0, np.cumsum(np.concatenate(dims_all))].astype(np.int64))
        out.masks = torch.from_numpy(np.ascontiguousarray(np.concatenate(masks)))
        out.leaf_start = torch.from_numpy(np.r_[0, np.cumsum(np.concatenate(leaf_counts))].astype(np.int64))
        out.value = torch.from_numpy(value)
        out.value_columns = [torch.from_numpy(np.ascontiguousarray(value[:, c:c + 1])) for c in range(value.shape[1])]
        out.words = words
        return out

    def to(self, device) -> "_LeafMasks":
        out = _to(self, device)
        out.value_columns = [v.to(device) for v in self.value_columns]
        return out

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in (self.columns, self.input_start, self.cuts, self.cut_start,
                                                         self.bin_map, self.mask_start, self.masks, self.leaf_start,
                                                         self.value))

    def __call__(self, x: torch.Tensor, groups: torch.Tensor, column: Optional[int]) -> torch.Tensor:
        value = self.value if column is None else self.value_columns[column]
        # the op itself (its C++ checks validate every argument): the wrapper's Python checks
        # cost as much as a small batch's forest
        out = torch.ops.robustops.forest_leaf_masks(x, groups, self.columns, self.input_start, self.cuts,
                                                    self.cut_start, self.bin_map, self.mask_start, self.masks,
                                                    self.leaf_start, value)
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

    def __call__(self, x: torch.Tensor, column: Optional[int], which: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``which``: the walk group of each sample (default: all in the first)."""
        xt = x.index_select(1, self.cols).t().contiguous()   # [k, n]: the inputs the trees read
        if not bool(torch.isfinite(xt).all()):
            raise ValueError("x holds a non-finite value in a column the forest reads")
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
    """A :class:`TensorForest` compiled by :meth:`TensorForest.specialize`: every group's trees
    as leaf masks (one op call for all samples), or one walk of all groups."""

    def __init__(self, masks: Optional[_LeafMasks], walk: Optional[_Walk], n_groups: int, n_trees: int,
                 n_classes: int, n_columns: int, grouped: bool):
        self.masks = masks
        self.walk = walk
        self.n_groups = n_groups
        self.n_trees = n_trees
        self.n_classes = n_classes
        self.n_columns = n_columns
        self.grouped = grouped
        self.device = torch.device("cpu")

    @property
    def form(self) -> str:
        """How the forest is evaluated: ``"leaf_masks"`` or ``"walk"``."""
        return "leaf_masks" if self.masks is not None else "walk"

    def reading(self, columns: torch.Tensor, n_columns: int) -> "SpecializedForest":
        """The same forest reading its inputs from another matrix: column ``c`` of the ``x`` it
        was specialised for becomes column ``columns[c]`` of an ``x`` with ``n_columns`` columns
        (``columns``: int64 ``[>= n_columns of this forest]``; -1 for columns it does not read).
        Shares every table but the input columns. ``ValueError`` when a column the forest reads
        maps to -1 or outside ``[0, n_columns)``."""
        columns = torch.as_tensor(columns, dtype=torch.int64).cpu()
        read = self.masks.columns if self.masks is not None else self.walk.cols
        if columns.dim() != 1 or columns.numel() < self.n_columns:
            raise ValueError(f"columns must be [>= {self.n_columns}], got {tuple(columns.shape)}")
        new = columns[read.cpu()]
        if new.numel() and (int(new.min()) < 0 or int(new.max()) >= n_columns):
            raise ValueError(f"columns maps a column the forest reads outside [0, {n_columns})")
        out = object.__new__(SpecializedForest)
        out.__dict__.update(self.__dict__)
        out.n_columns = int(n_columns)
        if self.masks is not None:
            out.masks = _to(self.masks, self.device)         # a copy sharing the tables (already there)
            out.masks.columns = new.to(self.device)
        else:
            out.walk = _to(self.walk, self.device)
            out.walk.cols = new.to(self.device)
        return out

    def to(self, device) -> "SpecializedForest":
        out = object.__new__(SpecializedForest)
        out.__dict__.update(self.__dict__)
        out.masks = None if self.masks is None else self.masks.to(device)
        out.walk = None if self.walk is None else self.walk.to(device)
        out.device = torch.device(device)
        return out

    def predict_proba(self, x: torch.Tensor, groups: Optional[torch.Tensor] = None,
                      column: Optional[int] = None) -> torch.Tensor:
        """Class probabilities ``[N, n_classes]`` float64 of ``x [N, >= n_columns]`` (read as
        float32), or ``[N]`` for one class ``column``. Grouped forests need ``groups`` (int64
        ``[N]`` in ``[0, G)``); ungrouped ones ignore it. ``ValueError`` for bad shapes, groups
        out of range or a non-finite value in a column the forest reads."""
        x = x.to(device=self.device, dtype=torch.float32)
        if x.dim() != 2 or x.shape[1] < self.n_columns:
            raise ValueError(f"x must be [N, >= {self.n_columns}], got shape {tuple(x.shape)}")
        if column is not None and not 0 <= int(column) < self.n_classes:
            raise ValueError(f"column must lie in [0, {self.n_classes}), got {column}")
        if self.grouped:
            if groups is None or groups.shape != (x.shape[0],):
                raise ValueError(f"groups must be [N] = [{x.shape[0]}] for a grouped forest")
            groups = groups.to(device=self.device, dtype=torch.int64)
        if self.masks is not None:
            if not self.grouped:
                groups = torch.zeros(x.shape[0], dtype=torch.int64, device=self.device)
            try:
                return self.masks(x, groups, column)
            except RuntimeError as e:                        # the op checks groups and inputs as it reads them
                msg = str(e)                                 # (CPU and CUDA kernels' messages)
                if "is not finite" in msg or "holds a non-finite value" in msg:
                    raise ValueError(f"x holds a non-finite value in a column the forest reads ({msg})") from None
                if "lies outside [0, " in msg or "groups holds a value outside" in msg:
                    raise ValueError(f"groups must lie in [0, {self.n_groups}) ({msg})") from None
                raise
        if self.grouped and groups.numel():
            lo, hi = (int(v) for v in torch.aminmax(groups))
            if lo < 0 or hi >= self.n_groups:
                raise ValueError(f"groups must lie in [0, {self.n_groups}), got [{lo}, {hi}]")
        return self.walk(x, column, groups if self.grouped else None)
