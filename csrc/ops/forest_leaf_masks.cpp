// Schema of forest_leaf_masks: a random forest's mean leaf value by per-tree leaf bit masks (the
// bit-vector idea of QuickScorer, Lucchese et al., SIGIR 2015, on the boxes of each tree's own
// threshold grid; robustops/detect/forest.py, _TreeMasks, builds the tables):
//
//   i(t, f)    = mask_start[t * K + f]            (tree t's masks on input f: rows i(t, f) ..
//                                                   mask_start[t * K + f + 1] - 1 of masks, one
//                                                   per bin of t's own grid on f)
//   leaf(n, t) = the one bit set in  AND_f masks[i(t, f) + bin_map[f, bins[f, n], t], :]
//   out[n, c]  = (sum over t = 0..T-1, in that order, of value[leaf_start[t] + leaf(n, t), c]) / T
//
// bins: [K, N] int64 (input f's bin among the group's cuts, in [0, W)); bin_map: [K, W, T] uint8
// or int16 (that bin in tree t's own grid); masks: [M, words] int64 (63 leaves per word, bit 63
// unused), stored tree by tree so that one tree's masks are contiguous; mask_start: [T * K + 1]
// int64; leaf_start: [T + 1] int64 (tree t's leaves are value rows leaf_start[t] ..
// leaf_start[t + 1] - 1); value: [L, C] float64. The trees are summed in order from zero, as
// scikit-learn's predict_proba does, so the result is bit for bit its own. Corrupt tables (an
// index out of range, a mask AND without exactly one leaf) raise. Not differentiable.
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(robustops, m) {
  m.def("forest_leaf_masks(Tensor bins, Tensor bin_map, Tensor masks, Tensor mask_start, Tensor leaf_start, "
        "Tensor value) -> Tensor");
}

TORCH_LIBRARY_IMPL(robustops, Autograd, m) {
  m.impl("forest_leaf_masks", torch::autograd::autogradNotImplementedFallback());
}
