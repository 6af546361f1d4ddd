// Argument checks shared by the CPU and CUDA kernels of fgsm_step.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

namespace robustops {

// Validates (x, grad, eps, lo, hi) and returns eps as host doubles.
inline std::vector<double> check_fgsm_step_args(
    const at::Tensor& x, const at::Tensor& grad, const at::Tensor& eps, double lo, double hi) {
  TORCH_CHECK(x.device() == grad.device(),
              "fgsm_step: x and grad must be on the same device, got ", x.device(), " and ", grad.device());
  TORCH_CHECK(x.scalar_type() == grad.scalar_type(),
              "fgsm_step: x and grad must have the same dtype, got ", x.scalar_type(), " and ", grad.scalar_type());
  TORCH_CHECK(x.sizes() == grad.sizes(),
              "fgsm_step: x and grad must have the same shape, got ", x.sizes(), " and ", grad.sizes());
  TORCH_CHECK(eps.dim() == 1 && eps.numel() >= 1,
              "fgsm_step: eps must be a 1-D tensor with at least one value, got shape ", eps.sizes());
  TORCH_CHECK(at::isFloatingType(eps.scalar_type()),
              "fgsm_step: eps must be a floating-point tensor, got ", eps.scalar_type());
  TORCH_CHECK(eps.device().is_cpu() || eps.device() == x.device(),
              "fgsm_step: eps must be on the CPU or on x's device (", x.device(), "), got ", eps.device());
  TORCH_CHECK(!std::isnan(lo) && !std::isnan(hi), "fgsm_step: lo and hi must not be NaN, got lo=", lo, " hi=", hi);
  TORCH_CHECK(lo <= hi, "fgsm_step: lo must be <= hi, got lo=", lo, " hi=", hi);

  at::Tensor host = eps.to(at::kCPU, at::kDouble).contiguous();
  const double* e = host.const_data_ptr<double>();
  std::vector<double> values(e, e + host.numel());
  for (size_t k = 0; k < values.size(); ++k) {
    TORCH_CHECK(std::isfinite(values[k]) && values[k] >= 0.0,
                "fgsm_step: every eps must be finite and >= 0, got eps[", k, "]=", values[k]);
  }
  return values;
}

}  // namespace robustops
