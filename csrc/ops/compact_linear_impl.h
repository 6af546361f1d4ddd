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
  // The result is allocated in its final shape and returned as such: a fresh tensor, never a view
  // (a view output would make `ReLU(inplace=True)` after the layer fail in autograd).
  at::Tensor y = at::empty(out_shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor y2 = y.view({-1, out_features});
  at::mm_out(y2, x2, weight.t());
  if (bias.has_value() && bias->defined()) {
    at::addcmul_out(y2, *bias, y2, scale);  // one pass: y = bias + u * scale, in place (full overlap is allowed)
  } else {
    y2.mul_(scale);
  }
  return y;
}

// Gradients of y = alpha * (x W^T) * inv + b with inv = 1 / (r + delta), r = ||x||:
//   gv = gy * inv;  grad_W = alpha * gv^T x;  grad_alpha = <gv, x W^T> = <gv^T x, W>
//   m  = gv W                                  ([M, in])
//   dL/dr = -sum_o gy_o * alpha * u_o * inv^2 = -alpha * inv * <x, m>   (u = x W^T, so gy . u = x . gy W)
//   grad_x = alpha * m + (dL/dr) * x / r       (0 where r == 0)
// The forward output is not needed: the layer's output may be modified in place afterwards
// (e.g. ReLU(inplace=True) after a CompactLinear) without breaking the backward.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> compact_linear_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& alpha, double delta, std::array<bool, 4> mask) {
  check_compact_linear_args(x, weight, bias, alpha, delta);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = weight.size(0);
  TORCH_CHECK(grad_out.sizes() == c10::IntArrayRef(out_shape), "_compact_linear_backward: grad_out must have shape ",
              c10::IntArrayRef(out_shape), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type() && grad_out.device() == x.device(),
              "_compact_linear_backward: grad_out must have x's dtype and device");
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
    if (need_w || need_a) {
      at::Tensor gw1 = at::mm(gv.t(), x2);
      if (need_a) ga = at::dot(gw1.reshape(-1), weight.reshape(-1)).reshape(alpha.sizes()).to(alpha.options());
      if (need_w) gw = gw1.mul_(a);
    }
    if (need_x) {
      const at::Tensor m = at::mm(gv, weight);
      const at::Tensor dr = -(x2 * m).sum(1, /*keepdim=*/true) * inv;  // dL/dr / alpha
      const at::Tensor coef = at::where(r > 0, dr / r, at::zeros_like(r));
      gx = m.add_(x2 * coef).mul_(a).reshape(x.sizes());
    }
  }
  if (need_b) gb = gy.sum(0);
  return std::make_tuple(gx, gw, gb, ga);
}

}  // namespace robustops
