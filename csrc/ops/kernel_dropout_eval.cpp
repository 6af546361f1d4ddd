// Schema of kernel_dropout_eval: the first consumer of an ablated conv layer, for many
// one-kernel ablations at once, from one base evaluation (robustops.fragile.kernel_dropout).
//
// A consumer convolution W (groups=1, no bias here: the bias is already in `base`) is linear in
// its input. Removing kernel c of the layer before it changes only channel c of W's input, by
// `delta[:, c]` (= base input - ablated input). So for every requested variant v (channel c_v):
//
//   y_v = base - conv2d(delta[:, c_v:c_v+1], weight[:, c_v:c_v+1], stride, padding, dilation)
//   y_v = y_v * scale[o] + shift[o]        (optional: a folded eval-mode BatchNorm)
//   y_v = max(y_v, 0)                      (optional: ReLU)
//   y_v = max_pool2d(y_v, pool_kernel, pool_stride)   (optional: pool_kernel[0] > 0)
//
//   base    [N, Cout, Ho, Wo]   the consumer's output on the unablated input (bias included)
//   delta   [N, Cin, H, W]      per-channel input change caused by each ablation
//   weight  [Cout, Cin, kh, kw] the consumer's weight
//   channels int64 [V]          which input channels (variants) to produce, values in [0, Cin)
//   returns [V, N, Cout, Hp, Wp], laid out channels-last per variant (memory [V, N, Hp, Wp, Cout])
//
// The single-input-channel contribution costs 1/Cin of the full convolution, and the subtract,
// affine, ReLU and pooling are fused into the same pass, so only the pooled result is written.
// Not differentiable (an analysis op): Autograd gets PyTorch's "not implemented" fallback.
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(robustops, m) {
  m.def(
      "kernel_dropout_eval(Tensor base, Tensor delta, Tensor weight, Tensor channels, int[2] stride, "
      "int[2] padding, int[2] dilation, Tensor? scale, Tensor? shift, bool relu, int[2] pool_kernel, "
      "int[2] pool_stride) -> Tensor");
}

TORCH_LIBRARY_IMPL(robustops, Autograd, m) {
  m.impl("kernel_dropout_eval", torch::autograd::autogradNotImplementedFallback());
}
