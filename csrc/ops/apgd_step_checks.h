// Argument checks shared by the CPU and CUDA kernels of apgd_step.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string>

namespace robustops {

// 0 for "Linf", 2 for "L2"; validates every tensor and scalar argument.
inline int check_apgd_step_args(const at::Tensor& x, const at::Tensor& x_prev, const at::Tensor& x0,
                                const at::Tensor& grad, const at::Tensor& step_size, double eps,
                                double momentum, double lo, double hi, const std::string& norm) {
  TORCH_CHECK(norm == "Linf" || norm == "L2", "apgd_step: norm must be \"Linf\" or \"L2\", got \"", norm, "\"");
  TORCH_CHECK(x.dim() >= 1, "apgd_step: x must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "apgd_step: x must be floating point, got ", x.scalar_type());
  const at::Tensor* others[3] = {&x_prev, &x0, &grad};
  const char* names[3] = {"x_prev", "x0", "grad"};
  for (int i = 0; i < 3; ++i) {
    const at::Tensor& t = *others[i];
    TORCH_CHECK(t.device() == x.device(), "apgd_step: ", names[i], " must be on x's device (", x.device(),
                "), got ", t.device());
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "apgd_step: ", names[i], " must have x's dtype (",
                x.scalar_type(), "), got ", t.scalar_type());
    TORCH_CHECK(t.sizes() == x.sizes(), "apgd_step: ", names[i], " must have x's shape ", x.sizes(), ", got ",
                t.sizes());
  }
  TORCH_CHECK(step_size.dim() == 1 && step_size.size(0) == x.size(0),
              "apgd_step: step_size must be 1-D with one value per sample (", x.size(0), "), got shape ",
              step_size.sizes());
  TORCH_CHECK(at::isFloatingType(step_size.scalar_type()), "apgd_step: step_size must be floating point, got ",
              step_size.scalar_type());
  TORCH_CHECK(step_size.device() == x.device(), "apgd_step: step_size must be on x's device (", x.device(),
              "), got ", step_size.device());
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, "apgd_step: eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(std::isfinite(momentum) && momentum >= 0.0 && momentum <= 1.0,
              "apgd_step: momentum must be in [0, 1], got ", momentum);
  TORCH_CHECK(!std::isnan(lo) && !std::isnan(hi) && lo <= hi, "apgd_step: need lo <= hi, got lo=", lo, " hi=", hi);
  return norm == "Linf" ? 0 : 2;
}

}  // namespace robustops
