// Schema of fgsm_step: the FGSM update for K step sizes in one pass over x and grad.
//
//   out[k] = clamp(x + eps[k] * sign(grad), lo, hi)       out: [K, *x.shape]
//
// Not differentiable: the Autograd key gets PyTorch's "not implemented" fallback, so backward
// through it raises a clear error instead of silently returning a wrong (zero) gradient.
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "autocast_policy.h"

TORCH_LIBRARY_FRAGMENT(robustops, m) {
  m.def("fgsm_step(Tensor x, Tensor grad, Tensor eps, float lo, float hi) -> Tensor");
}

TORCH_LIBRARY_IMPL(robustops, Autograd, m) {
  m.impl("fgsm_step", torch::autograd::autogradNotImplementedFallback());
}

// torch.autocast: x and grad are brought to their promoted dtype (an elementwise step has no
// precision to gain from float32, so no float32 floor here; the result has x's dtype whenever x and
// grad share one, as outside autocast).
namespace robustops {
namespace {

template <c10::DispatchKey kKey, c10::DeviceType kDevice>
at::Tensor fgsm_step_autocast(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& eps, double lo,
                              double hi) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("robustops::fgsm_step", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double)>();
  if (!at::isFloatingType(x.scalar_type()) || !at::isFloatingType(grad.scalar_type())) {
    return op.call(x, grad, eps, lo, hi);  // let the kernel's checks name the problem
  }
  const at::ScalarType t = at::promote_types(x.scalar_type(), grad.scalar_type());
  return op.call(autocast_cast(x, t, kDevice), autocast_cast(grad, t, kDevice), eps, lo, hi);
}

}  // namespace
}  // namespace robustops

TORCH_LIBRARY_IMPL(robustops, AutocastCPU, m) {
  m.impl("fgsm_step", &robustops::fgsm_step_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(robustops, AutocastCUDA, m) {
  m.impl("fgsm_step", &robustops::fgsm_step_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
}
