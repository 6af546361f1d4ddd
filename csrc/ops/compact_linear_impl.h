// compact_linear forward/backward written with ATen calls only, shared by the CPU and CUDA
// registrations (csrc/ops/cpu/compact_linear_kernel.cpp, csrc/ops/cuda/compact_linear_kernel.cu).
// A fully-connected layer does one GEMM and the row norms are one reduction over x, so there is
// nothing to fuse beyond what ATen already does: mm, then one addcmul pass for scale + bias.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "compact_conv2d_checks.h"

namespace robustops {

inline at::Tensor compact_linear_alpha_as(const at::Tensor& alpha, const at::Tensor& like) {
  return alpha.reshape({}).to(like.device(), like.scalar_type());
}

inline at::Tensor compact_linear_forward_impl(const at::Tensor& x, const at::Tensor& weight,
                                              const c10::optional<at::Tensor>& bias, const at::Tensor& alpha,
                                              double delta) {
  check_compact_linear_args(x, weight, bias, alpha, delta);
  const int64_t in = weight.size(1);
  const int64_t out_features = weight.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;

  const at::Tensor x2 = x.reshape({-1, in});
  const at::Tensor a = compact_linear_alpha_as(alpha, x);
  // scale[m] = alpha / (||x_m|| + delta), shape [M, 1]
  const at::Tensor scale = a / (at::linalg_vector_norm(x2, 2, at::IntArrayRef{1}, /*keepdim=*/true) + delta);
  at::Tensor u = at::mm(x2, weight.t());
  at::Tensor y;
  if (bias.has_value() && bias->defined()) {
    y = at::addcmul(*bias, u, scale);
  } else {
    y = u.mul_(scale);
  }
  return y.reshape(out_shape);
}

// Gradients of y = alpha * (x W^T) * inv + b with inv = 1 / (r + delta), r = ||x||:
//   gv = gy * inv;  grad_W = alpha * gv^T x;  grad_alpha = <gv, x W^T> = <gv^T x, W>
//   gn = -sum_o gy * (y - b) * inv            (dL/dr, using y - b = alpha * u * inv)
//   grad_x = alpha * gv W + gn * x / r       (0 where r == 0)
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> compact_linear_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& out, const at::Tensor& alpha, double delta, std::array<bool, 4> mask) {
  check_compact_linear_args(x, weight, bias, alpha, delta);
  TORCH_CHECK(grad_out.sizes() == out.sizes(), "_compact_linear_backward: grad_out and out must have the same shape, got ",
              grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(out.dim() == x.dim() && out.size(-1) == weight.size(0),
              "_compact_linear_backward: out must have shape [..., ", weight.size(0), "], got ", out.sizes());
  const bool has_bias = bias.has_value() && bias->defined();
  const int64_t in = weight.size(1);
  const int64_t out_features = weight.size(0);
  const at::Tensor x2 = x.reshape({-1, in});
  const at::Tensor gy = grad_out.reshape({-1, out_features});
  const at::Tensor a = compact_linear_alpha_as(alpha, x);
  const at::Tensor r = at::linalg_vector_norm(x2, 2, at::IntArrayRef{1}, /*keepdim=*/true);
  const at::Tensor inv = at::reciprocal(r + delta);
  const at::Tensor empty = at::empty({0}, x.options());

  at::Tensor gx = empty, gw = empty, gb = empty, ga = empty;
  const bool need_x = mask[0], need_w = mask[1], need_b = mask[2] && has_bias, need_a = mask[3];
  if (need_x || need_w || need_a) {
    const at::Tensor gv = gy * inv;
    at::Tensor gw1;
    if (need_w || need_a) {
      gw1 = at::mm(gv.t(), x2);
      if (need_a) ga = at::dot(gw1.reshape(-1), weight.reshape(-1)).reshape(alpha.sizes()).to(alpha.options());
      if (need_w) gw = gw1.mul_(a);
    }
    if (need_x) {
      at::Tensor ym = out.reshape({-1, out_features});
      if (has_bias) ym = ym - *bias;
      const at::Tensor gn = -(gy * ym).sum(1, /*keepdim=*/true) * inv;
      const at::Tensor coef = at::where(r > 0, gn / r, at::zeros_like(r));
      gx = at::addcmul(at::mm(gv, weight).mul_(a), x2, coef).reshape(x.sizes());
    }
  }
  if (need_b) gb = gy.sum(0);
  return std::make_tuple(gx, gw, gb, ga);
}

}  // namespace robustops
