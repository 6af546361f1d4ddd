// Schema of forest_leaf_masks: a random forest's mean leaf value, for every sample, by per-tree
// leaf bit masks (the bit-vector idea of QuickScorer, Lucchese et al., SIGIR 2015, on the boxes
// of each tree's own threshold grid); robustops/detect/forest.py, _LeafMasks, builds the tables.
//
// The samples come in G groups (the relevant-neuron detector's predicted classes); group g has
// its own forest of T trees over its own K_g inputs, read from columns of x. Input p (of P, all
// groups' inputs in order) of group g is column columns[p] of x, p in input_start[g] ..
// input_start[g + 1] - 1:
//
//   group bin     b = #{cuts c of p : c < x[n, columns[p]]}   (p's cuts: cuts[cut_start[p]] ..
//                                                             cuts[cut_start[p + 1] - 1], the
//                                                             thresholds of all g's trees on p,
//                                                             ascending; x <= c goes left, as
//                                                             in scikit-learn)
//   tree bin      u = bin_map[T * (cut_start[p] + p) + b * T + t]   (b in tree t's own grid)
//   segment       s = T * input_start[g] + t * K_g + (p - input_start[g])   (tree t, input p)
//   leaf(n, t)    = the one bit set in  AND_p masks[mask_start[s] + u, :]  among tree (g, t)'s
//                   leaves (63 per int64 word, bit 63 unused)
//   out[n, c]     = (sum over t = 0..T-1, in that order, of value[leaf_start[g T + t] + leaf, c]) / T
//                   with g = groups[n]
//
// x: [N, M] float32 (finite in the columns read); groups: [N] int64 in [0, G); columns: [P]
// int64 in [0, M); input_start: [G + 1] int64, 0 .. P, non-decreasing; cuts: [W] float32;
// cut_start: [P + 1] int64, 0 .. W, non-decreasing; bin_map: [T * (W + P)] uint8 or int16;
// mask_start: [T * P + 1] int64, 0 .. R, increasing; masks: [R, words] int64; leaf_start:
// [G * T + 1] int64, 0 .. L, 1 .. 63 * words leaves per tree; value: [L, C] float64. The trees
// are summed in order from zero, as scikit-learn's predict_proba does, so the result is bit for
// bit its own. Bad tables or inputs (an index out of range, a non-finite input, a mask AND
// without exactly one leaf) raise. Not differentiable.
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(robustops, m) {
  m.def("forest_leaf_masks(Tensor x, Tensor groups, Tensor columns, Tensor input_start, Tensor cuts, "
        "Tensor cut_start, Tensor bin_map, Tensor mask_start, Tensor masks, Tensor leaf_start, Tensor value) -> Tensor");
}

TORCH_LIBRARY_IMPL(robustops, Autograd, m) {
  m.impl("forest_leaf_masks", torch::autograd::autogradNotImplementedFallback());
}
