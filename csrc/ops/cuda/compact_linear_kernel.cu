// CUDA registration of compact_linear (ATen composition in ../compact_linear_impl.h: cuBLAS mm +
// one fused addcmul), run on the current stream under a device guard.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../compact_linear_impl.h"

namespace robustops {
namespace {

at::Tensor compact_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                               const at::Tensor& alpha, double delta) {
  TORCH_CHECK(x.is_cuda(), "compact_linear (CUDA kernel): x must be a CUDA tensor, got ", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  return compact_linear_forward_impl(x, weight, bias, alpha, delta);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> compact_linear_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& alpha, double delta, std::array<bool, 4> mask) {
  TORCH_CHECK(x.is_cuda(), "_compact_linear_backward (CUDA kernel): x must be a CUDA tensor, got ", x.device());
  c10::cuda::CUDAGuard guard(x.device());
  return compact_linear_backward_impl(grad_out, x, weight, bias, alpha, delta, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(robustops, CUDA, m) {
  m.impl("compact_linear", &compact_linear_cuda);
  m.impl("_compact_linear_backward", &compact_linear_backward_cuda);
}

}  // namespace robustops
