// CPU kernel of forest_leaf_masks. One task per block of samples (at least kMinBlock, about one
// block per thread); a task walks the trees in chunks of kTreeChunk, in order, and for each of
// its samples (kLanes at a time) and each tree of the chunk forms the AND of the tree's masks
// over the inputs in registers, decodes the leaf and adds its value to the sample's sum. The
// trees are thus added in order from zero (scikit-learn's order: the result is its
// predict_proba bit for bit). One tree's masks are contiguous and a chunk's (tens of KB) stay in
// cache for all the task's samples; the next chunk's tables are prefetched while this one is
// computed, since predict runs right after a model forward has flushed the caches. Each sample
// reads one kTreeChunk-entry segment of its bin map row per input and chunk.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/llvmMathExtras.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../forest_leaf_masks_checks.h"

namespace robustops {
namespace {

constexpr int64_t kTreeChunk = 64;
constexpr int64_t kMinBlock = 8;
constexpr int64_t kLine = 64;  // bytes per cache line

#if defined(__GNUC__) || defined(__clang__)
inline void prefetch(const void* p) { __builtin_prefetch(p); }
#else
inline void prefetch(const void*) {}
#endif

// Prefetch share i of n of the bytes [begin, end): spread over a chunk's samples, the next
// chunk's masks and leaf values arrive while this chunk is computed (right after a model
// forward nothing of the tables is in cache, and their rows are too scattered for the
// hardware prefetcher).
inline void prefetch_share(const char* begin, const char* end, int64_t i, int64_t n) {
  const int64_t lines = (end - begin + kLine - 1) / kLine;
  for (int64_t l = i * lines / n; l < (i + 1) * lines / n; ++l) prefetch(begin + l * kLine);
}

// The row of value holding the leaf that the AND `a` (words int64) selects in tree t, or a
// named error when it does not select exactly one of the tree's leaves.
inline int64_t leaf_row(const uint64_t* a, int64_t words, const int64_t* leaf_start, int64_t t, int64_t sample) {
  int64_t leaf = -1, hits = 0;
  for (int64_t w = 0; w < words; ++w) {
    const uint64_t v = a[w];
    if (v) {  // one bit, never bit 63: counted as one hit, anything else as two
      hits += ((v & (v - 1)) || (v >> 63)) ? 2 : 1;
      leaf = kLeafBitsPerWord * w + static_cast<int64_t>(c10::llvm::countTrailingZeros(v));
    }
  }
  const int64_t first = leaf_start[t];
  TORCH_CHECK(hits == 1 && leaf < leaf_start[t + 1] - first,
              "forest_leaf_masks: the masks do not select exactly one leaf of tree ", t, " for sample ", sample,
              " (corrupt tables)");
  return first + leaf;
}

// kWords > 0: the word count known at compile time (1 or 2, the common cases), and kLanes
// samples go through each tree together (independent AND chains that share the tree's offsets
// and overlap their memory reads); kWords = 0: runtime `words`, one sample at a time.
template <typename map_t, int kWords, int kLanes>
void leaf_masks_cpu(const int64_t* bins, const map_t* bin_map, const int64_t* masks, const int64_t* mask_start,
                    const int64_t* leaf_start, const double* value, double* out, int64_t k, int64_t n, int64_t w_bins,
                    int64_t t_trees, int64_t words_rt, int64_t c_cols) {
  static_assert(kWords > 0 || kLanes == 1, "runtime word counts go one sample at a time");
  constexpr int kAccWords = kWords > 0 ? kWords : 1;
  const int64_t words = kWords > 0 ? kWords : words_rt;
  for (int64_t i = 0; i < k * n; ++i) {
    TORCH_CHECK(bins[i] >= 0 && bins[i] < w_bins, "forest_leaf_masks: bins[", i / n, ", ", i % n, "] = ", bins[i],
                " lies outside [0, W) = [0, ", w_bins, ")");
  }
  std::fill(out, out + n * c_cols, 0.0);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(kMinBlock, (n + threads - 1) / threads);
  at::parallel_for(0, n, grain, [&](int64_t s0, int64_t s1) {
    std::vector<const map_t*> map_rows(k * kLanes);  // per input and lane: the sample's bin map row at the chunk
    std::vector<uint64_t> acc_dynamic(kWords > 0 ? 0 : words);
    uint64_t acc[kLanes][kAccWords];
    for (int64_t t0 = 0; t0 < t_trees; t0 += kTreeChunk) {
      const int64_t tn = std::min(kTreeChunk, t_trees - t0);
      const int64_t t2 = std::min(t0 + tn + kTreeChunk, t_trees);  // the next chunk: trees t0 + tn .. t2 - 1
      const char* next_masks = reinterpret_cast<const char*>(masks + mask_start[(t0 + tn) * k] * words);
      const char* next_masks_end = reinterpret_cast<const char*>(masks + mask_start[t2 * k] * words);
      const char* next_values = reinterpret_cast<const char*>(value + leaf_start[t0 + tn] * c_cols);
      const char* next_values_end = reinterpret_cast<const char*>(value + leaf_start[t2] * c_cols);
      bool bad = false;
      for (int64_t s = s0; s < s1; s += kLanes) {
        const int64_t ns = std::min<int64_t>(kLanes, s1 - s);  // lanes past the block repeat its last sample
        for (int64_t f = 0; f < k; ++f) {
          for (int j = 0; j < kLanes; ++j) {
            const int64_t sj = s + std::min<int64_t>(j, ns - 1);
            map_rows[f * kLanes + j] = bin_map + (f * w_bins + bins[f * n + sj]) * t_trees + t0;
            if (j < ns && t0 + tn < t_trees) prefetch(map_rows[f * kLanes + j] + tn);
          }
        }
        for (int64_t j = 0; j < ns; ++j) {
          prefetch_share(next_masks, next_masks_end, s - s0 + j, s1 - s0);
          prefetch_share(next_values, next_values_end, s - s0 + j, s1 - s0);
        }
        for (int64_t t = 0; t < tn; ++t) {
          const int64_t* ms = mask_start + (t0 + t) * k;
          uint64_t* a0 = kWords > 0 ? acc[0] : acc_dynamic.data();
          for (int j = 0; j < kLanes; ++j) {
            uint64_t* a = kWords > 0 ? acc[j] : a0;
            for (int64_t w = 0; w < words; ++w) a[w] = ~uint64_t(0);
          }
          for (int64_t f = 0; f < k; ++f) {
            const int64_t lo = ms[f];
            const uint64_t count = static_cast<uint64_t>(ms[f + 1] - lo);
            for (int j = 0; j < kLanes; ++j) {
              // branch-free bounds check: a tree bin past the tree's bins is noted and read as bin 0
              const uint64_t tb = static_cast<uint64_t>(static_cast<int64_t>(map_rows[f * kLanes + j][t]));
              const bool ok = tb < count;
              bad |= !ok;
              const int64_t* m = masks + (lo + (ok ? static_cast<int64_t>(tb) : 0)) * words;
              uint64_t* a = kWords > 0 ? acc[j] : a0;
              for (int64_t w = 0; w < words; ++w) a[w] &= static_cast<uint64_t>(m[w]);
            }
          }
          for (int64_t j = 0; j < ns; ++j) {
            const int64_t row = leaf_row(kWords > 0 ? acc[j] : a0, words, leaf_start, t0 + t, s + j);
            const double* v = value + row * c_cols;
            double* sum = out + (s + j) * c_cols;
            for (int64_t c = 0; c < c_cols; ++c) sum[c] += v[c];
          }
        }
      }
      TORCH_CHECK(!bad, "forest_leaf_masks: bin_map holds a tree bin past the tree's bins (trees ", t0, " .. ",
                  t0 + tn - 1, ")");
    }
    for (int64_t i = s0 * c_cols; i < s1 * c_cols; ++i) out[i] /= static_cast<double>(t_trees);
  });
}

template <typename map_t>
void dispatch_words(const at::Tensor& bins, const at::Tensor& bin_map, const at::Tensor& masks,
                    const at::Tensor& mask_start, const at::Tensor& leaf_start, const at::Tensor& value, at::Tensor& out) {
  const int64_t k = bins.size(0), n = bins.size(1), w = bin_map.size(1), t = bin_map.size(2);
  const int64_t words = masks.size(1), c = value.size(1);
  auto run = [&](auto fn) {
    fn(bins.const_data_ptr<int64_t>(), bin_map.const_data_ptr<map_t>(), masks.const_data_ptr<int64_t>(),
       mask_start.const_data_ptr<int64_t>(), leaf_start.const_data_ptr<int64_t>(), value.const_data_ptr<double>(),
       out.mutable_data_ptr<double>(), k, n, w, t, words, c);
  };
  if (words == 1) {
    run(leaf_masks_cpu<map_t, 1, 8>);
  } else if (words == 2) {
    run(leaf_masks_cpu<map_t, 2, 8>);
  } else {
    run(leaf_masks_cpu<map_t, 0, 1>);
  }
}

at::Tensor forest_leaf_masks_cpu(const at::Tensor& bins, const at::Tensor& bin_map, const at::Tensor& masks,
                                 const at::Tensor& mask_start, const at::Tensor& leaf_start, const at::Tensor& value) {
  TORCH_CHECK(bins.device().is_cpu(), "forest_leaf_masks (CPU kernel): bins must be a CPU tensor, got ",
              bins.device());
  check_forest_leaf_masks_args(bins, bin_map, masks, mask_start, leaf_start, value);
  const at::Tensor bc = bins.contiguous(), mc = bin_map.contiguous(), kc = masks.contiguous();
  const at::Tensor sc = mask_start.contiguous(), lc = leaf_start.contiguous(), vc = value.contiguous();
  check_offsets(sc, kc.size(0), lc, vc.size(0), kc.size(1));
  at::Tensor out = at::empty({bins.size(1), value.size(1)}, value.options());
  if (out.numel() == 0) return out;
  if (mc.scalar_type() == at::kByte) {
    dispatch_words<uint8_t>(bc, mc, kc, sc, lc, vc, out);
  } else {
    dispatch_words<int16_t>(bc, mc, kc, sc, lc, vc, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(robustops, CPU, m) {
  m.impl("forest_leaf_masks", &forest_leaf_masks_cpu);
}

}  // namespace robustops
