// Argument checks and output geometry shared by the CPU and CUDA kernels of kernel_dropout_eval.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "conv_geometry.h"

namespace robustops {

struct KernelDropoutGeometry {
  int64_t N, Cout, Cin, H, W, Ho, Wo, kh, kw;
  int64_t sh, sw, ph, pw, dh, dw;
  bool pool;
  int64_t pkh, pkw, psh, psw;  // pool kernel / stride (1 when no pool)
  int64_t Hp, Wp;               // output spatial size (after the pool, if any)
};

inline KernelDropoutGeometry check_kernel_dropout_eval_args(
    const at::Tensor& base, const at::Tensor& delta, const at::Tensor& weight, const at::Tensor& channels,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& shift,
    at::IntArrayRef pool_kernel, at::IntArrayRef pool_stride) {
  const char* op = "kernel_dropout_eval";
  TORCH_CHECK(base.dim() == 4, op, ": base must be [N, Cout, Ho, Wo], got shape ", base.sizes());
  TORCH_CHECK(delta.dim() == 4, op, ": delta must be [N, Cin, H, W], got shape ", delta.sizes());
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be [Cout, Cin, kh, kw], got shape ", weight.sizes());
  TORCH_CHECK(channels.dim() == 1, op, ": channels must be 1-D, got shape ", channels.sizes());
  TORCH_CHECK(channels.scalar_type() == at::kLong, op, ": channels must be int64, got ", channels.scalar_type());
  TORCH_CHECK(at::isFloatingType(base.scalar_type()), op, ": base must be floating point, got ", base.scalar_type());
  TORCH_CHECK(delta.scalar_type() == base.scalar_type() && weight.scalar_type() == base.scalar_type(), op,
              ": base, delta and weight must share a dtype, got ", base.scalar_type(), ", ", delta.scalar_type(),
              ", ", weight.scalar_type());
  TORCH_CHECK(delta.device() == base.device() && weight.device() == base.device(), op,
              ": base, delta and weight must be on one device, got ", base.device(), ", ", delta.device(), ", ",
              weight.device());
  TORCH_CHECK(channels.device() == base.device() || channels.device().is_cpu(), op,
              ": channels must be on the CPU or on base's device");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2 && pool_kernel.size() == 2 &&
                  pool_stride.size() == 2,
              op, ": stride, padding, dilation, pool_kernel and pool_stride must have 2 values each");
  KernelDropoutGeometry g;
  g.N = base.size(0);
  g.Cout = base.size(1);
  g.Ho = base.size(2);
  g.Wo = base.size(3);
  g.Cin = delta.size(1);
  g.H = delta.size(2);
  g.W = delta.size(3);
  g.kh = weight.size(2);
  g.kw = weight.size(3);
  TORCH_CHECK(delta.size(0) == g.N, op, ": delta has batch ", delta.size(0), " but base has ", g.N);
  TORCH_CHECK(weight.size(0) == g.Cout && weight.size(1) == g.Cin, op, ": weight must be [", g.Cout, ", ", g.Cin,
              ", kh, kw] (groups=1), got ", weight.sizes());
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  check_geometry_pair(stride, op, "stride", 1);
  check_geometry_pair(padding, op, "padding", 0);
  check_geometry_pair(dilation, op, "dilation", 1);
  TORCH_CHECK(g.kh >= 1 && g.kw >= 1, op, ": weight must have a non-empty kernel");
  // Overflow-checked (absurd stride / padding / dilation must fail here, not wrap around).
  const int64_t ho = checked_conv_out_size(g.H, g.ph, g.dh, g.kh, g.sh, op, "height geometry (padding, dilation)");
  const int64_t wo = checked_conv_out_size(g.W, g.pw, g.dw, g.kw, g.sw, op, "width geometry (padding, dilation)");
  TORCH_CHECK(ho == g.Ho && wo == g.Wo, op, ": base spatial size ", g.Ho, "x", g.Wo,
              " does not match the convolution of delta (", ho, "x", wo, ")");
  for (const auto* t : {&scale, &shift}) {
    if (t->has_value()) {
      const at::Tensor& s = t->value();
      TORCH_CHECK(s.dim() == 1 && s.size(0) == g.Cout, op, ": scale and shift must be [Cout=", g.Cout, "], got ",
                  s.sizes());
      TORCH_CHECK(s.scalar_type() == base.scalar_type() && s.device() == base.device(), op,
                  ": scale and shift must have base's dtype and device");
      TORCH_CHECK(at::isfinite(s).all().item<bool>(), op, ": scale and shift must be finite");
    }
  }
  TORCH_CHECK(scale.has_value() == shift.has_value(), op, ": give both scale and shift, or neither");
  TORCH_CHECK(at::isfinite(weight).all().item<bool>(), op, ": weight must be finite");
  TORCH_CHECK(pool_kernel[0] >= 0 && pool_kernel[1] >= 0, op, ": pool_kernel must be >= 0 (0, 0 means no pooling), got ",
              pool_kernel);
  TORCH_CHECK(pool_stride[0] >= 0 && pool_stride[1] >= 0, op, ": pool_stride must be >= 0, got ", pool_stride);
  g.pool = pool_kernel[0] > 0 || pool_kernel[1] > 0;
  if (g.pool) {
    g.pkh = pool_kernel[0];
    g.pkw = pool_kernel[1];
    g.psh = pool_stride[0];
    g.psw = pool_stride[1];
    TORCH_CHECK(g.pkh >= 1 && g.pkw >= 1 && g.psh >= 1 && g.psw >= 1, op,
                ": pool_kernel and pool_stride must be >= 1 when pooling");
    TORCH_CHECK(g.Ho >= g.pkh && g.Wo >= g.pkw, op, ": pool kernel larger than the map");
    g.Hp = (g.Ho - g.pkh) / g.psh + 1;
    g.Wp = (g.Wo - g.pkw) / g.psw + 1;
  } else {
    g.pkh = g.pkw = g.psh = g.psw = 1;
    g.Hp = g.Ho;
    g.Wp = g.Wo;
  }
  return g;
}

}  // namespace robustops
