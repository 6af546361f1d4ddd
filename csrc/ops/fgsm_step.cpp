// Schema of fgsm_step: the FGSM update for K step sizes in one pass over x and grad.
//
//   out[k] = clamp(x + eps[k] * sign(grad), lo, hi)       out: [K, *x.shape]
//
// Not differentiable: the Autograd key gets PyTorch's "not implemented" fallback, so backward
// through it raises a clear error instead of silently returning a wrong (zero) gradient.
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(robustops, m) {
  m.def("fgsm_step(Tensor x, Tensor grad, Tensor eps, float lo, float hi) -> Tensor");
}

TORCH_LIBRARY_IMPL(robustops, Autograd, m) {
  m.impl("fgsm_step", torch::autograd::autogradNotImplementedFallback());
}
