// CUDA kernel of fgsm_step: one thread per element of x, loops over the K step sizes so x and
// grad are read from global memory exactly once. Arithmetic in the op-math type (float for
// half/bfloat16) on step sizes pre-rounded to the tensor dtype, matching the eager reference.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../fgsm_step_checks.h"

namespace robustops {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void fgsm_step_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                 const acc_t* __restrict__ eps, int64_t K, acc_t lo, acc_t hi,
                                 scalar_t* __restrict__ out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const acc_t xv = static_cast<acc_t>(x[i]);
    const acc_t gv = static_cast<acc_t>(g[i]);
    const acc_t s = static_cast<acc_t>(gv > acc_t(0)) - static_cast<acc_t>(gv < acc_t(0));
    for (int64_t k = 0; k < K; ++k) {
      acc_t v = xv + eps[k] * s;
      v = v < lo ? lo : (v > hi ? hi : v);  // NaN falls through both tests and stays NaN
      out[k * n + i] = static_cast<scalar_t>(v);
    }
  }
}

at::Tensor fgsm_step_cuda(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& eps,
                          double lo, double hi) {
  TORCH_CHECK(x.is_cuda(), "fgsm_step (CUDA kernel): x must be a CUDA tensor, got ", x.device());
  const std::vector<double> eps_values = check_fgsm_step_args(x, grad, eps, lo, hi);
  const int64_t K = static_cast<int64_t>(eps_values.size());
  c10::cuda::CUDAGuard guard(x.device());

  const at::Tensor xc = x.contiguous();
  const at::Tensor gc = grad.contiguous();
  std::vector<int64_t> out_shape{K};
  out_shape.insert(out_shape.end(), x.sizes().begin(), x.sizes().end());
  at::Tensor out = at::empty(out_shape, xc.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = xc.numel();
  if (n == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fgsm_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Round each eps to the tensor dtype (as `x + eps * sign(g)` does), then widen to acc_t.
    at::Tensor eps_dev = at::tensor(eps_values, at::TensorOptions().dtype(at::kDouble))
                             .to(x.scalar_type())
                             .to(c10::CppTypeToScalarType<acc_t>::value)
                             .to(x.device());
    const int threads = 256;
    const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
    const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, max_blocks));
    fgsm_step_kernel<scalar_t, acc_t><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        xc.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(), eps_dev.const_data_ptr<acc_t>(), K,
        static_cast<acc_t>(lo), static_cast<acc_t>(hi), out.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(robustops, CUDA, m) {
  m.impl("fgsm_step", &fgsm_step_cuda);
}

}  // namespace robustops
