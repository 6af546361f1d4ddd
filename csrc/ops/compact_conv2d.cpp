// Schema of compact_conv2d (Ranjan et al. 2017, eq. 6 / Fig. 4) and of its backward.
//
//   y = alpha * conv2d(x, w) / (sqrt(boxsum_k(sum_{c in group} x_c^2)) + delta) + b
//
// Every k x k x (C/groups) input patch a kernel sees is L2-normalised (plus delta) and scaled by
// alpha before the kernel is applied; the norm uses the same stride, padding and dilation as the
// convolution. With groups > 1 the norm is taken per group (over the channels that group's kernels
// read), so it is broadcast over the group's Cout/groups output channels.
//
// Autograd is registered from Python (robustops/_ops.py) with torch.library.register_autograd; it
// saves (x, weight, bias, alpha, out) and calls _compact_conv2d_backward, which returns
// (grad_x, grad_weight, grad_bias, grad_alpha). Entries whose output_mask is false come back as
// empty tensors of shape [0]. The backward op itself is not differentiable (no double backward).
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "autocast_policy.h"

TORCH_LIBRARY_FRAGMENT(robustops, m) {
  m.def(
      "compact_conv2d(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, Tensor alpha, float delta) -> Tensor");
  m.def(
      "_compact_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor out, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, Tensor alpha, float delta, bool[4] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(robustops, Autograd, m) {
  m.impl("_compact_conv2d_backward", torch::autograd::autogradNotImplementedFallback());
}

// torch.autocast: run in float32 (float64 if an input is float64); see autocast_policy.h.
namespace robustops {
namespace {

template <c10::DispatchKey kKey, c10::DeviceType kDevice>
at::Tensor compact_conv2d_autocast(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                   const at::Tensor& alpha, double delta) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("robustops::compact_conv2d", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                                         const at::Tensor&, double)>();
  const at::ScalarType t = autocast_compute_type(at::kFloat, {&x, &weight, opt_ptr(bias)});
  return op.call(autocast_cast(x, t, kDevice), autocast_cast(weight, t, kDevice), autocast_cast(bias, t, kDevice),
                 stride, padding, dilation, groups, alpha, delta);
}

// The backward runs when backward() is called inside the autocast region too: without this
// kernel the ATen calls inside it (convolution_backward, dot) would be autocast to half while the
// saved tensors are float32.
template <c10::DispatchKey kKey, c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> compact_conv2d_backward_autocast(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& out, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const at::Tensor& alpha, double delta, std::array<bool, 4> mask) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("robustops::_compact_conv2d_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                           const at::Tensor&, double, std::array<bool, 4>)>();
  const at::ScalarType t = autocast_compute_type(at::kFloat, {&grad_out, &x, &weight, opt_ptr(bias), &out});
  return op.call(autocast_cast(grad_out, t, kDevice), autocast_cast(x, t, kDevice), autocast_cast(weight, t, kDevice),
                 autocast_cast(bias, t, kDevice), autocast_cast(out, t, kDevice), stride, padding, dilation, groups,
                 alpha, delta, mask);
}

}  // namespace
}  // namespace robustops

TORCH_LIBRARY_IMPL(robustops, AutocastCPU, m) {
  m.impl("compact_conv2d",
         &robustops::compact_conv2d_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
  m.impl("_compact_conv2d_backward",
         &robustops::compact_conv2d_backward_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(robustops, AutocastCUDA, m) {
  m.impl("compact_conv2d",
         &robustops::compact_conv2d_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
  m.impl("_compact_conv2d_backward",
         &robustops::compact_conv2d_backward_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
}
