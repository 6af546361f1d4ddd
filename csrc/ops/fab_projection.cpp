// Schema of fab_projection: FAB's projection of points onto the intersection of a hyperplane and
// the box (Croce & Hein 2020, "Minimally distorted adversarial examples with a fast adaptive
// boundary attack", Sec. 3.1, eq. 6-7):
//
//   d[i] = argmin ||d||_p  s.t.  <w[i], t[i] + d> = b[i],  lo <= t[i] + d <= hi     (p = inf or 2)
//
// t, w: [B, D]; b: [B]; returns d: [B, D]. When the hyperplane cannot be reached inside the box,
// d moves every coordinate to the box face that brings <w, t + d> closest to b (as the reference).
// Not differentiable.
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(robustops, m) {
  m.def("fab_projection(Tensor points, Tensor w, Tensor b, float lo, float hi, str norm) -> Tensor");
}

TORCH_LIBRARY_IMPL(robustops, Autograd, m) {
  m.impl("fab_projection", torch::autograd::autogradNotImplementedFallback());
}
