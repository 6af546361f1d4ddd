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

#include "autocast_policy.h"

TORCH_LIBRARY_FRAGMENT(robustops, m) {
  m.def(
      "kernel_dropout_eval(Tensor base, Tensor delta, Tensor weight, Tensor channels, int[2] stride, "
      "int[2] padding, int[2] dilation, Tensor? scale, Tensor? shift, bool relu, int[2] pool_kernel, "
      "int[2] pool_stride) -> Tensor");
}

TORCH_LIBRARY_IMPL(robustops, Autograd, m) {
  m.impl("kernel_dropout_eval", torch::autograd::autogradNotImplementedFallback());
}

// torch.autocast: run in float32 (float64 if an input is float64); see autocast_policy.h. Under
// autocast the consumer's base output is typically bfloat16/float16 while delta and the weight
// are float32: all are brought to one dtype here instead of failing the dtype check.
namespace robustops {
namespace {

template <c10::DispatchKey kKey, c10::DeviceType kDevice>
at::Tensor kernel_dropout_eval_autocast(const at::Tensor& base, const at::Tensor& delta, const at::Tensor& weight,
                                        const at::Tensor& channels, at::IntArrayRef stride, at::IntArrayRef padding,
                                        at::IntArrayRef dilation, const std::optional<at::Tensor>& scale,
                                        const std::optional<at::Tensor>& shift, bool relu,
                                        at::IntArrayRef pool_kernel, at::IntArrayRef pool_stride) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("robustops::kernel_dropout_eval", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, bool, at::IntArrayRef, at::IntArrayRef)>();
  const at::ScalarType t =
      autocast_compute_type(at::kFloat, {&base, &delta, &weight, opt_ptr(scale), opt_ptr(shift)});
  return op.call(autocast_cast(base, t, kDevice), autocast_cast(delta, t, kDevice), autocast_cast(weight, t, kDevice),
                 channels, stride, padding, dilation, autocast_cast(scale, t, kDevice),
                 autocast_cast(shift, t, kDevice), relu, pool_kernel, pool_stride);
}

}  // namespace
}  // namespace robustops

TORCH_LIBRARY_IMPL(robustops, AutocastCPU, m) {
  m.impl("kernel_dropout_eval",
         &robustops::kernel_dropout_eval_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(robustops, AutocastCUDA, m) {
  m.impl("kernel_dropout_eval",
         &robustops::kernel_dropout_eval_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
}
