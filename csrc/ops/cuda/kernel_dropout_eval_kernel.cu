// CUDA kernel of kernel_dropout_eval (see ../kernel_dropout_eval.cpp for the formula).
//
// One thread per output element (v, n, pooled position, o; o fastest, so stores coalesce): it evaluates the single-channel
// contribution at each position of its pooling window (kh*kw multiply-adds from delta[n, c_v]),
// subtracts it from base, applies the optional affine and ReLU, and keeps the maximum. Only the
// pooled result is written. Arithmetic in the op-math type (float for half/bfloat16).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../kernel_dropout_eval_checks.h"

namespace robustops {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void kernel_dropout_eval_kernel(KernelDropoutGeometry g, const scalar_t* __restrict__ base,
                                           const scalar_t* __restrict__ delta, const scalar_t* __restrict__ weight,
                                           const int64_t* __restrict__ channels, int64_t V,
                                           const scalar_t* __restrict__ scale, const scalar_t* __restrict__ shift,
                                           bool relu, scalar_t* __restrict__ out, int64_t total) {
  const int64_t step = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    int64_t r = idx;  // output memory is [V, N, Hp, Wp, Cout] (channels-last per variant)
    const int64_t o = r % g.Cout;
    r /= g.Cout;
    const int64_t pj = r % g.Wp;
    r /= g.Wp;
    const int64_t pi = r % g.Hp;
    r /= g.Hp;
    const int64_t n = r % g.N;
    const int64_t v = r / g.N;
    const int64_t c = channels[v];
    const scalar_t* in = delta + (n * g.Cin + c) * g.H * g.W;
    const scalar_t* w = weight + (o * g.Cin + c) * g.kh * g.kw;
    const scalar_t* bp = base + (n * g.Cout + o) * g.Ho * g.Wo;
    const acc_t sc = scale ? static_cast<acc_t>(scale[o]) : acc_t(1);
    const acc_t sf = shift ? static_cast<acc_t>(shift[o]) : acc_t(0);
    acc_t m = -INFINITY;
    for (int64_t pa = 0; pa < g.pkh; ++pa) {
      const int64_t i = pi * g.psh + pa;
      for (int64_t pb = 0; pb < g.pkw; ++pb) {
        const int64_t j = pj * g.psw + pb;
        acc_t contrib = acc_t(0);
        for (int64_t a = 0; a < g.kh; ++a) {
          const int64_t ii = i * g.sh - g.ph + a * g.dh;
          if (ii < 0 || ii >= g.H) continue;
          for (int64_t b = 0; b < g.kw; ++b) {
            const int64_t jj = j * g.sw - g.pw + b * g.dw;
            if (jj < 0 || jj >= g.W) continue;
            contrib += static_cast<acc_t>(w[a * g.kw + b]) * static_cast<acc_t>(in[ii * g.W + jj]);
          }
        }
        acc_t y = static_cast<acc_t>(bp[i * g.Wo + j]) - contrib;
        if (scale) y = y * sc + sf;
        if (relu) y = y > acc_t(0) ? y : (y != y ? y : acc_t(0));
        if (y > m || y != y) m = y;  // max_pool2d propagates NaN
      }
    }
    out[idx] = static_cast<scalar_t>(m);
  }
}

at::Tensor kernel_dropout_eval_cuda(const at::Tensor& base, const at::Tensor& delta, const at::Tensor& weight,
                                    const at::Tensor& channels, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, const c10::optional<at::Tensor>& scale,
                                    const c10::optional<at::Tensor>& shift, bool relu, at::IntArrayRef pool_kernel,
                                    at::IntArrayRef pool_stride) {
  TORCH_CHECK(base.is_cuda(), "kernel_dropout_eval (CUDA kernel): base must be a CUDA tensor, got ", base.device());
  const KernelDropoutGeometry g = check_kernel_dropout_eval_args(base, delta, weight, channels, stride, padding,
                                                                 dilation, scale, shift, pool_kernel, pool_stride);
  c10::cuda::CUDAGuard guard(base.device());
  const at::Tensor ch_host = channels.to(at::kCPU).contiguous();
  const int64_t V = ch_host.numel();
  const int64_t* cp = ch_host.const_data_ptr<int64_t>();
  for (int64_t v = 0; v < V; ++v) {
    TORCH_CHECK(cp[v] >= 0 && cp[v] < g.Cin, "kernel_dropout_eval: channels[", v, "]=", cp[v],
                " out of range [0, ", g.Cin, ")");
  }
  // Channels-last per variant, as on the CPU: memory [V, N, Hp, Wp, Cout], viewed as [V, N, Cout, Hp, Wp].
  at::Tensor out = at::empty({V, g.N, g.Hp, g.Wp, g.Cout}, base.options()).permute({0, 1, 4, 2, 3});
  const int64_t total = out.numel();
  if (total == 0) return out;
  const at::Tensor ch = ch_host.to(base.device());
  const at::Tensor bc = base.contiguous(), dc = delta.contiguous(), wc = weight.contiguous();
  at::Tensor sc, sf;
  if (scale.has_value()) {
    sc = scale->contiguous();
    sf = shift->contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "kernel_dropout_eval_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int threads = 256;
    const int64_t max_blocks =
        static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
    const int blocks = static_cast<int>(std::min<int64_t>((total + threads - 1) / threads, max_blocks));
    kernel_dropout_eval_kernel<scalar_t, acc_t><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
        g, bc.const_data_ptr<scalar_t>(), dc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(),
        ch.const_data_ptr<int64_t>(), V, sc.defined() ? sc.const_data_ptr<scalar_t>() : nullptr,
        sf.defined() ? sf.const_data_ptr<scalar_t>() : nullptr, relu, out.mutable_data_ptr<scalar_t>(), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(robustops, CUDA, m) {
  m.impl("kernel_dropout_eval", &kernel_dropout_eval_cuda);
}

}  // namespace robustops
