// Argument checks and shape arithmetic shared by the CPU and CUDA kernels of compact_conv2d and
// compact_linear (and their backward ops).
//
// Conventions of the op (see csrc/ops/compact_conv2d.cpp):
//   x      [N, C, H, W]                 (N may be 0)
//   weight [Cout, C / groups, kh, kw]
//   bias   [Cout] or None
//   alpha  one-element floating tensor, on the CPU or on x's device
//   delta  finite, >= 0
// The norm of the patch seen by output channel o is taken over the channels of o's group only, so
// the norm map has `groups` channels and is broadcast over each group's Cout / groups outputs.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <vector>

#include "conv_geometry.h"

namespace robustops {

struct CompactConvGeom {
  int64_t N, C, H, W;       // input
  int64_t Cout, kh, kw;     // weight
  int64_t G, Cg, Og;        // groups, input channels per group, output channels per group
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t Ho, Wo;           // output spatial size
};

// Output size along one dimension, overflow-checked (0 when the dilated kernel does not fit).
inline int64_t compact_conv_out_size(int64_t in, int64_t pad, int64_t dil, int64_t k, int64_t stride,
                                     const char* dim) {
  return checked_conv_out_size(in, pad, dil, k, stride, "compact_conv2d", dim);
}

inline void check_int_pair(c10::IntArrayRef v, const char* name, int64_t min_value) {
  check_geometry_pair(v, "compact_conv2d", name, min_value);
}

inline void check_alpha_tensor(const at::Tensor& alpha, const at::Tensor& x, const char* op) {
  TORCH_CHECK(alpha.numel() == 1, op, ": alpha must have exactly one element, got shape ", alpha.sizes());
  TORCH_CHECK(at::isFloatingType(alpha.scalar_type()), op, ": alpha must be a floating-point tensor, got ",
              alpha.scalar_type());
  TORCH_CHECK(alpha.device().is_cpu() || alpha.device() == x.device(), op,
              ": alpha must be on the CPU or on x's device (", x.device(), "), got ", alpha.device());
  if (alpha.device().is_cpu()) {
    const double a = alpha.item<double>();
    TORCH_CHECK(std::isfinite(a), op, ": alpha must be finite, got ", a);
  }
}

inline void check_delta(double delta, const char* op) {
  TORCH_CHECK(std::isfinite(delta) && delta >= 0.0, op, ": delta must be finite and >= 0, got ", delta);
}

// Validates the forward arguments and returns the geometry.
inline CompactConvGeom check_compact_conv2d_args(const at::Tensor& x, const at::Tensor& weight,
                                                 const c10::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                                                 c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                                                 const at::Tensor& alpha, double delta) {
  const char* op = "compact_conv2d";
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-D [Cout, C/groups, kh, kw], got shape ", weight.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight must have x's dtype (", x.scalar_type(),
              "), got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), op, ": weight must be on x's device (", x.device(), "), got ",
              weight.device());
  check_int_pair(stride, "stride", 1);
  check_int_pair(padding, "padding", 0);
  check_int_pair(dilation, "dilation", 1);
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  check_delta(delta, op);
  check_alpha_tensor(alpha, x, op);

  CompactConvGeom g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.Cout = weight.size(0);
  g.kh = weight.size(2);
  g.kw = weight.size(3);
  g.G = groups;
  TORCH_CHECK(g.C % groups == 0, op, ": input channels (", g.C, ") must be divisible by groups (", groups, ")");
  TORCH_CHECK(g.Cout % groups == 0, op, ": output channels (", g.Cout, ") must be divisible by groups (", groups,
              ")");
  g.Cg = g.C / groups;
  g.Og = g.Cout / groups;
  TORCH_CHECK(weight.size(1) == g.Cg, op, ": x has ", g.C, " channels, so with groups=", groups,
              " weight.size(1) must be ", g.Cg, ", got weight of shape ", weight.sizes());
  TORCH_CHECK(g.Cout >= 1 && g.kh >= 1 && g.kw >= 1, op, ": weight must be non-empty, got shape ", weight.sizes());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.Cout, op, ": bias must have shape [", g.Cout, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias must have x's dtype (", x.scalar_type(),
                "), got ", bias->scalar_type());
    TORCH_CHECK(bias->device() == x.device(), op, ": bias must be on x's device (", x.device(), "), got ",
                bias->device());
  }
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.Ho = compact_conv_out_size(g.H, g.ph, g.dh, g.kh, g.sh, "height geometry (padding, dilation)");
  g.Wo = compact_conv_out_size(g.W, g.pw, g.dw, g.kw, g.sw, "width geometry (padding, dilation)");
  TORCH_CHECK(g.Ho >= 1 && g.Wo >= 1, op, ": output size would be ", g.Ho, "x", g.Wo, " for input ", g.H, "x",
              g.W, ", kernel ", g.kh, "x", g.kw, ", padding ", padding, ", dilation ", dilation,
              "; the padded input is smaller than the dilated kernel");
  return g;
}

// Extra checks of the backward op: grad_out and out must have the forward output's shape.
inline CompactConvGeom check_compact_conv2d_backward_args(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& out, c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
    int64_t groups, const at::Tensor& alpha, double delta) {
  CompactConvGeom g = check_compact_conv2d_args(x, weight, bias, stride, padding, dilation, groups, alpha, delta);
  const std::vector<int64_t> expect{g.N, g.Cout, g.Ho, g.Wo};
  TORCH_CHECK(grad_out.sizes() == c10::IntArrayRef(expect), "_compact_conv2d_backward: grad_out must have shape ",
              c10::IntArrayRef(expect), ", got ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == c10::IntArrayRef(expect), "_compact_conv2d_backward: out must have shape ",
              c10::IntArrayRef(expect), ", got ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type(),
              "_compact_conv2d_backward: grad_out and out must have x's dtype");
  TORCH_CHECK(grad_out.device() == x.device() && out.device() == x.device(),
              "_compact_conv2d_backward: grad_out and out must be on x's device");
  return g;
}

// compact_linear: x [..., in], weight [out, in], bias [out] or None.
inline void check_compact_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                      const c10::optional<at::Tensor>& bias, const at::Tensor& alpha, double delta) {
  const char* op = "compact_linear";
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out_features, in_features], got shape ", weight.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight must have x's dtype (", x.scalar_type(),
              "), got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), op, ": weight must be on x's device (", x.device(), "), got ",
              weight.device());
  TORCH_CHECK(x.size(-1) == weight.size(1), op, ": x has ", x.size(-1), " features in its last dimension but weight",
              " expects in_features=", weight.size(1), " (weight shape ", weight.sizes(), ")");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape [", weight.size(0),
                "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(), op,
                ": bias must have x's dtype and device");
  }
  check_delta(delta, op);
  check_alpha_tensor(alpha, x, op);
}

// The part of the backward both kernels share: which gradients are asked for, the bias gradient,
// and the early exits (nothing but the bias gradient wanted, or an empty batch). Gradients not
// asked for are empty [0] tensors. When `done` is false the kernel computes the rest.
struct CompactConvBackwardPlan {
  bool has_bias, need_x, need_w, need_b, need_a, done;
  at::Tensor gx, gw, gb, ga;
};

inline CompactConvBackwardPlan plan_compact_conv2d_backward(
    const at::Tensor& gy, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& alpha, int64_t N, std::array<bool, 4> mask) {
  CompactConvBackwardPlan p;
  p.has_bias = bias.has_value() && bias->defined();
  p.need_x = mask[0];
  p.need_w = mask[1];
  p.need_b = mask[2] && p.has_bias;
  p.need_a = mask[3];
  const at::Tensor empty = at::empty({0}, x.options());
  p.gx = p.gw = p.gb = p.ga = empty;
  if (p.need_b) p.gb = gy.sum(at::IntArrayRef{0, 2, 3});
  p.done = !(p.need_x || p.need_w || p.need_a) || N == 0;
  if (N == 0) {
    if (p.need_x) p.gx = at::zeros_like(x, at::MemoryFormat::Contiguous);
    if (p.need_w) p.gw = at::zeros_like(weight, at::MemoryFormat::Contiguous);
    if (p.need_a) p.ga = at::zeros_like(alpha, at::MemoryFormat::Contiguous);
  }
  return p;
}

}  // namespace robustops
