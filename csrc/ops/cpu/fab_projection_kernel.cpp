// CPU kernel of fab_projection: one task per row; the breakpoints q_j are sorted once (O(D log D))
// and the piece of h(a) = sum_j u_j min(a, q_j) that reaches c is found by one scan over the
// sorted order (see fab_projection_checks.h). Sums in double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "../fab_projection_checks.h"

namespace robustops {
namespace {

template <typename scalar_t>
void project_rows(const scalar_t* t, const scalar_t* w, const scalar_t* b, double lo, double hi, int p,
                  scalar_t* out, int64_t rows, int64_t d) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 2048 / std::max<int64_t>(d, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<double> u(d), q(d), suffix(d + 1);
    std::vector<int64_t> order(d);
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* tr = t + r * d;
      const scalar_t* wr = w + r * d;
      scalar_t* orow = out + r * d;
      double dot = 0.0;
      for (int64_t j = 0; j < d; ++j) dot += static_cast<double>(wr[j]) * tr[j];
      const double c0 = dot - static_cast<double>(b[r]);
      const double sgn = c0 >= 0 ? 1.0 : -1.0;
      const double c = std::abs(c0);
      int64_t m = 0;
      for (int64_t j = 0; j < d; ++j) {
        const scalar_t ws = static_cast<scalar_t>(sgn * static_cast<double>(wr[j]));
        if (fab_active(ws, p)) {
          fab_weight_break(tr[j], ws, lo, hi, p, &u[j], &q[j]);
          order[m++] = j;
        } else {
          u[j] = 0.0;
          q[j] = 0.0;
        }
      }
      std::sort(order.begin(), order.begin() + m, [&](int64_t i, int64_t k) { return q[i] < q[k]; });
      suffix[m] = 0.0;
      for (int64_t k = m - 1; k >= 0; --k) suffix[k] = suffix[k + 1] + u[order[k]];
      double a = std::numeric_limits<double>::infinity();
      double below = 0.0;  // sum of u_j q_j over the breakpoints already passed
      for (int64_t k = 0; k < m; ++k) {
        const int64_t j = order[k];
        const double cand = (c - below) / suffix[k];
        if (cand <= q[j]) {
          a = cand > 0 ? cand : 0.0;
          break;
        }
        below += u[j] * q[j];
      }
      for (int64_t j = 0; j < d; ++j) {
        const double wv = sgn * static_cast<double>(wr[j]);
        if (u[j] == 0.0 && !fab_active(static_cast<scalar_t>(wv), p)) {
          orow[j] = scalar_t(0);
          continue;
        }
        const double step = std::min(a, q[j]);
        orow[j] = static_cast<scalar_t>(p == 0 ? (wv > 0 ? -step : step) : -wv * step);
      }
    }
  });
}

at::Tensor fab_projection_cpu(const at::Tensor& points, const at::Tensor& w, const at::Tensor& b, double lo,
                              double hi, c10::string_view norm_sv) {
  const std::string norm(norm_sv);
  TORCH_CHECK(points.device().is_cpu(), "fab_projection (CPU kernel): points must be a CPU tensor, got ",
              points.device());
  const int p = check_fab_projection_args(points, w, b, lo, hi, norm);
  const at::Tensor tc = points.contiguous(), wc = w.contiguous(), bc = b.contiguous();
  at::Tensor out = at::empty(points.sizes(), tc.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  TORCH_CHECK(at::isfinite(wc).all().item<bool>() && at::isfinite(bc).all().item<bool>(),
              "fab_projection: w and b must be finite");
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "fab_projection_cpu", [&] {
    project_rows<scalar_t>(tc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(),
                           lo, hi, p, out.mutable_data_ptr<scalar_t>(), points.size(0), points.size(1));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(robustops, CPU, m) {
  m.impl("fab_projection", &fab_projection_cpu);
}

}  // namespace robustops
