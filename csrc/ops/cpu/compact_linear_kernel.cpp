// CPU registration of compact_linear (ATen composition in ../compact_linear_impl.h).
#include <torch/library.h>

#include "../compact_linear_impl.h"

namespace robustops {
namespace {

// float16 / bfloat16 are refused on the CPU (as documented): under torch.autocast the op runs in
// float32 (csrc/ops/compact_linear.cpp), so only a direct call with half inputs lands here.
void check_cpu_float(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              " (CPU kernel): x must be float32 or float64, got ", x.scalar_type(),
              " (float16/bfloat16 run on CUDA; under torch.autocast the op computes in float32)");
}

at::Tensor compact_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              const at::Tensor& alpha, double delta) {
  TORCH_CHECK(x.device().is_cpu(), "compact_linear (CPU kernel): x must be a CPU tensor, got ", x.device());
  check_cpu_float(x, "compact_linear");
  return compact_linear_forward_impl(x, weight, bias, alpha, delta);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> compact_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& alpha, double delta, std::array<bool, 4> mask) {
  TORCH_CHECK(x.device().is_cpu(), "_compact_linear_backward (CPU kernel): x must be a CPU tensor, got ", x.device());
  check_cpu_float(x, "_compact_linear_backward");
  return compact_linear_backward_impl(grad_out, x, weight, bias, alpha, delta, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(robustops, CPU, m) {
  m.impl("compact_linear", &compact_linear_cpu);
  m.impl("_compact_linear_backward", &compact_linear_backward_cpu);
}

}  // namespace robustops
