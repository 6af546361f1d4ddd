// CUDA kernels of compact_conv2d and _compact_conv2d_backward.
//
// Forward: u = conv2d(x, w) by ATen (cuDNN), then two small kernels instead of a second
// convolution and three elementwise ops:
//   1. channel_sumsq:  Q[n, g, h, w] = sum_{c in group g} x[n, c, h, w]^2
//      (block = 32 pixels x 8 channel slices, reduced in shared memory: coalesced, deterministic)
//   2. norm_scale:     y[n, o, p] = alpha * u[n, o, p] / (sqrt(boxsum(Q)[n, g(o), p]) + delta) + b[o]
//      in place in u; each thread box-sums its pixel's k x k taps of Q once (stride, padding,
//      dilation honoured) and scales a chunk of the group's output channels.
// Backward (same algebra as the CPU kernel, see csrc/ops/cpu/compact_conv2d_kernel.cpp):
//   channel_sumsq again, then backward_pass1 writes gv = gy / n and gq = -(sum_o gy (y - b)) / (n sqrt(S))
//   (per-pixel reduction over the group's output channels in shared memory, deterministic),
//   ATen convolution_backward(gv) for grad_x' / grad_w', and backward_pass2 writes
//   grad_x = alpha * grad_x' + x * boxsum^T(gq) as a gather (no atomics).
// alpha is read from device memory by the kernels (no host synchronisation). Arithmetic in the
// op-math type (float for half / bfloat16).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../compact_conv2d_checks.h"

namespace robustops {
namespace {

constexpr int kPixX = 32;   // pixels per block (threadIdx.x)
constexpr int kSlices = 8;  // channel slices per block (threadIdx.y)
constexpr int64_t kOutChunk = 64;  // output channels per block in norm_scale

struct DevGeom {
  int64_t C, H, W, Cout, kh, kw, G, Cg, Og, sh, sw, ph, pw, dh, dw, Ho, Wo;
};

DevGeom to_dev(const CompactConvGeom& g) {
  return DevGeom{g.C, g.H, g.W, g.Cout, g.kh, g.kw, g.G, g.Cg, g.Og, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, g.Ho, g.Wo};
}

template <typename scalar_t, typename acc_t>
__global__ void channel_sumsq_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ Q, int64_t Cg, int64_t HW) {
  __shared__ acc_t partial[kSlices][kPixX + 1];
  const int64_t ng = blockIdx.x;
  const int64_t p = static_cast<int64_t>(blockIdx.y) * kPixX + threadIdx.x;
  acc_t s = acc_t(0);
  if (p < HW) {
    const scalar_t* xg = x + ng * Cg * HW + p;
    for (int64_t c = threadIdx.y; c < Cg; c += kSlices) {
      const acc_t v = static_cast<acc_t>(xg[c * HW]);
      s += v * v;
    }
  }
  partial[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && p < HW) {
    acc_t t = acc_t(0);
#pragma unroll
    for (int i = 0; i < kSlices; ++i) t += partial[i][threadIdx.x];
    Q[ng * HW + p] = t;
  }
}

// Sum of Q over the patch of output pixel (oh, ow) of plane ng.
template <typename acc_t>
__device__ __forceinline__ acc_t patch_sum(const acc_t* __restrict__ Qp, const DevGeom& g, int64_t oh, int64_t ow) {
  acc_t s = acc_t(0);
  for (int64_t kh = 0; kh < g.kh; ++kh) {
    const int64_t ih = oh * g.sh - g.ph + kh * g.dh;
    if (ih < 0 || ih >= g.H) continue;
    for (int64_t kw = 0; kw < g.kw; ++kw) {
      const int64_t iw = ow * g.sw - g.pw + kw * g.dw;
      if (iw < 0 || iw >= g.W) continue;
      s += Qp[ih * g.W + iw];
    }
  }
  return s;
}

template <typename scalar_t, typename acc_t>
__global__ void norm_scale_kernel(scalar_t* __restrict__ y, const acc_t* __restrict__ Q,
                                  const scalar_t* __restrict__ bias, const acc_t* __restrict__ alpha, acc_t delta,
                                  DevGeom g) {
  const int64_t ng = blockIdx.x;
  const int64_t n = ng / g.G, grp = ng % g.G;
  const int64_t P = g.Ho * g.Wo;
  const int64_t p = static_cast<int64_t>(blockIdx.y) * kPixX + threadIdx.x;
  if (p >= P) return;
  const int64_t oh = p / g.Wo, ow = p % g.Wo;
  const acc_t s = patch_sum<acc_t>(Q + ng * g.H * g.W, g, oh, ow);
  const acc_t scale = alpha[0] / (::sqrt(s) + delta);
  const int64_t o_begin = static_cast<int64_t>(blockIdx.z) * kOutChunk;
  const int64_t o_end = o_begin + kOutChunk < g.Og ? o_begin + kOutChunk : g.Og;
  for (int64_t o = o_begin + threadIdx.y; o < o_end; o += kSlices) {
    const int64_t co = grp * g.Og + o;
    const int64_t idx = (n * g.Cout + co) * P + p;
    const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[co]) : acc_t(0);
    y[idx] = static_cast<scalar_t>(static_cast<acc_t>(y[idx]) * scale + b);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_pass1_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ y,
                                      const scalar_t* __restrict__ bias, const acc_t* __restrict__ Q, acc_t delta,
                                      DevGeom g, scalar_t* __restrict__ gv, acc_t* __restrict__ gq) {
  __shared__ acc_t partial[kSlices][kPixX + 1];
  const int64_t ng = blockIdx.x;
  const int64_t n = ng / g.G, grp = ng % g.G;
  const int64_t P = g.Ho * g.Wo;
  const int64_t p = static_cast<int64_t>(blockIdx.y) * kPixX + threadIdx.x;
  acc_t acc = acc_t(0), r = acc_t(0), inv = acc_t(0);
  if (p < P) {
    r = ::sqrt(patch_sum<acc_t>(Q + ng * g.H * g.W, g, p / g.Wo, p % g.Wo));
    inv = acc_t(1) / (r + delta);
    for (int64_t o = threadIdx.y; o < g.Og; o += kSlices) {
      const int64_t co = grp * g.Og + o;
      const int64_t idx = (n * g.Cout + co) * P + p;
      const acc_t gyv = static_cast<acc_t>(gy[idx]);
      if (gv != nullptr) gv[idx] = static_cast<scalar_t>(gyv * inv);
      if (gq != nullptr) {
        const acc_t b = bias != nullptr ? static_cast<acc_t>(bias[co]) : acc_t(0);
        acc += gyv * (static_cast<acc_t>(y[idx]) - b);
      }
    }
  }
  if (gq == nullptr) return;  // uniform across the block
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && p < P) {
    acc_t t = acc_t(0);
#pragma unroll
    for (int i = 0; i < kSlices; ++i) t += partial[i][threadIdx.x];
    gq[ng * P + p] = r > acc_t(0) ? -t * inv / r : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_pass2_kernel(scalar_t* __restrict__ gx, const scalar_t* __restrict__ x,
                                      const acc_t* __restrict__ gq, const acc_t* __restrict__ alpha, DevGeom g,
                                      int64_t total) {
  const int64_t HW = g.H * g.W;
  const int64_t P = g.Ho * g.Wo;
  const acc_t a = alpha[0];
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t iw = i % g.W;
    const int64_t ih = (i / g.W) % g.H;
    const int64_t c = (i / HW) % g.C;
    const int64_t n = i / (HW * g.C);
    const acc_t* gqp = gq + (n * g.G + c / g.Cg) * P;
    acc_t s = acc_t(0);
    for (int64_t kh = 0; kh < g.kh; ++kh) {
      const int64_t t = ih + g.ph - kh * g.dh;
      if (t < 0 || t % g.sh != 0) continue;
      const int64_t oh = t / g.sh;
      if (oh >= g.Ho) continue;
      for (int64_t kw = 0; kw < g.kw; ++kw) {
        const int64_t u = iw + g.pw - kw * g.dw;
        if (u < 0 || u % g.sw != 0) continue;
        const int64_t ow = u / g.sw;
        if (ow >= g.Wo) continue;
        s += gqp[oh * g.Wo + ow];
      }
    }
    gx[i] = static_cast<scalar_t>(a * static_cast<acc_t>(gx[i]) + static_cast<acc_t>(x[i]) * s);
  }
}

at::ScalarType acc_scalar_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

at::Tensor channel_sumsq(const at::Tensor& xc, const CompactConvGeom& g) {
  at::Tensor Q = at::empty({g.N, g.G, g.H, g.W}, xc.options().dtype(acc_scalar_type(xc.scalar_type())));
  const int64_t HW = g.H * g.W;
  const dim3 block(kPixX, kSlices);
  const dim3 grid(static_cast<unsigned>(g.N * g.G), static_cast<unsigned>((HW + kPixX - 1) / kPixX));
  TORCH_CHECK((HW + kPixX - 1) / kPixX < 65536, "compact_conv2d (CUDA): input plane too large (", g.H, "x", g.W, ")");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "compact_conv2d_sumsq", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    channel_sumsq_kernel<scalar_t, acc_t><<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
        xc.const_data_ptr<scalar_t>(), Q.mutable_data_ptr<acc_t>(), g.Cg, HW);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return Q;
}

void check_cuda_inputs(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, " (CUDA kernel): x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              op, " (CUDA kernel): x must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
}

at::Tensor compact_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups, const at::Tensor& alpha, double delta) {
  check_cuda_inputs(x, "compact_conv2d");
  const CompactConvGeom g = check_compact_conv2d_args(x, weight, bias, stride, padding, dilation, groups, alpha, delta);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  if (g.N == 0) return at::empty({0, g.Cout, g.Ho, g.Wo}, xc.options());

  at::Tensor y =
      at::convolution(xc, wc, c10::nullopt, stride, padding, dilation, /*transposed=*/false, {0, 0}, groups)
          .contiguous();
  const at::Tensor Q = channel_sumsq(xc, g);
  const int64_t P = g.Ho * g.Wo;
  TORCH_CHECK((P + kPixX - 1) / kPixX < 65536, "compact_conv2d (CUDA): output plane too large (", g.Ho, "x", g.Wo, ")");
  const dim3 block(kPixX, kSlices);
  const dim3 grid(static_cast<unsigned>(g.N * g.G), static_cast<unsigned>((P + kPixX - 1) / kPixX),
                  static_cast<unsigned>((g.Og + kOutChunk - 1) / kOutChunk));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "compact_conv2d_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor a = alpha.reshape({1}).to(x.device(), c10::CppTypeToScalarType<acc_t>::value);
    norm_scale_kernel<scalar_t, acc_t><<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
        y.mutable_data_ptr<scalar_t>(), Q.const_data_ptr<acc_t>(),
        has_bias ? bc.const_data_ptr<scalar_t>() : nullptr, a.const_data_ptr<acc_t>(), static_cast<acc_t>(delta),
        to_dev(g));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> compact_conv2d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& out, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const at::Tensor& alpha, double delta, std::array<bool, 4> mask) {
  check_cuda_inputs(x, "_compact_conv2d_backward");
  const CompactConvGeom g = check_compact_conv2d_backward_args(grad_out, x, weight, bias, out, stride, padding,
                                                               dilation, groups, alpha, delta);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor gy = grad_out.contiguous();
  CompactConvBackwardPlan plan = plan_compact_conv2d_backward(gy, x, weight, bias, alpha, g.N, mask);
  if (plan.done) return std::make_tuple(plan.gx, plan.gw, plan.gb, plan.ga);
  const bool has_bias = plan.has_bias, need_x = plan.need_x, need_w = plan.need_w, need_a = plan.need_a;
  at::Tensor gx = plan.gx, gw = plan.gw, gb = plan.gb, ga = plan.ga;

  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  const at::Tensor yc = out.contiguous();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  const at::Tensor Q = channel_sumsq(xc, g);
  const at::ScalarType acc_type = acc_scalar_type(x.scalar_type());
  at::Tensor gv = at::empty_like(gy, at::MemoryFormat::Contiguous);
  at::Tensor gq = need_x ? at::empty({g.N, g.G, g.Ho, g.Wo}, xc.options().dtype(acc_type)) : at::Tensor();
  const int64_t P = g.Ho * g.Wo;
  const at::Tensor a = alpha.reshape({1}).to(x.device(), acc_type);

  {
    const dim3 block(kPixX, kSlices);
    const dim3 grid(static_cast<unsigned>(g.N * g.G), static_cast<unsigned>((P + kPixX - 1) / kPixX));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "compact_conv2d_backward_pass1", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_pass1_kernel<scalar_t, acc_t><<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
          gy.const_data_ptr<scalar_t>(), yc.const_data_ptr<scalar_t>(),
          has_bias ? bc.const_data_ptr<scalar_t>() : nullptr, Q.const_data_ptr<acc_t>(), static_cast<acc_t>(delta),
          to_dev(g), gv.mutable_data_ptr<scalar_t>(), need_x ? gq.mutable_data_ptr<acc_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  const bool conv_w = need_w || (need_a && !need_x);
  auto grads = at::convolution_backward(gv, xc, wc, c10::nullopt, stride, padding, dilation, /*transposed=*/false,
                                        {0, 0}, groups, {need_x, conv_w, false});
  at::Tensor gx1 = std::get<0>(grads);
  at::Tensor gw1 = std::get<1>(grads);
  if (need_a) {
    at::Tensor dot = conv_w ? at::dot(gw1.reshape(-1).to(acc_type), wc.reshape(-1).to(acc_type))
                            : at::dot(gx1.reshape(-1).to(acc_type), xc.reshape(-1).to(acc_type));
    ga = dot.reshape(alpha.sizes()).to(alpha.options());
  }
  if (need_w) gw = gw1.mul_(a.to(gw1.scalar_type()).reshape({}));
  if (need_x) {
    gx = gx1.contiguous();
    const int64_t total = gx.numel();
    const int threads = 256;
    const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
    const int blocks = static_cast<int>(std::min<int64_t>((total + threads - 1) / threads, max_blocks));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "compact_conv2d_backward_pass2", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_pass2_kernel<scalar_t, acc_t><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
          gx.mutable_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), gq.const_data_ptr<acc_t>(),
          a.const_data_ptr<acc_t>(), to_dev(g), total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return std::make_tuple(gx, gw, gb, ga);
}

}  // namespace

TORCH_LIBRARY_IMPL(robustops, CUDA, m) {
  m.impl("compact_conv2d", &compact_conv2d_cuda);
  m.impl("_compact_conv2d_backward", &compact_conv2d_backward_cuda);
}

}  // namespace robustops
