// Schema of compact_linear, the fully-connected twin of compact_conv2d (Ranjan et al. 2017, Sec. 4):
//
//   y = alpha * x W^T / (||x||_2 + delta) + b        x: [..., in], W: [out, in], b: [out] or None
//
// i.e. each feature vector is L2-normalised and scaled by alpha before the linear map (with
// delta = 0 and a fixed alpha this is the L2-softmax feature layer). The result is a fresh
// tensor (never a view), and the backward does not read it, so it may be modified in place (e.g.
// ReLU(inplace=True)). Autograd is registered from Python; _compact_linear_backward returns (grad_x, grad_weight, grad_bias, grad_alpha) with empty
// [0] tensors where output_mask is false.
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "autocast_policy.h"

TORCH_LIBRARY_FRAGMENT(robustops, m) {
  m.def("compact_linear(Tensor x, Tensor weight, Tensor? bias, Tensor alpha, float delta) -> Tensor");
  m.def(
      "_compact_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor alpha, "
      "float delta, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(robustops, Autograd, m) {
  m.impl("_compact_linear_backward", torch::autograd::autogradNotImplementedFallback());
}

// torch.autocast: run in float32 (float64 if an input is float64); see autocast_policy.h.
namespace robustops {
namespace {

template <c10::DispatchKey kKey, c10::DeviceType kDevice>
at::Tensor compact_linear_autocast(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& alpha, double delta) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("robustops::compact_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         const at::Tensor&, double)>();
  const at::ScalarType t = autocast_compute_type(at::kFloat, {&x, &weight, opt_ptr(bias)});
  return op.call(autocast_cast(x, t, kDevice), autocast_cast(weight, t, kDevice), autocast_cast(bias, t, kDevice),
                 alpha, delta);
}

// The backward runs when backward() is called inside the autocast region too: without this
// kernel the ATen calls inside it (mm, dot) would be autocast to half while the saved tensors are
// float32.
template <c10::DispatchKey kKey, c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> compact_linear_backward_autocast(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& alpha, double delta, std::array<bool, 4> mask) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("robustops::_compact_linear_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const at::Tensor&, double, std::array<bool, 4>)>();
  const at::ScalarType t = autocast_compute_type(at::kFloat, {&grad_out, &x, &weight, opt_ptr(bias)});
  return op.call(autocast_cast(grad_out, t, kDevice), autocast_cast(x, t, kDevice), autocast_cast(weight, t, kDevice),
                 autocast_cast(bias, t, kDevice), alpha, delta, mask);
}

}  // namespace
}  // namespace robustops

TORCH_LIBRARY_IMPL(robustops, AutocastCPU, m) {
  m.impl("compact_linear",
         &robustops::compact_linear_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
  m.impl("_compact_linear_backward",
         &robustops::compact_linear_backward_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(robustops, AutocastCUDA, m) {
  m.impl("compact_linear",
         &robustops::compact_linear_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
  m.impl("_compact_linear_backward",
         &robustops::compact_linear_backward_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
}
