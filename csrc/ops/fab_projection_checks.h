// Argument checks and the per-row solver shared by the kernels of fab_projection.
//
// Both norms reduce to one scalar problem. With c = |<w, t> - b| and the sign of w flipped so
// that <w, t> >= b, moving coordinate j "downhill" by at most its distance to the box gives
//
//   Linf: d_j = -sign(w_j) * min(a, q_j),  q_j = distance of t_j to the face in -sign(w_j),
//         <w, d> = -sum_j |w_j| min(a, q_j)
//   L2:   d_j = -w_j * min(a, q_j),        q_j = that distance / |w_j|  (KKT: d = clip(-a w)),
//         <w, d> = -sum_j w_j^2 min(a, q_j)
//
// so a is the smallest value with h(a) = sum_j u_j min(a, q_j) = c (u = |w| or w^2): piecewise
// linear and increasing in a. Sorting q gives the piece; h(max q) < c means the hyperplane is out
// of reach and every coordinate goes to its face (a = +inf).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string>

namespace robustops {

inline int check_fab_projection_args(const at::Tensor& points, const at::Tensor& w, const at::Tensor& b,
                                     double lo, double hi, const std::string& norm) {
  TORCH_CHECK(norm == "Linf" || norm == "L2", "fab_projection: norm must be \"Linf\" or \"L2\", got \"", norm, "\"");
  TORCH_CHECK(points.dim() == 2, "fab_projection: points must be 2-D [B, D], got shape ", points.sizes());
  TORCH_CHECK(at::isFloatingType(points.scalar_type()), "fab_projection: points must be floating point, got ",
              points.scalar_type());
  TORCH_CHECK(w.sizes() == points.sizes(), "fab_projection: w must have the shape of points ", points.sizes(),
              ", got ", w.sizes());
  TORCH_CHECK(b.dim() == 1 && b.size(0) == points.size(0), "fab_projection: b must be 1-D [B] with B=",
              points.size(0), ", got shape ", b.sizes());
  TORCH_CHECK(w.scalar_type() == points.scalar_type() && b.scalar_type() == points.scalar_type(),
              "fab_projection: points, w and b must have the same dtype, got ", points.scalar_type(), ", ",
              w.scalar_type(), ", ", b.scalar_type());
  TORCH_CHECK(w.device() == points.device() && b.device() == points.device(),
              "fab_projection: points, w and b must be on the same device, got ", points.device(), ", ",
              w.device(), ", ", b.device());
  TORCH_CHECK(std::isfinite(lo) && std::isfinite(hi) && lo <= hi,
              "fab_projection: need finite lo <= hi, got lo=", lo, " hi=", hi);
  return norm == "Linf" ? 0 : 2;
}

// Threshold below which a weight counts as zero (the coordinate is not moved): exact zero for
// Linf, |w| < 1e-8 for L2 (the reference code's conventions).
template <typename T>
inline bool fab_active(T w, int p) {
  return p == 0 ? (w != T(0)) : (std::abs(static_cast<double>(w)) >= 1e-8);
}

// Per-coordinate weight u_j and breakpoint q_j (>= 0) for row values t_j, w_j (w already signed
// so that <w, t> >= b).
template <typename T>
inline void fab_weight_break(T t, T w, double lo, double hi, int p, double* u, double* q) {
  const double tv = static_cast<double>(t), wv = static_cast<double>(w);
  const double dist = wv > 0 ? tv - lo : hi - tv;  // distance to the face in direction -sign(w)
  const double qd = dist > 0 ? dist : 0.0;
  if (p == 0) {
    *u = std::abs(wv);
    *q = qd;
  } else {
    *u = wv * wv;
    *q = qd / std::abs(wv);
  }
}

}  // namespace robustops
