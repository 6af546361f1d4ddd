// CPU kernel of forest_leaf_masks. One task per block of samples (at least kMinBlock, about one
// block per thread); a task walks the trees in chunks of kTreeChunk, in order, and for each of
// its samples and each tree of the chunk forms the AND of the tree's masks over the inputs in
// registers, decodes the leaf and adds its value to the sample's sum. The trees are thus added
// in order from zero (scikit-learn's order: the result is its predict_proba bit for bit). One
// tree's masks are contiguous and a chunk's (tens of KB) stay in cache for all the task's
// samples: predict runs right after a model forward has flushed the caches, so each table is
// best read from memory once. Each sample reads one kTreeChunk-entry segment of its bin map row
// per input and chunk.
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
constexpr int64_t kMinBlock = 32;
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

// kWords > 0: the word count known at compile time (1 or 2: the common cases); 0: runtime `words`.
template <typename map_t, int kWords>
void leaf_masks_cpu(const int64_t* bins, const map_t* bin_map, const int64_t* masks, const int64_t* mask_start,
                    const int64_t* leaf_start, const double* value, double* out, int64_t k, int64_t n, int64_t w_bins,
                    int64_t t_trees, int64_t words_rt, int64_t c_cols) {
  const int64_t words = kWords > 0 ? kWords : words_rt;
  for (int64_t i = 0; i < k * n; ++i) {
    TORCH_CHECK(bins[i] >= 0 && bins[i] < w_bins, "forest_leaf_masks: bins[", i / n, ", ", i % n, "] = ", bins[i],
                " lies outside [0, W) = [0, ", w_bins, ")");
  }
  std::fill(out, out + n * c_cols, 0.0);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(kMinBlock, (n + threads - 1) / threads);
  at::parallel_for(0, n, grain, [&](int64_t s0, int64_t s1) {
    std::vector<const map_t*> map_rows(k);  // per input: the sample's bin map row at the chunk
    uint64_t acc_fixed[kWords > 0 ? kWords : 1];
    std::vector<uint64_t> acc_dynamic(kWords > 0 ? 0 : words);
    uint64_t* acc = kWords > 0 ? acc_fixed : acc_dynamic.data();
    for (int64_t t0 = 0; t0 < t_trees; t0 += kTreeChunk) {
      const int64_t tn = std::min(kTreeChunk, t_trees - t0);
      const int64_t t2 = std::min(t0 + tn + kTreeChunk, t_trees);  // the next chunk: trees t0 + tn .. t2 - 1
      const char* next_masks = reinterpret_cast<const char*>(masks + mask_start[(t0 + tn) * k] * words);
      const char* next_masks_end = reinterpret_cast<const char*>(masks + mask_start[t2 * k] * words);
      const char* next_values = reinterpret_cast<const char*>(value + leaf_start[t0 + tn] * c_cols);
      const char* next_values_end = reinterpret_cast<const char*>(value + leaf_start[t2] * c_cols);
      bool bad = false;
      for (int64_t s = s0; s < s1; ++s) {
        for (int64_t f = 0; f < k; ++f) {
          map_rows[f] = bin_map + (f * w_bins + bins[f * n + s]) * t_trees + t0;
          if (t0 + tn < t_trees) prefetch(map_rows[f] + tn);
        }
        prefetch_share(next_masks, next_masks_end, s - s0, s1 - s0);
        prefetch_share(next_values, next_values_end, s - s0, s1 - s0);
        double* sum = out + s * c_cols;
        for (int64_t t = 0; t < tn; ++t) {
          const int64_t* ms = mask_start + (t0 + t) * k;
          for (int64_t w = 0; w < words; ++w) acc[w] = ~uint64_t(0);
          for (int64_t f = 0; f < k; ++f) {
            // branch-free bounds check: a tree bin past the tree's bins is noted and read as bin 0
            const uint64_t tb = static_cast<uint64_t>(static_cast<int64_t>(map_rows[f][t]));
            const bool ok = tb < static_cast<uint64_t>(ms[f + 1] - ms[f]);
            bad |= !ok;
            const int64_t* m = masks + (ms[f] + (ok ? static_cast<int64_t>(tb) : 0)) * words;
            for (int64_t w = 0; w < words; ++w) acc[w] &= static_cast<uint64_t>(m[w]);
          }
          int64_t leaf = -1, hits = 0;
          for (int64_t w = 0; w < words; ++w) {
            const uint64_t v = acc[w];
            if (v) {  // one bit, never bit 63: counted as one hit, anything else as two
              hits += ((v & (v - 1)) || (v >> 63)) ? 2 : 1;
              leaf = kLeafBitsPerWord * w + static_cast<int64_t>(c10::llvm::countTrailingZeros(v));
            }
          }
          const int64_t first = leaf_start[t0 + t];
          TORCH_CHECK(hits == 1 && leaf < leaf_start[t0 + t + 1] - first,
                      "forest_leaf_masks: the masks do not select exactly one leaf of tree ", t0 + t, " for sample ",
                      s, " (corrupt tables)");
          const double* v = value + (first + leaf) * c_cols;
          for (int64_t c = 0; c < c_cols; ++c) sum[c] += v[c];
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
    run(leaf_masks_cpu<map_t, 1>);
  } else if (words == 2) {
    run(leaf_masks_cpu<map_t, 2>);
  } else {
    run(leaf_masks_cpu<map_t, 0>);
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
