// CPU kernel of forest_leaf_masks. The samples are sorted by group (counting sort) and cut into
// tasks of up to kBlock samples of one group; threads take tasks from a shared counter, largest
// first. A task finds each sample's group bin on each input (a binary search among the group's
// cuts), which names a row of bin_map: that bin in every tree's own grid, T entries in tree
// order. It then walks the group's trees in chunks of kTreeChunk, in order: for kLanes samples
// at a time and each tree of the chunk it ANDs, per input, the mask of the sample's tree bin in
// registers (kLanes independent chains), decodes the leaf and adds its value to the sample's
// sum. The trees are thus added in order from zero (scikit-learn's order: the result is its
// predict_proba bit for bit). While a chunk is computed the next chunk's part of every bin_map
// row in use, and its masks and leaf values (contiguous: the tables are stored tree by tree),
// are prefetched, since predict runs right after a model forward has flushed the caches.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/llvmMathExtras.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../forest_leaf_masks_checks.h"

// Full unrolling of the loops over the kLanes images keeps their masks in registers.
#if defined(__clang__)
#define ROBUSTOPS_UNROLL_LANES _Pragma("unroll")
#elif defined(__GNUC__)
#define ROBUSTOPS_UNROLL_LANES _Pragma("GCC unroll 8")
#else
#define ROBUSTOPS_UNROLL_LANES
#endif

#if (defined(__SSE2__) || defined(_M_X64)) && (defined(__x86_64__) || defined(_M_X64))
#include <emmintrin.h>
#define ROBUSTOPS_FOREST_SSE2 1
#endif

namespace robustops {
namespace {

constexpr int64_t kTreeChunk = 64;
constexpr int64_t kLanes = 8;
constexpr int64_t kBlock = 64;  // samples per task (a multiple of kLanes)
constexpr int64_t kLine = 64;   // bytes per cache line

#if defined(__GNUC__) || defined(__clang__)
inline void prefetch(const void* p) { __builtin_prefetch(p); }
#else
inline void prefetch(const void*) {}
#endif

// Prefetch share i of n of the bytes [begin, end).
inline void prefetch_share(const void* begin, const void* end, int64_t i, int64_t n) {
  const char* b = static_cast<const char*>(begin);
  const int64_t lines = (static_cast<const char*>(end) - b + kLine - 1) / kLine;
  for (int64_t l = i * lines / n; l < (i + 1) * lines / n; ++l) prefetch(b + l * kLine);
}

template <typename map_t>
struct Tables {
  const float* x;
  const int64_t* columns;
  const int64_t* input_start;
  const float* cuts;
  const int64_t* cut_start;
  const map_t* bin_map;
  const int64_t* mask_start;
  const int64_t* masks;
  const int64_t* leaf_start;
  const double* value;
  int64_t x_cols, trees, words, c_cols;
};

struct Task {
  int64_t group, first, count;  // samples order[first .. first + count - 1]
};

// The AND of kLanes samples' leaf masks for one tree, meant for registers (with the loops over
// the lanes unrolled): one word per lane (trees of at most 63 leaves), two words per lane in one
// SSE2 register (at most 126 leaves), or a runtime count of words.
struct LaneMasks1 {
  explicit LaneMasks1(int64_t) {}
  uint64_t a[kLanes];
  static constexpr int64_t words() { return 1; }
  void init(int64_t leaves) {
    ROBUSTOPS_UNROLL_LANES
    for (int64_t j = 0; j < kLanes; ++j) a[j] = leaf_bits(leaves, 0);
  }
  void and_row(int64_t j, const int64_t* m) { a[j] &= static_cast<uint64_t>(m[0]); }
  uint64_t word(int64_t j, int64_t) const { return a[j]; }
};

#ifdef ROBUSTOPS_FOREST_SSE2
struct LaneMasks2 {
  explicit LaneMasks2(int64_t) {}
  __m128i a[kLanes];
  static constexpr int64_t words() { return 2; }
  void init(int64_t leaves) {
    const __m128i v = _mm_set_epi64x(static_cast<long long>(leaf_bits(leaves, 1)),
                                     static_cast<long long>(leaf_bits(leaves, 0)));
    ROBUSTOPS_UNROLL_LANES
    for (int64_t j = 0; j < kLanes; ++j) a[j] = v;
  }
  void and_row(int64_t j, const int64_t* m) {
    a[j] = _mm_and_si128(a[j], _mm_loadu_si128(reinterpret_cast<const __m128i*>(m)));
  }
  uint64_t word(int64_t j, int64_t w) const {
    return static_cast<uint64_t>(_mm_cvtsi128_si64(w == 0 ? a[j] : _mm_unpackhi_epi64(a[j], a[j])));
  }
};
#else
struct LaneMasks2 {
  explicit LaneMasks2(int64_t) {}
  uint64_t a[kLanes][2];
  static constexpr int64_t words() { return 2; }
  void init(int64_t leaves) {
    ROBUSTOPS_UNROLL_LANES
    for (int64_t j = 0; j < kLanes; ++j) a[j][0] = leaf_bits(leaves, 0), a[j][1] = leaf_bits(leaves, 1);
  }
  void and_row(int64_t j, const int64_t* m) {
    a[j][0] &= static_cast<uint64_t>(m[0]);
    a[j][1] &= static_cast<uint64_t>(m[1]);
  }
  uint64_t word(int64_t j, int64_t w) const { return a[j][w]; }
};
#endif

struct LaneMasksN {
  explicit LaneMasksN(int64_t n) : n_(n), a(kLanes * n) {}
  int64_t words() const { return n_; }
  void init(int64_t leaves) {
    ROBUSTOPS_UNROLL_LANES
    for (int64_t j = 0; j < kLanes; ++j) {
      for (int64_t w = 0; w < n_; ++w) a[j * n_ + w] = leaf_bits(leaves, w);
    }
  }
  void and_row(int64_t j, const int64_t* m) {
    for (int64_t w = 0; w < n_; ++w) a[j * n_ + w] &= static_cast<uint64_t>(m[w]);
  }
  uint64_t word(int64_t j, int64_t w) const { return a[j * n_ + w]; }
  int64_t n_;
  std::vector<uint64_t> a;
};

// One task: the samples `rows` (count of them, all of group g); writes their rows of out. A
// tree bin past its segment's rows sets *bad (and reads bin 0). acc: LaneMasks1 / 2 / N for the
// tables' word count.
template <typename map_t, typename Acc>
void run_task(const Tables<map_t>& tb, int64_t g, const int64_t* rows, int64_t count, double* out, bool* bad) {
  Acc acc(tb.words);  // a local: kept in registers (a reference to the caller's was kept in memory)
  const int64_t p0 = tb.input_start[g], k = tb.input_start[g + 1] - p0;
  const int64_t words = acc.words();
  const int64_t c_cols = tb.c_cols, trees = tb.trees;
  const int64_t padded = (count + kLanes - 1) / kLanes * kLanes;
  // per input and sample (lanes past the task repeat its last sample): its bin_map row
  std::vector<const map_t*> map_row(k * padded);
  for (int64_t f = 0; f < k; ++f) {
    const int64_t p = p0 + f, c0 = tb.cut_start[p], w = tb.cut_start[p + 1] - c0;
    for (int64_t i = 0; i < padded; ++i) {
      const int64_t r = rows[std::min(i, count - 1)];
      const float v = tb.x[r * tb.x_cols + tb.columns[p]];
      TORCH_CHECK(std::isfinite(v), "forest_leaf_masks: x[", r, ", ", tb.columns[p], "] = ", v,
                  " is not finite (a forest input must be)");
      map_row[f * padded + i] = tb.bin_map + trees * (c0 + p + count_below(tb.cuts + c0, w, v));
    }
  }
  const int64_t seg0 = trees * p0;  // segment of (tree 0, first input)
  const int64_t* leaf_first = tb.leaf_start + g * trees;
  {  // the first chunk's rows, masks and leaf values (later chunks are prefetched one ahead)
    const int64_t t1 = std::min(kTreeChunk, trees);
    for (int64_t i = 0; i < k * padded; ++i) {
      const map_t* r = map_row[i];
      prefetch(r);
      prefetch(r + t1 - 1);
    }
    prefetch_share(tb.masks + tb.mask_start[seg0] * words, tb.masks + tb.mask_start[seg0 + t1 * k] * words, 0, 1);
    prefetch_share(tb.value + leaf_first[0] * c_cols, tb.value + leaf_first[t1] * c_cols, 0, 1);
  }
  std::vector<double> sum(padded * c_cols, 0.0);
  const int64_t lane_groups = padded / kLanes;
  bool out_of_range = false;
  for (int64_t t0 = 0; t0 < trees; t0 += kTreeChunk) {
    const int64_t t1 = std::min(t0 + kTreeChunk, trees), t2 = std::min(t1 + kTreeChunk, trees);
    const int64_t s1 = seg0 + t1 * k, s2 = seg0 + t2 * k;  // the next chunk's segments
    for (int64_t lg = 0; lg < lane_groups; ++lg) {
      const int64_t lane0 = lg * kLanes;
      if (t1 < trees) {
        for (int64_t f = 0; f < k; ++f) {
          ROBUSTOPS_UNROLL_LANES
          for (int64_t j = 0; j < kLanes; ++j) {
            const map_t* r = map_row[f * padded + lane0 + j] + t1;
            prefetch(r);
            prefetch(r + (t2 - t1) - 1);
          }
        }
        prefetch_share(tb.masks + tb.mask_start[s1] * words, tb.masks + tb.mask_start[s2] * words, lg, lane_groups);
        prefetch_share(tb.value + leaf_first[t1] * c_cols, tb.value + leaf_first[t2] * c_cols, lg, lane_groups);
      }
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t leaves = leaf_first[t + 1] - leaf_first[t];
        acc.init(leaves);
        const int64_t* ms = tb.mask_start + seg0 + t * k;
        for (int64_t f = 0; f < k; ++f) {
          const int64_t lo = ms[f];
          const uint64_t bins = static_cast<uint64_t>(ms[f + 1] - lo);
          const map_t* const* mr = map_row.data() + f * padded + lane0;
          bool any_bad = false;  // per (tree, input), then one OR (an OR chain through every lane was slower)
          ROBUSTOPS_UNROLL_LANES
          for (int64_t j = 0; j < kLanes; ++j) {
            // branch-free bounds check: a tree bin past the tree's bins is noted and read as bin 0
            const uint64_t u = static_cast<uint64_t>(static_cast<int64_t>(mr[j][t]));
            const bool ok = u < bins;
            any_bad |= !ok;
            acc.and_row(j, tb.masks + (lo + (ok ? static_cast<int64_t>(u) : 0)) * words);
          }
          out_of_range |= any_bad;
        }
        // every lane, the padding ones too (they repeat the task's last image: valid reads,
        // sums never copied out), so that the loop unrolls
        ROBUSTOPS_UNROLL_LANES
        for (int64_t j = 0; j < kLanes; ++j) {
          int64_t leaf = -1, hits = 0;
          for (int64_t w = 0; w < words; ++w) {
            const uint64_t v = acc.word(j, w);
            if (v) {  // one bit: counted as one hit, anything else as two
              hits += (v & (v - 1)) ? 2 : 1;
              leaf = kLeafBitsPerWord * w + static_cast<int64_t>(c10::llvm::countTrailingZeros(v));
            }
          }
          TORCH_CHECK(hits == 1 && leaf < leaves, "forest_leaf_masks: the masks do not select exactly one leaf of tree ",
                      t, " of group ", g, " for sample ", rows[std::min(lane0 + j, count - 1)], " (corrupt tables)");
          if (c_cols == 1) {  // the detector's case (one class column): no inner loop
            sum[lane0 + j] += tb.value[leaf_first[t] + leaf];
          } else {
            const double* v = tb.value + (leaf_first[t] + leaf) * c_cols;
            double* s = sum.data() + (lane0 + j) * c_cols;
            for (int64_t c = 0; c < c_cols; ++c) s[c] += v[c];
          }
        }
      }
    }
  }
  *bad = out_of_range;
  for (int64_t i = 0; i < count; ++i) {
    for (int64_t c = 0; c < c_cols; ++c) out[rows[i] * c_cols + c] = sum[i * c_cols + c] / static_cast<double>(trees);
  }
}

template <typename map_t>
void run_all(const Tables<map_t>& tb, const std::vector<Task>& tasks, const int64_t* order, double* out) {
  const int64_t n_tasks = static_cast<int64_t>(tasks.size());
  std::atomic<int64_t> next_task{0};
  std::atomic<bool> any_bad{false};
  const int64_t workers = std::min<int64_t>(std::max<int64_t>(1, at::get_num_threads()), n_tasks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {  // every worker pulls tasks until none is left
    for (int64_t i = next_task++; i < n_tasks; i = next_task++) {
      const Task& task = tasks[i];
      bool bad = false;
      if (tb.words == 1) {
        run_task<map_t, LaneMasks1>(tb, task.group, order + task.first, task.count, out, &bad);
      } else if (tb.words == 2) {
        run_task<map_t, LaneMasks2>(tb, task.group, order + task.first, task.count, out, &bad);
      } else {
        run_task<map_t, LaneMasksN>(tb, task.group, order + task.first, task.count, out, &bad);
      }
      if (bad) any_bad = true;
    }
  });
  if (any_bad) raise_forest_leaf_masks_error(kBadTreeBin);
}

at::Tensor forest_leaf_masks_cpu(const at::Tensor& x, const at::Tensor& groups, const at::Tensor& columns,
                                 const at::Tensor& input_start, const at::Tensor& cuts, const at::Tensor& cut_start,
                                 const at::Tensor& bin_map, const at::Tensor& mask_start, const at::Tensor& masks,
                                 const at::Tensor& leaf_start, const at::Tensor& value) {
  TORCH_CHECK(x.device().is_cpu(), "forest_leaf_masks (CPU kernel): x must be a CPU tensor, got ", x.device());
  check_forest_leaf_masks_args(x, groups, columns, input_start, cuts, cut_start, bin_map, mask_start, masks,
                               leaf_start, value);
  const at::Tensor xc = x.contiguous(), gc = groups.contiguous(), colc = columns.contiguous();
  const at::Tensor isc = input_start.contiguous(), cutc = cuts.contiguous(), csc = cut_start.contiguous();
  const at::Tensor bmc = bin_map.contiguous(), msc = mask_start.contiguous(), mc = masks.contiguous();
  const at::Tensor lc = leaf_start.contiguous(), vc = value.contiguous();
  const ForestLayout layout = check_offsets(colc, isc, csc, msc, lc, xc.size(1), cutc.size(0), bmc.size(0),
                                            mc.size(0), vc.size(0), mc.size(1));
  const int64_t n = xc.size(0), c_cols = vc.size(1), n_groups = layout.groups;
  at::Tensor out = at::empty({n, c_cols}, vc.options());
  if (n == 0) return out;
  // counting sort of the samples by group
  const int64_t* g = gc.const_data_ptr<int64_t>();
  std::vector<int64_t> start(n_groups + 1, 0), order(n);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(g[i] >= 0 && g[i] < n_groups, "forest_leaf_masks: groups[", i, "] = ", g[i], " lies outside [0, ",
                n_groups, ")");
    ++start[g[i] + 1];
  }
  for (int64_t j = 0; j < n_groups; ++j) start[j + 1] += start[j];
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < n; ++i) order[next[g[i]]++] = i;
  }
  const int64_t* is = isc.const_data_ptr<int64_t>();
  std::vector<Task> tasks;
  for (int64_t j = 0; j < n_groups; ++j) {
    for (int64_t f = start[j]; f < start[j + 1]; f += kBlock) {
      tasks.push_back({j, f, std::min(kBlock, start[j + 1] - f)});
    }
  }
  // largest first (work ~ samples x (inputs + 1)), taken from a shared counter: balanced threads
  std::stable_sort(tasks.begin(), tasks.end(), [&](const Task& a, const Task& b) {
    return a.count * (is[a.group + 1] - is[a.group] + 1) > b.count * (is[b.group + 1] - is[b.group] + 1);
  });
  double* o = out.mutable_data_ptr<double>();
  auto tables = [&](auto* map) {
    using map_t = std::remove_const_t<std::remove_pointer_t<decltype(map)>>;
    return Tables<map_t>{xc.const_data_ptr<float>(), colc.const_data_ptr<int64_t>(), is, cutc.const_data_ptr<float>(),
                         csc.const_data_ptr<int64_t>(), map, msc.const_data_ptr<int64_t>(),
                         mc.const_data_ptr<int64_t>(), lc.const_data_ptr<int64_t>(), vc.const_data_ptr<double>(),
                         xc.size(1), layout.trees, mc.size(1), c_cols};
  };
  if (bmc.scalar_type() == at::kByte) {
    run_all(tables(bmc.const_data_ptr<uint8_t>()), tasks, order.data(), o);
  } else {
    run_all(tables(bmc.const_data_ptr<int16_t>()), tasks, order.data(), o);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(robustops, CPU, m) {
  m.impl("forest_leaf_masks", &forest_leaf_masks_cpu);
}

}  // namespace robustops
