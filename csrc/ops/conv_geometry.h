// Overflow-checked convolution geometry shared by the argument checks of every op
// (compact_conv2d_checks.h, kernel_dropout_eval_checks.h).
//
// The textbook output size  (in + 2 * pad - dil * (k - 1) - 1) / stride + 1  wraps around in int64
// for absurd stride / padding / dilation (around 2^61..2^63), and a wrapped size lets a kernel index
// out of bounds. Every product and sum here goes through __builtin_*_overflow and fails with a
// TORCH_CHECK naming the op and the argument instead.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace robustops {

// Largest stride / padding / dilation accepted (the Python wrappers use the same bound). Larger
// values are never meaningful, and ATen's own convolution (which the ops call for the GEMM path and
// the backward) is not safe with them: F.conv2d segfaults with e.g. stride 2^62, padding 2^62 - 5,
// dilation 2^61.
constexpr int64_t kMaxConvGeometry = 2147483647;  // 2^31 - 1

inline void check_geometry_pair(c10::IntArrayRef v, const char* op, const char* name, int64_t min_value) {
  TORCH_CHECK(v.size() == 2, op, ": ", name, " must have 2 values, got ", v.size());
  TORCH_CHECK(v[0] >= min_value && v[1] >= min_value, op, ": ", name, " must be >= ", min_value, ", got ", v);
  TORCH_CHECK(v[0] <= kMaxConvGeometry && v[1] <= kMaxConvGeometry, op, ": ", name, " must be <= ",
              kMaxConvGeometry, ", got ", v);
}

inline int64_t checked_mul(int64_t a, int64_t b, const char* op, const char* what) {
  int64_t r;
  TORCH_CHECK(!__builtin_mul_overflow(a, b, &r), op, ": ", what, " overflows int64 (", a, " * ", b, ")");
  return r;
}

inline int64_t checked_add(int64_t a, int64_t b, const char* op, const char* what) {
  int64_t r;
  TORCH_CHECK(!__builtin_add_overflow(a, b, &r), op, ": ", what, " overflows int64 (", a, " + ", b, ")");
  return r;
}

// Size of `in` after zero padding on both sides: in + 2 * pad (checked).
inline int64_t checked_padded_size(int64_t in, int64_t pad, const char* op, const char* dim) {
  return checked_add(in, checked_mul(pad, 2, op, dim), op, dim);
}

// Extent of a dilated kernel: dil * (k - 1) + 1 (checked).
inline int64_t checked_kernel_extent(int64_t k, int64_t dil, const char* op, const char* dim) {
  return checked_add(checked_mul(dil, k - 1, op, dim), 1, op, dim);
}

// Output size of a convolution along one dimension; requires in >= 0, pad >= 0, k >= 1, dil >= 1,
// stride >= 1 (checked by the callers). Returns 0 when the padded input is smaller than the dilated
// kernel (callers decide whether that is an error).
inline int64_t checked_conv_out_size(int64_t in, int64_t pad, int64_t dil, int64_t k, int64_t stride, const char* op,
                                     const char* dim) {
  const int64_t padded = checked_padded_size(in, pad, op, dim);
  const int64_t extent = checked_kernel_extent(k, dil, op, dim);
  if (padded < extent) return 0;
  return (padded - extent) / stride + 1;  // no overflow: 0 <= padded - extent, stride >= 1
}

}  // namespace robustops
