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
