// CPU kernel of kernel_dropout_eval (see ../kernel_dropout_eval.cpp for the formula).
//
// Parallel over examples n. For each n, base[n] is transposed once so the output channel is
// innermost; for each variant v the input plane delta[n, c_v] is copied into a zero-padded
// buffer (L1), and every output position costs kh*kw broadcast multiply-adds over a vector of
// all Cout output channels, fused with "base - contribution -> affine -> ReLU -> max-pool". Only
// the pooled result reaches memory, channels-last (contiguous over the output channels). An AVX2+FMA build of the task is picked at run time on x86.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../kernel_dropout_eval_checks.h"

namespace robustops {
namespace {

// Everything one task (one example n, all requested variants) needs.
template <typename scalar_t>
struct TaskArgs {
  const KernelDropoutGeometry* g;
  const scalar_t* base;     // [N, Cout, Ho, Wo]
  const scalar_t* delta;    // [N, Cin, H, W]
  const scalar_t* wT;       // [V, kh*kw, Cout]: weight[:, c_v] with the output channel innermost
  const int64_t* channels;  // [V]
  const int64_t* tap;       // [kh*kw] offsets of the taps in the padded plane
  int64_t V;
  const scalar_t* scale;
  const scalar_t* shift;
  bool relu;
  scalar_t* out;            // [V, N, Cout, Hp, Wp]
  scalar_t* bT;             // scratch [Ho*Wo, Cout]: base[n] with the output channel innermost
  scalar_t* padded;         // scratch [(H+2ph) * (W+2pw)], zero borders
  scalar_t* m;              // scratch [Cout]
  scalar_t* acc;            // scratch [Cout]
};

// One example n: base[n] is transposed once to [position, o]; then, for every variant v and
// output position, the kh*kw input values are loaded once and the contribution of all Cout
// output channels is a vector loop over o (kh*kw broadcast multiply-adds), followed by the
// subtraction from base, affine, ReLU and the running max of the pooling window.
template <typename scalar_t>
__attribute__((always_inline)) inline void kernel_dropout_task(const TaskArgs<scalar_t>& t, int64_t n) {
  const KernelDropoutGeometry& g = *t.g;
  const int64_t Cout = g.Cout;
  const int64_t plane_mid = g.Ho * g.Wo;
  const int64_t plane_out = g.Hp * g.Wp;
  const int64_t ksize = g.kh * g.kw;
  const int64_t PW = g.W + 2 * g.pw;
  const scalar_t* bn = t.base + n * Cout * plane_mid;
  for (int64_t o = 0; o < Cout; ++o)
    for (int64_t k = 0; k < plane_mid; ++k) t.bT[k * Cout + o] = bn[o * plane_mid + k];
  const scalar_t* __restrict__ scale = t.scale;  // ones / zeros when the op has no affine step
  const scalar_t* __restrict__ shift = t.shift;
  scalar_t* __restrict__ acc = t.acc;
  const bool relu = t.relu;
  for (int64_t v = 0; v < t.V; ++v) {
    const int64_t c = t.channels[v];
    const scalar_t* in = t.delta + (n * g.Cin + c) * g.H * g.W;
    for (int64_t r = 0; r < g.H; ++r)
      std::copy(in + r * g.W, in + (r + 1) * g.W, t.padded + (r + g.ph) * PW + g.pw);
    const scalar_t* __restrict__ wv = t.wT + v * ksize * Cout;
    scalar_t* dst = t.out + (v * g.N + n) * Cout * plane_out;  // [Hp, Wp, Cout] block (channels-last)
    scalar_t xs[64];
    for (int64_t pi = 0; pi < g.Hp; ++pi) {
      for (int64_t pj = 0; pj < g.Wp; ++pj) {
        for (int64_t a = 0; a < g.pkh; ++a) {
          for (int64_t b = 0; b < g.pkw; ++b) {
            const int64_t i = pi * g.psh + a, j = pj * g.psw + b;
            const scalar_t* p0 = t.padded + i * g.sh * PW + j * g.sw;
            for (int64_t k = 0; k < ksize; ++k) xs[k] = p0[t.tap[k]];
            const scalar_t* __restrict__ brow = t.bT + (i * g.Wo + j) * Cout;
            // acc[o] = sum_k w[k, o] * x_k: contiguous multiply-adds over o, one pass per tap.
            {
              const scalar_t x0 = xs[0];
#pragma omp simd
              for (int64_t o = 0; o < Cout; ++o) acc[o] = wv[o] * x0;
            }
            for (int64_t k = 1; k < ksize; ++k) {
              const scalar_t xk = xs[k];
              const scalar_t* __restrict__ wk = wv + k * Cout;
#pragma omp simd
              for (int64_t o = 0; o < Cout; ++o) acc[o] += wk[o] * xk;
            }
            // y = affine(base - acc), ReLU, running max over the pooling window.
            scalar_t* __restrict__ m = dst + (pi * g.Wp + pj) * Cout;  // running max, written in place
            if (a == 0 && b == 0) {
#pragma omp simd
              for (int64_t o = 0; o < Cout; ++o) {
                scalar_t y = (brow[o] - acc[o]) * scale[o] + shift[o];
                if (relu) y = y < scalar_t(0) ? scalar_t(0) : y;  // NaN stays NaN, like torch.relu
                m[o] = y;
              }
            } else {
#pragma omp simd
              for (int64_t o = 0; o < Cout; ++o) {
                scalar_t y = (brow[o] - acc[o]) * scale[o] + shift[o];
                if (relu) y = y < scalar_t(0) ? scalar_t(0) : y;
                m[o] = (y > m[o] || y != y) ? y : m[o];  // max_pool2d propagates NaN
              }
            }
          }
        }
      }
    }
  }
}

template <typename scalar_t>
void kernel_dropout_task_generic(const TaskArgs<scalar_t>& t, int64_t n) {
  kernel_dropout_task<scalar_t>(t, n);
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define ROBUSTOPS_KD_AVX2 1
// The same code compiled for AVX2 + FMA, chosen at run time: the wheel stays baseline x86-64.
__attribute__((target("avx2,fma"))) void kernel_dropout_task_avx2(const TaskArgs<float>& t, int64_t n) {
  kernel_dropout_task<float>(t, n);
}
__attribute__((target("avx2,fma"))) void kernel_dropout_task_avx2(const TaskArgs<double>& t, int64_t n) {
  kernel_dropout_task<double>(t, n);
}
bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#endif

template <typename scalar_t>
void kernel_dropout_eval_loop(const KernelDropoutGeometry& g, const scalar_t* base, const scalar_t* delta,
                              const scalar_t* weight, const int64_t* channels, int64_t V, const scalar_t* scale,
                              const scalar_t* shift, bool relu, scalar_t* out) {
  const int64_t ksize = g.kh * g.kw;
  TORCH_CHECK(ksize <= 64, "kernel_dropout_eval (CPU): kernels with more than 64 taps are not supported, got ",
              g.kh, "x", g.kw);
  const int64_t PH = g.H + 2 * g.ph, PW = g.W + 2 * g.pw;
  std::vector<int64_t> tap(ksize);
  for (int64_t a = 0; a < g.kh; ++a)
    for (int64_t b = 0; b < g.kw; ++b) tap[a * g.kw + b] = a * g.dh * PW + b * g.dw;
  std::vector<scalar_t> wT(V * ksize * g.Cout);
  for (int64_t v = 0; v < V; ++v)
    for (int64_t k = 0; k < ksize; ++k)
      for (int64_t o = 0; o < g.Cout; ++o)
        wT[(v * ksize + k) * g.Cout + o] = weight[(o * g.Cin + channels[v]) * ksize + k];
  // Without an affine step use scale 1, shift 0: y * 1 + 0 == y exactly, and no branch in the loop.
  std::vector<scalar_t> sc(g.Cout, scalar_t(1)), sf(g.Cout, scalar_t(0));
  if (scale) {
    std::copy(scale, scale + g.Cout, sc.begin());
    std::copy(shift, shift + g.Cout, sf.begin());
  }
#ifdef ROBUSTOPS_KD_AVX2
  const bool avx2 = cpu_has_avx2();
#endif
  at::parallel_for(0, g.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> bT(g.Ho * g.Wo * g.Cout), padded(PH * PW, scalar_t(0)), m(g.Cout), acc(g.Cout);
    TaskArgs<scalar_t> t{&g, base, delta, wT.data(), channels, tap.data(), V, sc.data(), sf.data(), relu, out,
                         bT.data(), padded.data(), m.data(), acc.data()};
    for (int64_t n = begin; n < end; ++n) {
#ifdef ROBUSTOPS_KD_AVX2
      if (avx2) {
        kernel_dropout_task_avx2(t, n);
        continue;
      }
#endif
      kernel_dropout_task_generic<scalar_t>(t, n);
    }
  });
}

at::Tensor kernel_dropout_eval_cpu(const at::Tensor& base, const at::Tensor& delta, const at::Tensor& weight,
                                   const at::Tensor& channels, at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, const c10::optional<at::Tensor>& scale,
                                   const c10::optional<at::Tensor>& shift, bool relu, at::IntArrayRef pool_kernel,
                                   at::IntArrayRef pool_stride) {
  TORCH_CHECK(base.device().is_cpu(), "kernel_dropout_eval (CPU kernel): base must be a CPU tensor, got ",
              base.device());
  const KernelDropoutGeometry g = check_kernel_dropout_eval_args(base, delta, weight, channels, stride, padding,
                                                                 dilation, scale, shift, pool_kernel, pool_stride);
  // This kernel keeps one zero-padded input plane per task: bound its size (overflow-checked).
  const char* op = "kernel_dropout_eval (CPU kernel)";
  const int64_t plane = checked_mul(checked_padded_size(g.H, g.ph, op, "padded height"),
                                    checked_padded_size(g.W, g.pw, op, "padded width"), op, "padded plane size");
  TORCH_CHECK(plane <= (int64_t(1) << 26), op, ": the zero-padded input plane would have ", plane,
              " elements (input ", g.H, "x", g.W, ", padding ", padding, "); at most 2^26 are supported");
  const at::Tensor ch = channels.to(at::kCPU).contiguous();
  const int64_t V = ch.numel();
  const int64_t* cp = ch.const_data_ptr<int64_t>();
  for (int64_t v = 0; v < V; ++v) {
    TORCH_CHECK(cp[v] >= 0 && cp[v] < g.Cin, "kernel_dropout_eval: channels[", v, "]=", cp[v],
                " out of range [0, ", g.Cin, ")");
  }
  // Channels-last per variant: memory [V, N, Hp, Wp, Cout], returned as a [V, N, Cout, Hp, Wp] view,
  // so reshape(V*N, Cout, Hp, Wp) is a channels_last tensor (faster for the convolutions after it).
  at::Tensor out = at::empty({V, g.N, g.Hp, g.Wp, g.Cout}, base.options()).permute({0, 1, 4, 2, 3});
  if (out.numel() == 0) return out;
  const at::Tensor bc = base.contiguous(), dc = delta.contiguous(), wc = weight.contiguous();
  at::Tensor sc, sf;
  if (scale.has_value()) {
    sc = scale->contiguous();
    sf = shift->contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES(base.scalar_type(), "kernel_dropout_eval_cpu", [&] {
    kernel_dropout_eval_loop<scalar_t>(g, bc.const_data_ptr<scalar_t>(), dc.const_data_ptr<scalar_t>(),
                                       wc.const_data_ptr<scalar_t>(), cp, V,
                                       sc.defined() ? sc.const_data_ptr<scalar_t>() : nullptr,
                                       sf.defined() ? sf.const_data_ptr<scalar_t>() : nullptr, relu,
                                       out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(robustops, CPU, m) {
  m.impl("kernel_dropout_eval", &kernel_dropout_eval_cpu);
}

}  // namespace robustops
