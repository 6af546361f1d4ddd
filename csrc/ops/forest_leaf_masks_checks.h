// Argument checks shared by the kernels of forest_leaf_masks (the schema file,
// forest_leaf_masks.cpp, describes the op).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace robustops {

// Bits of one mask word that hold leaves (bit 63, the sign bit, is never set).
constexpr int kLeafBitsPerWord = 63;

// Most mask words per tree: 63 * 64 = 4032 leaves per tree (deeper trees use another form).
constexpr int64_t kMaxMaskWords = 64;

// Error codes the CUDA kernel reports (bit flags; the host turns them into messages).
constexpr int kBadBin = 1;       // bins[f, n] outside [0, W)
constexpr int kBadTreeBin = 2;   // bin_map entry past the tree's bins on that input
constexpr int kBadLeaf = 4;      // AND of the masks without exactly one bit, or past the tree's leaves

inline void check_forest_leaf_masks_args(const at::Tensor& bins, const at::Tensor& bin_map, const at::Tensor& masks,
                                         const at::Tensor& mask_start, const at::Tensor& leaf_start,
                                         const at::Tensor& value) {
  TORCH_CHECK(bins.dim() == 2, "forest_leaf_masks: bins must be 2-D [K, N], got shape ", bins.sizes());
  TORCH_CHECK(bins.scalar_type() == at::kLong, "forest_leaf_masks: bins must be int64, got ", bins.scalar_type());
  TORCH_CHECK(bin_map.dim() == 3, "forest_leaf_masks: bin_map must be 3-D [K, W, T], got shape ", bin_map.sizes());
  TORCH_CHECK(bin_map.scalar_type() == at::kByte || bin_map.scalar_type() == at::kShort,
              "forest_leaf_masks: bin_map must be uint8 or int16, got ", bin_map.scalar_type());
  TORCH_CHECK(masks.dim() == 2, "forest_leaf_masks: masks must be 2-D [M, words], got shape ", masks.sizes());
  TORCH_CHECK(masks.scalar_type() == at::kLong, "forest_leaf_masks: masks must be int64, got ", masks.scalar_type());
  TORCH_CHECK(mask_start.dim() == 1 && mask_start.scalar_type() == at::kLong,
              "forest_leaf_masks: mask_start must be 1-D int64 [T * K + 1], got shape ", mask_start.sizes(), " and ",
              mask_start.scalar_type());
  TORCH_CHECK(leaf_start.dim() == 1 && leaf_start.scalar_type() == at::kLong,
              "forest_leaf_masks: leaf_start must be 1-D int64 [T + 1], got shape ", leaf_start.sizes(), " and ",
              leaf_start.scalar_type());
  TORCH_CHECK(value.dim() == 2 && value.scalar_type() == at::kDouble,
              "forest_leaf_masks: value must be 2-D float64 [L, C], got shape ", value.sizes(), " and ",
              value.scalar_type());
  const int64_t k = bins.size(0), t = bin_map.size(2);
  TORCH_CHECK(k >= 1, "forest_leaf_masks: need at least one input (K >= 1), got K = 0");
  TORCH_CHECK(t >= 1, "forest_leaf_masks: need at least one tree (T >= 1), got T = 0");
  TORCH_CHECK(bin_map.size(0) == k && bin_map.size(1) >= 1, "forest_leaf_masks: bin_map must be [K, W, T] with K = ",
              k, " and W >= 1, got shape ", bin_map.sizes());
  TORCH_CHECK(masks.size(1) >= 1 && masks.size(1) <= kMaxMaskWords, "forest_leaf_masks: masks must be [M, words] with ",
              "1 <= words <= ", kMaxMaskWords, ", got shape ", masks.sizes());
  TORCH_CHECK(mask_start.size(0) == t * k + 1, "forest_leaf_masks: mask_start must be [T * K + 1] = [", t * k + 1,
              "], got shape ", mask_start.sizes());
  TORCH_CHECK(leaf_start.size(0) == t + 1, "forest_leaf_masks: leaf_start must be [T + 1] = [", t + 1,
              "], got shape ", leaf_start.sizes());
  TORCH_CHECK(value.size(1) >= 1, "forest_leaf_masks: value needs at least one column, got shape ", value.sizes());
  for (const auto* p : {&bins, &bin_map, &masks, &mask_start, &leaf_start, &value}) {
    TORCH_CHECK(p->device() == bins.device(), "forest_leaf_masks: every tensor must be on the device of bins (",
                bins.device(), "), got ", p->device());
  }
}

// The offset tables, read on the host (CPU tensors): mask_start runs from 0 to M with at least
// one bin per (tree, input); leaf_start from 0 to L with 1 .. 63 * words leaves per tree. After
// this, every index the kernels form from them stays inside masks and value.
inline void check_offsets(const at::Tensor& mask_start_cpu, int64_t n_masks, const at::Tensor& leaf_start_cpu,
                          int64_t n_leaves, int64_t words) {
  const int64_t* m = mask_start_cpu.const_data_ptr<int64_t>();
  const int64_t nm = mask_start_cpu.size(0) - 1;
  TORCH_CHECK(m[0] == 0 && m[nm] == n_masks, "forest_leaf_masks: mask_start must run from 0 to the ", n_masks,
              " rows of masks, got ", m[0], " .. ", m[nm]);
  for (int64_t i = 0; i < nm; ++i) {
    TORCH_CHECK(m[i + 1] > m[i], "forest_leaf_masks: mask_start must increase (at least one bin per tree and ",
                "input), got ", m[i], " then ", m[i + 1], " at ", i);
  }
  const int64_t* s = leaf_start_cpu.const_data_ptr<int64_t>();
  const int64_t t = leaf_start_cpu.size(0) - 1;
  TORCH_CHECK(s[0] == 0 && s[t] == n_leaves, "forest_leaf_masks: leaf_start must run from 0 to the ", n_leaves,
              " rows of value, got ", s[0], " .. ", s[t]);
  for (int64_t i = 0; i < t; ++i) {
    const int64_t c = s[i + 1] - s[i];
    TORCH_CHECK(c >= 1 && c <= kLeafBitsPerWord * words, "forest_leaf_masks: tree ", i, " has ", c,
                " leaves; each tree needs 1 .. 63 * words = ", kLeafBitsPerWord * words);
  }
}

inline void raise_forest_leaf_masks_error(int code) {
  TORCH_CHECK(!(code & kBadBin), "forest_leaf_masks: bins holds a value outside [0, W)");
  TORCH_CHECK(!(code & kBadTreeBin), "forest_leaf_masks: bin_map holds a tree bin past the tree's bins");
  TORCH_CHECK(!(code & kBadLeaf),
              "forest_leaf_masks: the masks do not select exactly one leaf of a tree (corrupt tables)");
}

}  // namespace robustops
