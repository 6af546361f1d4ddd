// CUDA kernel of forest_leaf_masks, on the current stream, in three launches: one thread per
// (sample, input) finds the sample's group bin on that input (binary search among the group's
// cuts; inputs of other groups are skipped), one thread per (sample, tree) ANDs the masks of
// the tree bins that bin_map gives and writes the value row of the leaf, then one thread per
// (sample, column) adds the rows in tree order from zero (scikit-learn's order, so the result is
// the CPU kernel's bit for bit). A bad group, a non-finite input or corrupt tables set an error
// flag (and read row 0 instead), which the host turns into an error after the last launch.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../forest_leaf_masks_checks.h"

namespace robustops {
namespace {

constexpr int kThreads = 256;

// map_base[n, p]: offset of sample n's bin_map row for input p (T * (cut_start[p] + p + bin)).
__global__ void group_bins_kernel(const float* __restrict__ x, const int64_t* __restrict__ groups,
                                  const int64_t* __restrict__ columns, const int64_t* __restrict__ input_start,
                                  const float* __restrict__ cuts, const int64_t* __restrict__ cut_start,
                                  int64_t* __restrict__ map_base, int* __restrict__ error, int64_t n, int64_t x_cols,
                                  int64_t n_groups, int64_t n_inputs, int64_t t_trees) {
  const int64_t total = n * n_inputs;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = i / n_inputs, p = i % n_inputs;
    const int64_t g = groups[s];
    map_base[i] = 0;
    if (g < 0 || g >= n_groups) {
      atomicOr(error, kBadGroup);
      continue;
    }
    if (p < input_start[g] || p >= input_start[g + 1]) continue;  // another group's input
    const float v = x[s * x_cols + columns[p]];
    if (!isfinite(v)) {
      atomicOr(error, kBadInput);
      continue;
    }
    const int64_t c0 = cut_start[p];
    map_base[i] = t_trees * (c0 + p + count_below(cuts + c0, cut_start[p + 1] - c0, v));
  }
}

template <typename map_t>
__global__ void leaf_rows_kernel(const int64_t* __restrict__ groups, const int64_t* __restrict__ input_start,
                                 const map_t* __restrict__ bin_map, const int64_t* __restrict__ map_base,
                                 const int64_t* __restrict__ mask_start, const int64_t* __restrict__ masks,
                                 const int64_t* __restrict__ leaf_start, int64_t* __restrict__ rows,
                                 int* __restrict__ error, int64_t n, int64_t n_groups, int64_t n_inputs,
                                 int64_t t_trees, int64_t words) {
  const int64_t total = n * t_trees;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = i / t_trees, t = i % t_trees;  // neighbouring threads: neighbouring trees
    const int64_t g = groups[s];
    rows[i] = 0;
    if (g < 0 || g >= n_groups) continue;  // reported by group_bins_kernel
    const int64_t p0 = input_start[g], k = input_start[g + 1] - p0;
    const int64_t* ms = mask_start + t_trees * p0 + t * k;
    const int64_t first_leaf = leaf_start[g * t_trees + t], leaves = leaf_start[g * t_trees + t + 1] - first_leaf;
    int code = 0;
    int64_t leaf = -1, bits = 0;
    for (int64_t w = 0; w < words && !code; ++w) {
      uint64_t v = leaf_bits(leaves, w);
      for (int64_t f = 0; f < k; ++f) {
        const int64_t u = static_cast<int64_t>(bin_map[map_base[s * n_inputs + p0 + f] + t]);
        if (u < 0 || u >= ms[f + 1] - ms[f]) {
          code |= kBadTreeBin;
          break;
        }
        v &= static_cast<uint64_t>(masks[(ms[f] + u) * words + w]);
      }
      if (!code && v) {
        bits += __popcll(v);
        leaf = kLeafBitsPerWord * w + (__ffsll(static_cast<long long>(v)) - 1);
      }
    }
    if (!code && (bits != 1 || leaf >= leaves)) code |= kBadLeaf;
    if (code) atomicOr(error, code);
    rows[i] = code ? 0 : first_leaf + leaf;
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

at::Tensor forest_leaf_masks_cuda(const at::Tensor& x, const at::Tensor& groups, const at::Tensor& columns,
                                  const at::Tensor& input_start, const at::Tensor& cuts, const at::Tensor& cut_start,
                                  const at::Tensor& bin_map, const at::Tensor& mask_start, const at::Tensor& masks,
                                  const at::Tensor& leaf_start, const at::Tensor& value) {
  TORCH_CHECK(x.is_cuda(), "forest_leaf_masks (CUDA kernel): x must be a CUDA tensor, got ", x.device());
  check_forest_leaf_masks_args(x, groups, columns, input_start, cuts, cut_start, bin_map, mask_start, masks,
                               leaf_start, value);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), gc = groups.contiguous(), colc = columns.contiguous();
  const at::Tensor isc = input_start.contiguous(), cutc = cuts.contiguous(), csc = cut_start.contiguous();
  const at::Tensor bmc = bin_map.contiguous(), msc = mask_start.contiguous(), mc = masks.contiguous();
  const at::Tensor lc = leaf_start.contiguous(), vc = value.contiguous();
  const ForestLayout layout = check_offsets(colc.cpu(), isc.cpu(), csc.cpu(), msc.cpu(), lc.cpu(), xc.size(1),
                                            cutc.size(0), bmc.size(0), mc.size(0), vc.size(0), mc.size(1));
  const int64_t n = xc.size(0), t = layout.trees, c = vc.size(1), p = layout.inputs;
  at::Tensor out = at::empty({n, c}, vc.options());
  if (out.numel() == 0) return out;
  at::Tensor map_base = at::empty({n, std::max<int64_t>(p, 1)}, gc.options());
  at::Tensor rows = at::empty({n, t}, gc.options());
  at::Tensor error = at::zeros({1}, gc.options().dtype(at::kInt));
  auto stream = at::cuda::getCurrentCUDAStream();
  group_bins_kernel<<<grid_for(n * p), kThreads, 0, stream>>>(
      xc.const_data_ptr<float>(), gc.const_data_ptr<int64_t>(), colc.const_data_ptr<int64_t>(),
      isc.const_data_ptr<int64_t>(), cutc.const_data_ptr<float>(), csc.const_data_ptr<int64_t>(),
      map_base.mutable_data_ptr<int64_t>(), error.mutable_data_ptr<int>(), n, xc.size(1), layout.groups, p, t);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto leaf_rows = [&](auto* map) {
    leaf_rows_kernel<<<grid_for(n * t), kThreads, 0, stream>>>(
        gc.const_data_ptr<int64_t>(), isc.const_data_ptr<int64_t>(), map, map_base.const_data_ptr<int64_t>(),
        msc.const_data_ptr<int64_t>(), mc.const_data_ptr<int64_t>(), lc.const_data_ptr<int64_t>(),
        rows.mutable_data_ptr<int64_t>(), error.mutable_data_ptr<int>(), n, layout.groups, p, t, mc.size(1));
  };
  if (bmc.scalar_type() == at::kByte) {
    leaf_rows(bmc.const_data_ptr<uint8_t>());
  } else {
    leaf_rows(bmc.const_data_ptr<int16_t>());
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
