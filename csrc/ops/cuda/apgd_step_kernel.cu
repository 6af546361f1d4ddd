// CUDA kernel of apgd_step, on the current stream. Linf: one thread per element (grid-stride).
// L2: one block per sample, three block reductions (gradient norm, first projection, projection
// after the momentum mix) in float/double accumulators; the output doubles as scratch.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../apgd_step_checks.h"

namespace robustops {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ T clamp2(T v, T lo, T hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

template <typename scalar_t, typename acc_t>
__global__ void apgd_linf_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ xp,
                                 const scalar_t* __restrict__ x0, const scalar_t* __restrict__ g,
                                 const scalar_t* __restrict__ step, acc_t eps, acc_t a, acc_t lo, acc_t hi,
                                 scalar_t* __restrict__ out, int64_t total, int64_t d) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const acc_t xv = x[i], pv = xp[i], cv = x0[i], gv = g[i];
    const acc_t st = step[i / d];
    const acc_t sg = static_cast<acc_t>(gv > acc_t(0)) - static_cast<acc_t>(gv < acc_t(0));
    const acc_t lo_j = cv - eps, hi_j = cv + eps;
    const acc_t z = clamp2(clamp2(xv + st * sg, lo_j, hi_j), lo, hi);
    const acc_t v = xv + (z - xv) * a + (xv - pv) * (acc_t(1) - a);
    out[i] = static_cast<scalar_t>(clamp2(clamp2(v, lo_j, hi_j), lo, hi));
  }
}

template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  const acc_t total = shared[0];
  __syncthreads();
  return total;
}

template <typename scalar_t, typename acc_t>
__global__ void apgd_l2_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ xp,
                               const scalar_t* __restrict__ x0, const scalar_t* __restrict__ g,
                               const scalar_t* __restrict__ step, acc_t eps, acc_t a, acc_t lo, acc_t hi,
                               scalar_t* __restrict__ out, int64_t d) {
  __shared__ acc_t shared[kThreads];
  const int64_t off = static_cast<int64_t>(blockIdx.x) * d;
  const acc_t tiny = static_cast<acc_t>(1e-12);
  acc_t acc = 0;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const acc_t gv = g[off + j];
    acc += gv * gv;
  }
  const acc_t gscale = static_cast<acc_t>(step[blockIdx.x]) / (sqrt(block_sum(acc, shared)) + tiny);
  acc = 0;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const acc_t u = (static_cast<acc_t>(x[off + j]) + static_cast<acc_t>(g[off + j]) * gscale) -
                    static_cast<acc_t>(x0[off + j]);
    acc += u * u;
  }
  acc_t nrm = sqrt(block_sum(acc, shared));
  acc_t f = (nrm < eps ? nrm : eps) / (nrm + tiny);
  acc = 0;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const acc_t xv = x[off + j], cv = x0[off + j];
    const acc_t u = (xv + static_cast<acc_t>(g[off + j]) * gscale) - cv;
    const acc_t z = clamp2(cv + u * f, lo, hi);
    const acc_t v = xv + (z - xv) * a + (xv - static_cast<acc_t>(xp[off + j])) * (acc_t(1) - a);
    const acc_t w = v - cv;
    out[off + j] = static_cast<scalar_t>(w);
    acc += w * w;
  }
  nrm = sqrt(block_sum(acc, shared));
  f = (nrm < eps ? nrm : eps) / (nrm + tiny);
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const acc_t cv = x0[off + j];
    out[off + j] = static_cast<scalar_t>(clamp2(cv + static_cast<acc_t>(out[off + j]) * f, lo, hi));
  }
}

at::Tensor apgd_step_cuda(const at::Tensor& x, const at::Tensor& x_prev, const at::Tensor& x0,
                          const at::Tensor& grad, const at::Tensor& step_size, double eps, double momentum,
                          double lo, double hi, c10::string_view norm_sv) {
  const std::string norm(norm_sv);
  TORCH_CHECK(x.is_cuda(), "apgd_step (CUDA kernel): x must be a CUDA tensor, got ", x.device());
  const int p = check_apgd_step_args(x, x_prev, x0, grad, step_size, eps, momentum, lo, hi, norm);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), pc = x_prev.contiguous(), cc = x0.contiguous(), gc = grad.contiguous();
  const at::Tensor sc = step_size.to(x.scalar_type()).contiguous();
  at::Tensor out = at::empty(x.sizes(), xc.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = x.size(0);
  if (xc.numel() == 0) return out;
  const int64_t d = xc.numel() / n;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "apgd_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (p == 0) {
      const int64_t total = xc.numel();
      const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
      const int blocks = static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, max_blocks));
      apgd_linf_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
          xc.const_data_ptr<scalar_t>(), pc.const_data_ptr<scalar_t>(), cc.const_data_ptr<scalar_t>(),
          gc.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>(), static_cast<acc_t>(eps),
          static_cast<acc_t>(momentum), static_cast<acc_t>(lo), static_cast<acc_t>(hi),
          out.mutable_data_ptr<scalar_t>(), total, d);
    } else {
      TORCH_CHECK(n <= 2147483647LL, "apgd_step: too many samples for one launch");
      apgd_l2_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(n), kThreads, 0, stream>>>(
          xc.const_data_ptr<scalar_t>(), pc.const_data_ptr<scalar_t>(), cc.const_data_ptr<scalar_t>(),
          gc.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>(), static_cast<acc_t>(eps),
          static_cast<acc_t>(momentum), static_cast<acc_t>(lo), static_cast<acc_t>(hi),
          out.mutable_data_ptr<scalar_t>(), d);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(robustops, CUDA, m) {
  m.impl("apgd_step", &apgd_step_cuda);
}

}  // namespace robustops
