// torch.autocast behaviour shared by the ops' Autocast kernels (AutocastCPU and AutocastCUDA).
//
// Policy ("float32 at least", like autocast's float32 op list, e.g. layer_norm): the floating
// tensor inputs are cast to float32, or to float64 when one of them is float64, and the op runs and
// returns its result in that dtype. So a model mixing torch layers (which autocast runs in
// bfloat16 / float16) and robustops layers runs under autocast with the robustops parts in full
// precision: the patch norms of compact convolution are not computed in 8-bit mantissas, and the
// CPU kernels (float32/float64 only) are never handed a half tensor. The casts are autograd-aware
// (at::autocast::cached_cast), so gradients flow back to the inputs in their own dtypes.
//
// Each op's schema file (csrc/ops/<op>.cpp) registers
//   TORCH_LIBRARY_IMPL(robustops, AutocastCPU, m)  and  TORCH_LIBRARY_IMPL(robustops, AutocastCUDA, m)
// with a kernel that excludes its autocast key, casts with autocast_cast and calls the op again
// through the dispatcher (same code for both device types; the CUDA one is compiled in every build).
#pragma once

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <initializer_list>
#include <optional>

namespace robustops {

// The dtype the op runs in: promote(floor, every defined floating input's dtype).
inline at::ScalarType autocast_compute_type(at::ScalarType floor,
                                            std::initializer_list<const at::Tensor*> tensors) {
  at::ScalarType t = floor;
  for (const at::Tensor* p : tensors) {
    if (p != nullptr && p->defined() && at::isFloatingType(p->scalar_type())) t = at::promote_types(t, p->scalar_type());
  }
  return t;
}

inline const at::Tensor* opt_ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

inline at::Tensor autocast_cast(const at::Tensor& t, at::ScalarType to, c10::DeviceType device) {
  return at::autocast::cached_cast(to, t, device);
}

inline std::optional<at::Tensor> autocast_cast(const std::optional<at::Tensor>& t, at::ScalarType to,
                                               c10::DeviceType device) {
  if (!t.has_value()) return std::nullopt;
  return at::autocast::cached_cast(to, *t, device);
}

}  // namespace robustops
