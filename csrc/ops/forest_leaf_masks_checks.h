// Argument checks shared by the kernels of forest_leaf_masks (the schema file,
// forest_leaf_masks.cpp, describes the op and its tables).
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cstdint>

namespace robustops {

// Bits of one mask word that hold leaves (bit 63, the sign bit, is never set).
constexpr int kLeafBitsPerWord = 63;

// Most mask words per tree: 63 * 64 = 4032 leaves per tree (deeper trees use another form).
constexpr int64_t kMaxMaskWords = 64;

// Error codes the kernels report (bit flags; the host turns them into messages).
constexpr int kBadGroup = 1;     // groups[n] outside [0, G)
constexpr int kBadInput = 2;     // a non-finite value in a column the sample's forest reads
constexpr int kBadTreeBin = 4;   // a bin_map entry past the tree's bins on that input
constexpr int kBadLeaf = 8;      // AND of the masks without exactly one bit, or past the tree's leaves

// The forest's sizes, read from the offset tables.
struct ForestLayout {
  int64_t groups;   // G
  int64_t trees;    // T (per group)
  int64_t inputs;   // P = sum of K_g
};

inline void check_forest_leaf_masks_args(const at::Tensor& x, const at::Tensor& groups, const at::Tensor& columns,
                                         const at::Tensor& input_start, const at::Tensor& cuts,
                                         const at::Tensor& cut_start, const at::Tensor& bin_map,
                                         const at::Tensor& mask_start, const at::Tensor& masks,
                                         const at::Tensor& leaf_start, const at::Tensor& value) {
  struct Want {
    const at::Tensor* t;
    const char* name;
    at::ScalarType dtype;
    const char* dtype_name;
    int64_t dim;
  };
  const at::ScalarType map_dtype = bin_map.scalar_type() == at::kShort ? at::kShort : at::kByte;
  const Want want[] = {{&x, "x", at::kFloat, "float32", 2},
                       {&groups, "groups", at::kLong, "int64", 1},
                       {&columns, "columns", at::kLong, "int64", 1},
                       {&input_start, "input_start", at::kLong, "int64", 1},
                       {&cuts, "cuts", at::kFloat, "float32", 1},
                       {&cut_start, "cut_start", at::kLong, "int64", 1},
                       {&bin_map, "bin_map", map_dtype, "uint8 or int16", 1},
                       {&mask_start, "mask_start", at::kLong, "int64", 1},
                       {&masks, "masks", at::kLong, "int64", 2},
                       {&leaf_start, "leaf_start", at::kLong, "int64", 1},
                       {&value, "value", at::kDouble, "float64", 2}};
  for (const Want& w : want) {
    TORCH_CHECK(w.t->scalar_type() == w.dtype, "forest_leaf_masks: ", w.name, " must be ", w.dtype_name, ", got ",
                w.t->scalar_type());
    TORCH_CHECK(w.t->dim() == w.dim, "forest_leaf_masks: ", w.name, " must be ", w.dim, "-D, got shape ",
                w.t->sizes());
    TORCH_CHECK(w.t->device() == x.device(), "forest_leaf_masks: every tensor must be on the device of x (",
                x.device(), "), ", w.name, " is on ", w.t->device());
  }
  TORCH_CHECK(groups.size(0) == x.size(0), "forest_leaf_masks: groups must be [N] = [", x.size(0), "], got shape ",
              groups.sizes());
  TORCH_CHECK(input_start.size(0) >= 2, "forest_leaf_masks: input_start must be [G + 1] with G >= 1, got shape ",
              input_start.sizes());
  TORCH_CHECK(cut_start.size(0) == columns.size(0) + 1, "forest_leaf_masks: cut_start must be [P + 1] = [",
              columns.size(0) + 1, "], got shape ", cut_start.sizes());
  TORCH_CHECK(masks.size(1) >= 1 && masks.size(1) <= kMaxMaskWords, "forest_leaf_masks: masks must be [R, words] ",
              "with 1 <= words <= ", kMaxMaskWords, ", got shape ", masks.sizes());
  TORCH_CHECK(value.size(1) >= 1, "forest_leaf_masks: value needs at least one column, got shape ", value.sizes());
}

// The offset tables, read on the host (CPU tensors): after this every index the kernels form
// from them stays inside columns, cuts, bin_map, masks and value, and every tree has 1 .. 63 *
// words leaves (the kernels still check each tree bin they read against its segment's rows).
inline ForestLayout check_offsets(const at::Tensor& columns_cpu, const at::Tensor& input_start_cpu,
                                  const at::Tensor& cut_start_cpu, const at::Tensor& mask_start_cpu,
                                  const at::Tensor& leaf_start_cpu, int64_t x_cols, int64_t n_cuts,
                                  int64_t bin_map_size, int64_t n_mask_rows, int64_t n_leaves, int64_t words) {
  ForestLayout l{input_start_cpu.size(0) - 1, 0, columns_cpu.size(0)};
  const int64_t* is = input_start_cpu.const_data_ptr<int64_t>();
  TORCH_CHECK(is[0] == 0 && is[l.groups] == l.inputs, "forest_leaf_masks: input_start must run from 0 to the ",
              l.inputs, " entries of columns, got ", is[0], " .. ", is[l.groups]);
  for (int64_t g = 0; g < l.groups; ++g) {
    TORCH_CHECK(is[g + 1] >= is[g], "forest_leaf_masks: input_start must not decrease, got ", is[g], " then ",
                is[g + 1], " at ", g);
  }
  const int64_t* cols = columns_cpu.const_data_ptr<int64_t>();
  const int64_t* cs = cut_start_cpu.const_data_ptr<int64_t>();
  TORCH_CHECK(cs[0] == 0 && cs[l.inputs] == n_cuts, "forest_leaf_masks: cut_start must run from 0 to the ", n_cuts,
              " cuts, got ", cs[0], " .. ", cs[l.inputs]);
  for (int64_t p = 0; p < l.inputs; ++p) {
    TORCH_CHECK(cols[p] >= 0 && cols[p] < x_cols, "forest_leaf_masks: columns[", p, "] = ", cols[p],
                " lies outside the ", x_cols, " columns of x");
    TORCH_CHECK(cs[p + 1] >= cs[p], "forest_leaf_masks: cut_start must not decrease, got ", cs[p], " then ",
                cs[p + 1], " at ", p);
  }
  const int64_t tree_slots = leaf_start_cpu.size(0) - 1;
  TORCH_CHECK(tree_slots >= l.groups && tree_slots % l.groups == 0, "forest_leaf_masks: leaf_start must be ",
              "[G * T + 1] with G = ", l.groups, " groups and T >= 1 trees, got shape ", leaf_start_cpu.sizes());
  l.trees = tree_slots / l.groups;
  TORCH_CHECK(bin_map_size == l.trees * (n_cuts + l.inputs), "forest_leaf_masks: bin_map must be [T * (W + P)] = [",
              l.trees * (n_cuts + l.inputs), "] (one row of T tree bins per group bin), got ", bin_map_size);
  const int64_t segments = l.trees * l.inputs;
  TORCH_CHECK(mask_start_cpu.size(0) == segments + 1, "forest_leaf_masks: mask_start must be [T * P + 1] = [",
              segments + 1, "], got shape ", mask_start_cpu.sizes());
  const int64_t* ms = mask_start_cpu.const_data_ptr<int64_t>();
  TORCH_CHECK(ms[0] == 0 && ms[segments] == n_mask_rows, "forest_leaf_masks: mask_start must run from 0 to the ",
              n_mask_rows, " rows of masks, got ", ms[0], " .. ", ms[segments]);
  for (int64_t s = 0; s < segments; ++s) {
    TORCH_CHECK(ms[s + 1] > ms[s], "forest_leaf_masks: mask_start must increase (at least one bin per tree and ",
                "input), got ", ms[s], " then ", ms[s + 1], " at ", s);
  }
  const int64_t* ls = leaf_start_cpu.const_data_ptr<int64_t>();
  TORCH_CHECK(ls[0] == 0 && ls[tree_slots] == n_leaves, "forest_leaf_masks: leaf_start must run from 0 to the ",
              n_leaves, " rows of value, got ", ls[0], " .. ", ls[tree_slots]);
  for (int64_t i = 0; i < tree_slots; ++i) {
    const int64_t c = ls[i + 1] - ls[i];
    TORCH_CHECK(c >= 1 && c <= kLeafBitsPerWord * words, "forest_leaf_masks: tree ", i % l.trees, " of group ",
                i / l.trees, " has ", c, " leaves; each tree needs 1 .. 63 * words = ", kLeafBitsPerWord * words);
  }
  return l;
}

// Word w of the bits of a tree's `leaves` leaves (the AND starts from it: a tree that cuts none
// of its group's inputs has one leaf, selected by no mask).
C10_HOST_DEVICE inline uint64_t leaf_bits(int64_t leaves, int64_t w) {
  const int64_t rest = leaves - kLeafBitsPerWord * w;
  if (rest <= 0) return 0;
  return rest >= kLeafBitsPerWord ? (~uint64_t(0) >> 1) : ((uint64_t(1) << rest) - 1);
}

// #{i < n : a[i] < v} for ascending a (the group bin of v); v finite.
C10_HOST_DEVICE inline int64_t count_below(const float* a, int64_t n, float v) {
  int64_t lo = 0;
  while (n > 0) {
    const int64_t half = n / 2;
    if (a[lo + half] < v) {
      lo += half + 1;
      n -= half + 1;
    } else {
      n = half;
    }
  }
  return lo;
}

inline void raise_forest_leaf_masks_error(int code) {
  TORCH_CHECK(!(code & kBadGroup), "forest_leaf_masks: groups holds a value outside [0, G)");
  TORCH_CHECK(!(code & kBadInput), "forest_leaf_masks: x holds a non-finite value in a column a forest reads");
  TORCH_CHECK(!(code & kBadTreeBin), "forest_leaf_masks: bin_map holds a tree bin past the tree's bins");
  TORCH_CHECK(!(code & kBadLeaf),
              "forest_leaf_masks: the masks do not select exactly one leaf of a tree (corrupt tables)");
}

}  // namespace robustops
