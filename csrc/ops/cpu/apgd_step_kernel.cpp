// CPU kernel of apgd_step. Linf: element-wise, one pass over x, x_prev, x0 and grad. L2: one task
// per sample; the sample's rows stay in cache across the three norms the step needs (gradient
// norm, first projection, projection after the momentum mix), accumulated in double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "../apgd_step_checks.h"

namespace robustops {
namespace {

template <typename T>
inline T clamp2(T v, T lo, T hi) {
  return std::min(std::max(v, lo), hi);
}

template <typename scalar_t>
void apgd_linf(const scalar_t* x, const scalar_t* xp, const scalar_t* x0, const scalar_t* g,
               const scalar_t* step, scalar_t eps, scalar_t a, scalar_t lo, scalar_t hi, scalar_t* out,
               int64_t n, int64_t d) {
  const scalar_t b = scalar_t(1) - a;
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const scalar_t st = step[s];
      const int64_t off = s * d;
      for (int64_t j = off; j < off + d; ++j) {
        const scalar_t sg = static_cast<scalar_t>(g[j] > scalar_t(0)) - static_cast<scalar_t>(g[j] < scalar_t(0));
        const scalar_t lo_j = x0[j] - eps, hi_j = x0[j] + eps;
        scalar_t z = clamp2(clamp2(x[j] + st * sg, lo_j, hi_j), lo, hi);
        scalar_t v = x[j] + (z - x[j]) * a + (x[j] - xp[j]) * b;
        out[j] = clamp2(clamp2(v, lo_j, hi_j), lo, hi);
      }
    }
  });
}

template <typename scalar_t>
void apgd_l2(const scalar_t* x, const scalar_t* xp, const scalar_t* x0, const scalar_t* g,
             const scalar_t* step, scalar_t eps, scalar_t a, scalar_t lo, scalar_t hi, scalar_t* out,
             int64_t n, int64_t d) {
  const scalar_t b = scalar_t(1) - a;
  const scalar_t tiny = static_cast<scalar_t>(1e-12);
  at::parallel_for(0, n, std::max<int64_t>(1, 4096 / std::max<int64_t>(d, 1)), [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t off = s * d;
      const scalar_t* xs = x + off;
      const scalar_t* ps = xp + off;
      const scalar_t* cs = x0 + off;
      const scalar_t* gs = g + off;
      scalar_t* os = out + off;
      double acc = 0.0;
      for (int64_t j = 0; j < d; ++j) acc += static_cast<double>(gs[j]) * gs[j];
      // step * g / (||g|| + 1e-12): the scale of the normalised gradient step
      const scalar_t gscale = step[s] / (static_cast<scalar_t>(std::sqrt(acc)) + tiny);
      acc = 0.0;
      for (int64_t j = 0; j < d; ++j) {
        const scalar_t u = (xs[j] + gs[j] * gscale) - cs[j];
        os[j] = u;  // scratch: the unprojected displacement from x0
        acc += static_cast<double>(u) * u;
      }
      scalar_t nrm = static_cast<scalar_t>(std::sqrt(acc));
      scalar_t f = std::min(eps, nrm) / (nrm + tiny);
      acc = 0.0;
      for (int64_t j = 0; j < d; ++j) {
        const scalar_t z = clamp2(cs[j] + os[j] * f, lo, hi);
        const scalar_t v = xs[j] + (z - xs[j]) * a + (xs[j] - ps[j]) * b;
        const scalar_t u = v - cs[j];
        os[j] = u;
        acc += static_cast<double>(u) * u;
      }
      nrm = static_cast<scalar_t>(std::sqrt(acc));
      f = std::min(eps, nrm) / (nrm + tiny);
      for (int64_t j = 0; j < d; ++j) os[j] = clamp2(cs[j] + os[j] * f, lo, hi);
    }
  });
}

at::Tensor apgd_step_cpu(const at::Tensor& x, const at::Tensor& x_prev, const at::Tensor& x0,
                         const at::Tensor& grad, const at::Tensor& step_size, double eps, double momentum,
                         double lo, double hi, c10::string_view norm_sv) {
  const std::string norm(norm_sv);
  TORCH_CHECK(x.device().is_cpu(), "apgd_step (CPU kernel): x must be a CPU tensor, got ", x.device());
  const int p = check_apgd_step_args(x, x_prev, x0, grad, step_size, eps, momentum, lo, hi, norm);
  const at::Tensor xc = x.contiguous(), pc = x_prev.contiguous(), cc = x0.contiguous(), gc = grad.contiguous();
  const at::Tensor sc = step_size.to(x.scalar_type()).contiguous();
  TORCH_CHECK(at::isfinite(sc).all().item<bool>(), "apgd_step: step_size must be finite");
  at::Tensor out = at::empty(x.sizes(), xc.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = x.size(0);
  if (xc.numel() == 0) return out;
  const int64_t d = xc.numel() / n;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "apgd_step_cpu", [&] {
    auto fn = p == 0 ? &apgd_linf<scalar_t> : &apgd_l2<scalar_t>;
    fn(xc.const_data_ptr<scalar_t>(), pc.const_data_ptr<scalar_t>(), cc.const_data_ptr<scalar_t>(),
       gc.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>(), static_cast<scalar_t>(eps),
       static_cast<scalar_t>(momentum), static_cast<scalar_t>(lo), static_cast<scalar_t>(hi),
       out.mutable_data_ptr<scalar_t>(), n, d);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(robustops, CPU, m) {
  m.impl("apgd_step", &apgd_step_cpu);
}

}  // namespace robustops
