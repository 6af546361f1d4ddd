// Schema of apgd_step: the projected momentum step of APGD (Croce & Hein 2020, Alg. 1, eq. 2-3)
// for the Linf and L2 balls, in one call:
//
//   z   = P(x + step[n] * s(grad))                      s = sign (Linf) or g / ||g||_2 (L2)
//   out = P(x + momentum * (z - x) + (1 - momentum) * (x - x_prev))
//
// where P projects onto {||v - x0||_p <= eps} and then clamps to [lo, hi] (the order of the
// authors' reference code). Not differentiable (an attack's update, not a training graph).
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(robustops, m) {
  m.def("apgd_step(Tensor x, Tensor x_prev, Tensor x0, Tensor grad, Tensor step_size, float eps, "
        "float momentum, float lo, float hi, str norm) -> Tensor");
}

TORCH_LIBRARY_IMPL(robustops, Autograd, m) {
  m.impl("apgd_step", torch::autograd::autogradNotImplementedFallback());
}
