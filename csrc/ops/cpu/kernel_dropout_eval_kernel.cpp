// CPU kernel of kernel_dropout_eval (see ../kernel_dropout_eval.cpp for the formula).
//
// One task per (variant v, example n): the input plane delta[n, c_v] (H x W) stays in L1 while,
// for every output channel o, the single-channel contribution is accumulated into a small
// Ho x Wo buffer (kh*kw shifted multiply-adds over contiguous rows, which the compiler
// vectorises for stride 1), then subtracted from base[n, o], passed through the optional affine
// and ReLU, max-pooled and written. Only the (pooled) result ever reaches memory.
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

template <typename scalar_t>
void kernel_dropout_eval_loop(const KernelDropoutGeometry& g, const scalar_t* __restrict__ base,
                              const scalar_t* __restrict__ delta, const scalar_t* __restrict__ weight,
                              const int64_t* channels, int64_t V, const scalar_t* scale, const scalar_t* shift,
                              bool relu, scalar_t* __restrict__ out) {
  const int64_t plane_in = g.H * g.W;
  const int64_t plane_mid = g.Ho * g.Wo;
  const int64_t plane_out = g.Hp * g.Wp;
  const int64_t ksize = g.kh * g.kw;
  // Valid output columns [j_lo, j_hi) for each kernel column kw: 0 <= j*sw - pw + kw*dw < W.
  std::vector<int64_t> j_lo(g.kw), j_hi(g.kw);
  for (int64_t b = 0; b < g.kw; ++b) {
    const int64_t off = b * g.dw - g.pw;
    int64_t lo = off >= 0 ? 0 : (-off + g.sw - 1) / g.sw;
    int64_t hi = (g.W - 1 - off) >= 0 ? (g.W - 1 - off) / g.sw + 1 : 0;
    j_lo[b] = std::min(lo, g.Wo);
    j_hi[b] = std::max(j_lo[b], std::min(hi, g.Wo));
  }
  at::parallel_for(0, V * g.N, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> buf(plane_mid);
    std::vector<scalar_t> wc(g.Cout * ksize);
    int64_t last_c = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t v = task / g.N;
      const int64_t n = task % g.N;
      const int64_t c = channels[v];
      if (c != last_c) {  // gather weight[:, c] once per run of tasks on the same channel
        for (int64_t o = 0; o < g.Cout; ++o)
          for (int64_t k = 0; k < ksize; ++k) wc[o * ksize + k] = weight[(o * g.Cin + c) * ksize + k];
        last_c = c;
      }
      const scalar_t* in = delta + (n * g.Cin + c) * plane_in;
      scalar_t* dst = out + task * g.Cout * plane_out;
      for (int64_t o = 0; o < g.Cout; ++o) {
        std::fill(buf.begin(), buf.end(), scalar_t(0));
        const scalar_t* wo = wc.data() + o * ksize;
        for (int64_t a = 0; a < g.kh; ++a) {
          for (int64_t b = 0; b < g.kw; ++b) {
            const scalar_t wv = wo[a * g.kw + b];
            const int64_t lo = j_lo[b], hi = j_hi[b];
            const int64_t col0 = b * g.dw - g.pw;
            for (int64_t i = 0; i < g.Ho; ++i) {
              const int64_t ii = i * g.sh - g.ph + a * g.dh;
              if (ii < 0 || ii >= g.H) continue;
              const scalar_t* row = in + ii * g.W + col0;
              scalar_t* brow = buf.data() + i * g.Wo;
              if (g.sw == 1) {
                for (int64_t j = lo; j < hi; ++j) brow[j] += wv * row[j];
              } else {
                for (int64_t j = lo; j < hi; ++j) brow[j] += wv * row[j * g.sw];
              }
            }
          }
        }
        const scalar_t* bp = base + (n * g.Cout + o) * plane_mid;
        const scalar_t sc = scale ? scale[o] : scalar_t(1);
        const scalar_t sf = shift ? shift[o] : scalar_t(0);
        scalar_t* op = dst + o * plane_out;
        if (!g.pool) {
          for (int64_t k = 0; k < plane_mid; ++k) {
            scalar_t y = bp[k] - buf[k];
            if (scale) y = y * sc + sf;
            if (relu) y = y > scalar_t(0) ? y : (std::isnan(y) ? y : scalar_t(0));
            op[k] = y;
          }
        } else {
          for (int64_t pi = 0; pi < g.Hp; ++pi) {
            for (int64_t pj = 0; pj < g.Wp; ++pj) {
              scalar_t m = -std::numeric_limits<scalar_t>::infinity();
              for (int64_t a = 0; a < g.pkh; ++a) {
                const int64_t i = pi * g.psh + a;
                for (int64_t b = 0; b < g.pkw; ++b) {
                  const int64_t k = i * g.Wo + pj * g.psw + b;
                  scalar_t y = bp[k] - buf[k];
                  if (scale) y = y * sc + sf;
                  if (relu) y = y > scalar_t(0) ? y : (std::isnan(y) ? y : scalar_t(0));
                  if (y > m || std::isnan(y)) m = y;  // max_pool2d propagates NaN
                }
              }
              op[pi * g.Wp + pj] = m;
            }
          }
        }
      }
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
  const at::Tensor ch = channels.to(at::kCPU).contiguous();
  const int64_t V = ch.numel();
  const int64_t* cp = ch.const_data_ptr<int64_t>();
  for (int64_t v = 0; v < V; ++v) {
    TORCH_CHECK(cp[v] >= 0 && cp[v] < g.Cin, "kernel_dropout_eval: channels[", v, "]=", cp[v],
                " out of range [0, ", g.Cin, ")");
  }
  at::Tensor out = at::empty({V, g.N, g.Cout, g.Hp, g.Wp}, base.options().memory_format(at::MemoryFormat::Contiguous));
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
