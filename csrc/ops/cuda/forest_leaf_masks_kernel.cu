// CUDA kernel of forest_leaf_masks, on the current stream, in two launches: one thread per
// (sample, tree) ANDs that tree's masks over the inputs and writes the value row of its leaf;
// then one thread per (sample, column) adds the rows in tree order from zero (scikit-learn's
// order, so the result is the CPU kernel's bit for bit). Corrupt tables set an error flag (and
// read row 0 instead), which the host turns into an error after the second launch.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../forest_leaf_masks_checks.h"

namespace robustops {
namespace {

constexpr int kThreads = 256;

template <typename map_t>
__global__ void leaf_rows_kernel(const int64_t* __restrict__ bins, const map_t* __restrict__ bin_map,
                                 const int64_t* __restrict__ masks, const int64_t* __restrict__ mask_start,
                                 const int64_t* __restrict__ leaf_start, int64_t* __restrict__ rows,
                                 int* __restrict__ error, int64_t k, int64_t n, int64_t w_bins, int64_t t_trees,
                                 int64_t words) {
  const int64_t total = n * t_trees;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = i / t_trees, t = i % t_trees;  // neighbouring threads: neighbouring trees
    int code = 0;
    int64_t leaf = -1, bits = 0;
    for (int64_t w = 0; w < words && !code; ++w) {
      uint64_t v = ~uint64_t(0);
      for (int64_t f = 0; f < k; ++f) {
        const int64_t b = bins[f * n + s];
        if (b < 0 || b >= w_bins) {
          code |= kBadBin;
          break;
        }
        const int64_t tb = static_cast<int64_t>(bin_map[(f * w_bins + b) * t_trees + t]);
        const int64_t first = mask_start[t * k + f];
        if (tb < 0 || tb >= mask_start[t * k + f + 1] - first) {
          code |= kBadTreeBin;
          break;
        }
        v &= static_cast<uint64_t>(masks[(first + tb) * words + w]);
      }
      if (!code && v) {
        bits += __popcll(v) + static_cast<int64_t>(v >> 63);
        leaf = kLeafBitsPerWord * w + (__ffsll(static_cast<long long>(v)) - 1);
      }
    }
    const int64_t first = leaf_start[t];
    if (!code && (bits != 1 || leaf >= leaf_start[t + 1] - first)) code |= kBadLeaf;
    if (code) atomicOr(error, code);
    rows[i] = code ? 0 : first + leaf;
  }
}

__global__ void tree_sum_kernel(const int64_t* __restrict__ rows, const double* __restrict__ value,
                                double* __restrict__ out, int64_t n, int64_t t_trees, int64_t c_cols) {
  const int64_t total = n * c_cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = i / c_cols, c = i % c_cols;
    double acc = 0.0;
    for (int64_t t = 0; t < t_trees; ++t) acc += value[rows[s * t_trees + t] * c_cols + c];
    out[i] = acc / static_cast<double>(t_trees);
  }
}

unsigned int grid_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535));
}

at::Tensor forest_leaf_masks_cuda(const at::Tensor& bins, const at::Tensor& bin_map, const at::Tensor& masks,
                                  const at::Tensor& mask_start, const at::Tensor& leaf_start, const at::Tensor& value) {
  TORCH_CHECK(bins.is_cuda(), "forest_leaf_masks (CUDA kernel): bins must be a CUDA tensor, got ", bins.device());
  check_forest_leaf_masks_args(bins, bin_map, masks, mask_start, leaf_start, value);
  c10::cuda::CUDAGuard guard(bins.device());
  const at::Tensor bc = bins.contiguous(), mc = bin_map.contiguous(), kc = masks.contiguous();
  const at::Tensor sc = mask_start.contiguous(), lc = leaf_start.contiguous(), vc = value.contiguous();
  check_offsets(sc.cpu(), kc.size(0), lc.cpu(), vc.size(0), kc.size(1));
  const int64_t k = bc.size(0), n = bc.size(1), w = mc.size(1), t = mc.size(2), c = vc.size(1);
  at::Tensor out = at::empty({n, c}, vc.options());
  if (out.numel() == 0) return out;
  at::Tensor rows = at::empty({n, t}, bc.options());
  at::Tensor error = at::zeros({1}, bc.options().dtype(at::kInt));
  auto stream = at::cuda::getCurrentCUDAStream();
  if (mc.scalar_type() == at::kByte) {
    leaf_rows_kernel<uint8_t><<<grid_for(n * t), kThreads, 0, stream>>>(
        bc.const_data_ptr<int64_t>(), mc.const_data_ptr<uint8_t>(), kc.const_data_ptr<int64_t>(),
        sc.const_data_ptr<int64_t>(), lc.const_data_ptr<int64_t>(), rows.mutable_data_ptr<int64_t>(),
        error.mutable_data_ptr<int>(), k, n, w, t, kc.size(1));
  } else {
    leaf_rows_kernel<int16_t><<<grid_for(n * t), kThreads, 0, stream>>>(
        bc.const_data_ptr<int64_t>(), mc.const_data_ptr<int16_t>(), kc.const_data_ptr<int64_t>(),
        sc.const_data_ptr<int64_t>(), lc.const_data_ptr<int64_t>(), rows.mutable_data_ptr<int64_t>(),
        error.mutable_data_ptr<int>(), k, n, w, t, kc.size(1));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  tree_sum_kernel<<<grid_for(n * c), kThreads, 0, stream>>>(rows.const_data_ptr<int64_t>(), vc.const_data_ptr<double>(),
                                                            out.mutable_data_ptr<double>(), n, t, c);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  raise_forest_leaf_masks_error(error.item<int>());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(robustops, CUDA, m) {
  m.impl("forest_leaf_masks", &forest_leaf_masks_cuda);
}

}  // namespace robustops
