// Schema of compact_linear, the fully-connected twin of compact_conv2d (Ranjan et al. 2017, Sec. 4):
//
//   y = alpha * x W^T / (||x||_2 + delta) + b        x: [..., in], W: [out, in], b: [out] or None
//
// i.e. each feature vector is L2-normalised and scaled by alpha before the linear map (with
// delta = 0 and a fixed alpha this is the L2-softmax feature layer). Autograd is registered from
// Python; _compact_linear_backward returns (grad_x, grad_weight, grad_bias, grad_alpha) with empty
// [0] tensors where output_mask is false.
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(robustops, m) {
  m.def("compact_linear(Tensor x, Tensor weight, Tensor? bias, Tensor alpha, float delta) -> Tensor");
  m.def(
      "_compact_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor out, Tensor alpha, "
      "float delta, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(robustops, Autograd, m) {
  m.impl("_compact_linear_backward", torch::autograd::autogradNotImplementedFallback());
}
