// CUDA kernel of fab_projection, on the current stream: one block per row. Instead of a per-row
// sort, the block bisects on a over [0, max q] (64 halvings, each one block reduction of
// h(a) = sum_j u_j min(a, q_j)) and then solves the linear piece left of the bracket exactly, so
// the answer matches the CPU kernel's sort-and-scan up to rounding. Sums in double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <math_constants.h>
#include <torch/library.h>

#include "../fab_projection_checks.h"

namespace robustops {
namespace {

constexpr int kThreads = 256;

__device__ double block_sum(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  const double total = shared[0];
  __syncthreads();
  return total;
}

__device__ double block_max(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] = fmax(shared[threadIdx.x], shared[threadIdx.x + s]);
    __syncthreads();
  }
  const double total = shared[0];
  __syncthreads();
  return total;
}

__device__ __forceinline__ void weight_break(double t, double w, double lo, double hi, int p, double* u, double* q) {
  const double dist = w > 0 ? t - lo : hi - t;
  const double qd = dist > 0 ? dist : 0.0;
  if (p == 0) {
    *u = fabs(w);
    *q = qd;
  } else {
    *u = w * w;
    *q = qd / fabs(w);
  }
}

__device__ __forceinline__ bool active(double w, int p) { return p == 0 ? (w != 0.0) : (fabs(w) >= 1e-8); }

template <typename scalar_t>
__global__ void fab_projection_kernel(const scalar_t* __restrict__ t, const scalar_t* __restrict__ w,
                                      const scalar_t* __restrict__ b, double lo, double hi, int p,
                                      scalar_t* __restrict__ out, int64_t d) {
  __shared__ double shared[kThreads];
  const int64_t off = static_cast<int64_t>(blockIdx.x) * d;
  double acc = 0.0;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) acc += static_cast<double>(w[off + j]) * t[off + j];
  const double c0 = block_sum(acc, shared) - static_cast<double>(b[blockIdx.x]);
  const double sgn = c0 >= 0 ? 1.0 : -1.0;
  const double c = fabs(c0);
  // h(+inf) = sum u q and the largest breakpoint
  double hq = 0.0, qmax = 0.0;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const double wv = sgn * static_cast<double>(w[off + j]);
    if (!active(wv, p)) continue;
    double u, q;
    weight_break(t[off + j], wv, lo, hi, p, &u, &q);
    hq += u * q;
    qmax = fmax(qmax, q);
  }
  hq = block_sum(hq, shared);
  qmax = block_max(qmax, shared);
  double a;
  if (hq < c) {
    a = CUDART_INF;  // out of reach: every coordinate to its face
  } else {
    double l = 0.0, r = qmax;  // h(l) <= c <= h(r)
    for (int it = 0; it < 64; ++it) {
      const double mid = 0.5 * (l + r);
      double h = 0.0;
      for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
        const double wv = sgn * static_cast<double>(w[off + j]);
        if (!active(wv, p)) continue;
        double u, q;
        weight_break(t[off + j], wv, lo, hi, p, &u, &q);
        h += u * fmin(mid, q);
      }
      h = block_sum(h, shared);
      if (h < c) l = mid; else r = mid;
    }
    // exact solve on the linear piece right of l: coordinates with q <= l are at their face
    double below = 0.0, slope = 0.0;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      const double wv = sgn * static_cast<double>(w[off + j]);
      if (!active(wv, p)) continue;
      double u, q;
      weight_break(t[off + j], wv, lo, hi, p, &u, &q);
      if (q <= l) below += u * q; else slope += u;
    }
    below = block_sum(below, shared);
    slope = block_sum(slope, shared);
    a = slope > 0 ? (c - below) / slope : r;
    if (a < 0) a = 0;
  }
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const double wv = sgn * static_cast<double>(w[off + j]);
    if (!active(wv, p)) {
      out[off + j] = scalar_t(0);
      continue;
    }
    double u, q;
    weight_break(t[off + j], wv, lo, hi, p, &u, &q);
    const double step = fmin(a, q);
    out[off + j] = static_cast<scalar_t>(p == 0 ? (wv > 0 ? -step : step) : -wv * step);
  }
}

at::Tensor fab_projection_cuda(const at::Tensor& points, const at::Tensor& w, const at::Tensor& b, double lo,
                               double hi, c10::string_view norm_sv) {
  const std::string norm(norm_sv);
  TORCH_CHECK(points.is_cuda(), "fab_projection (CUDA kernel): points must be a CUDA tensor, got ", points.device());
  const int p = check_fab_projection_args(points, w, b, lo, hi, norm);
  c10::cuda::CUDAGuard guard(points.device());
  const at::Tensor tc = points.contiguous(), wc = w.contiguous(), bc = b.contiguous();
  at::Tensor out = at::empty(points.sizes(), tc.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  TORCH_CHECK(points.size(0) <= 2147483647LL, "fab_projection: too many rows for one launch");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, points.scalar_type(), "fab_projection_cuda", [&] {
    fab_projection_kernel<scalar_t><<<static_cast<unsigned int>(points.size(0)), kThreads, 0,
                                      at::cuda::getCurrentCUDAStream()>>>(
        tc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(), lo, hi, p,
        out.mutable_data_ptr<scalar_t>(), points.size(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(robustops, CUDA, m) {
  m.impl("fab_projection", &fab_projection_cuda);
}

}  // namespace robustops
