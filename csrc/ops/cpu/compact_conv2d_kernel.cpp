// CPU kernels of compact_conv2d and _compact_conv2d_backward.
//
// Forward, two paths (chosen per call; ROBUSTOPS_COMPACT_CONV_IMPL=direct|gemm overrides):
//
//  * "direct" (small patches, K = C/groups * kh * kw <= kDirectMaxK): one fused pass. For a tile
//    of output pixels the patches are gathered once into a [K, tile] column buffer (im2col of the
//    tile, in L1/L2); the column norms come from that buffer, then a register-blocked micro-kernel
//    (6 output channels x 2 SIMD vectors of pixels) accumulates W x and writes
//    y = alpha * acc / (norm + delta) + b straight to the output. The output is written once and
//    never re-read, which matters for the first layers where the convolution is memory bound.
//  * "gemm" (large patches): the convolution itself is left to ATen (oneDNN), which is the floor we
//    must not reimplement worse. The patch norms are NOT a second convolution: per image and group
//    the channel sum of x^2 (one pass over x) is box-summed separably (rows, then columns, honouring
//    stride, padding and dilation) into the [Ho, Wo] sum-of-squares map, and one in-place pass
//    scales the convolution output, while it is still in cache, image by image.
//
// Backward (both paths): with n = sqrt(S) + delta and y = alpha * u / n + b,
//    gv   = gy / n                                        (one pass, also gives gn below)
//    grad_x', grad_w' = convolution_backward(gv, x, w)   (ATen / oneDNN)
//    grad_w = alpha * grad_w';   grad_alpha = <grad_w', w>  (or <grad_x', x>): exact, no 1/alpha
//    gn   = -sum_{o in group} gy * (y - b) / n            (= dL/dn; y - b = alpha * u / n)
//    grad_x = alpha * grad_x' + x * boxsum^T(gn / sqrt(S))   (gn / sqrt(S) := 0 where S == 0)
// so the backward needs x, w, b, alpha and the forward output y, and never recomputes conv(x, w).
//
// The SIMD micro-kernel is written with GCC/Clang vector extensions and compiled twice on x86-64
// (baseline and AVX2+FMA); the AVX2 copy is selected at run time with __builtin_cpu_supports.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../compact_conv2d_checks.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define ROBUSTOPS_X86_DISPATCH 1
#endif

namespace robustops {
namespace {

constexpr int64_t kDirectMaxK = 80;   // largest C/groups*kh*kw handled by the fused direct path
constexpr int64_t kTile = 256;        // output pixels per direct-path task (multiple of every micro-tile)
constexpr int64_t kMaxTile = 1024;    // whole small images as one task when the column buffer stays small
constexpr int64_t kTileBytes = 40 << 10;  // column-buffer budget for the larger tiles (L1/L2)

// ---------------------------------------------------------------------------------------------
// Small geometry helpers
// ---------------------------------------------------------------------------------------------

// Output positions o in [0, out) whose tap o*stride + off lands inside [0, in): returns [lo, hi).
inline void valid_range(int64_t off, int64_t stride, int64_t in, int64_t out, int64_t& lo, int64_t& hi) {
  // need 0 <= o*stride + off <= in - 1. Written so that nothing overflows for any geometry the
  // checks accept (|off| <= padded size, stride up to INT64_MAX): ceil(-off / stride) as
  // (-off - 1) / stride + 1, never -off + stride - 1.
  lo = off >= 0 ? 0 : (-off - 1) / stride + 1;
  const int64_t last = in - 1 - off;
  hi = last < 0 ? 0 : std::min(out, last / stride + 1);
  if (lo > out) lo = out;
  if (hi < lo) hi = lo;
}

enum class Impl { Auto, Direct, Gemm };

Impl impl_override() {
  const char* s = std::getenv("ROBUSTOPS_COMPACT_CONV_IMPL");
  if (s == nullptr) return Impl::Auto;
  const std::string v(s);
  if (v == "direct") return Impl::Direct;
  if (v == "gemm") return Impl::Gemm;
  return Impl::Auto;
}

// ---------------------------------------------------------------------------------------------
// Sum-of-squares map of one (image, group) plane: S[oh, ow] = sum over the patch of x^2.
//   xg: the group's first channel of the image, [Cg, H, W] contiguous
//   Q : [H, W] scratch, R : [H, Wo] scratch, S : [Ho, Wo] result
// Cost O(Cg*H*W + H*Wo*kw + Ho*Wo*kh): a channel sum and a separable box sum.
// ---------------------------------------------------------------------------------------------
template <typename T>
void patch_sumsq_plane(const T* __restrict__ xg, const CompactConvGeom& g, T* __restrict__ Q, T* __restrict__ R,
                       T* __restrict__ S) {
  const int64_t HW = g.H * g.W;
  for (int64_t i = 0; i < HW; ++i) Q[i] = xg[i] * xg[i];
  for (int64_t c = 1; c < g.Cg; ++c) {
    const T* xc = xg + c * HW;
    for (int64_t i = 0; i < HW; ++i) Q[i] += xc[i] * xc[i];
  }
  // rows: R[ih, ow] = sum_kw Q[ih, ow*sw - pw + kw*dw]
  std::fill(R, R + g.H * g.Wo, T(0));
  for (int64_t kw = 0; kw < g.kw; ++kw) {
    const int64_t off = kw * g.dw - g.pw;
    int64_t lo, hi;
    valid_range(off, g.sw, g.W, g.Wo, lo, hi);
    if (lo >= hi) continue;
    for (int64_t ih = 0; ih < g.H; ++ih) {
      const T* q = Q + ih * g.W + (lo * g.sw + off);  // first valid tap of the row
      T* r = R + ih * g.Wo;
      if (g.sw == 1) {
        for (int64_t ow = lo; ow < hi; ++ow) r[ow] += q[ow - lo];
      } else {
        for (int64_t ow = lo; ow < hi; ++ow) r[ow] += q[(ow - lo) * g.sw];
      }
    }
  }
  // columns: S[oh, ow] = sum_kh R[oh*sh - ph + kh*dh, ow]
  std::fill(S, S + g.Ho * g.Wo, T(0));
  for (int64_t kh = 0; kh < g.kh; ++kh) {
    const int64_t off = kh * g.dh - g.ph;
    int64_t lo, hi;
    valid_range(off, g.sh, g.H, g.Ho, lo, hi);
    for (int64_t oh = lo; oh < hi; ++oh) {
      const T* r = R + (oh * g.sh + off) * g.Wo;
      T* s = S + oh * g.Wo;
      for (int64_t ow = 0; ow < g.Wo; ++ow) s[ow] += r[ow];
    }
  }
}

// Adjoint of the box sum for one (image, group) plane: Gm[ih, iw] = sum of gq over the output
// positions whose patch contains (ih, iw). T: [H, Wo] scratch; Gm: [H, W] result.
template <typename T>
void patch_boxsum_adjoint_plane(const T* __restrict__ gq, const CompactConvGeom& g, T* __restrict__ Tm,
                                T* __restrict__ Gm) {
  std::fill(Tm, Tm + g.H * g.Wo, T(0));
  for (int64_t kh = 0; kh < g.kh; ++kh) {
    const int64_t off = kh * g.dh - g.ph;
    int64_t lo, hi;
    valid_range(off, g.sh, g.H, g.Ho, lo, hi);
    for (int64_t oh = lo; oh < hi; ++oh) {
      T* t = Tm + (oh * g.sh + off) * g.Wo;
      const T* s = gq + oh * g.Wo;
      for (int64_t ow = 0; ow < g.Wo; ++ow) t[ow] += s[ow];
    }
  }
  std::fill(Gm, Gm + g.H * g.W, T(0));
  for (int64_t kw = 0; kw < g.kw; ++kw) {
    const int64_t off = kw * g.dw - g.pw;
    int64_t lo, hi;
    valid_range(off, g.sw, g.W, g.Wo, lo, hi);
    if (lo >= hi) continue;
    for (int64_t ih = 0; ih < g.H; ++ih) {
      T* gm = Gm + ih * g.W + (lo * g.sw + off);  // first valid tap of the row
      const T* t = Tm + ih * g.Wo;
      if (g.sw == 1) {
        for (int64_t ow = lo; ow < hi; ++ow) gm[ow - lo] += t[ow];
      } else {
        for (int64_t ow = lo; ow < hi; ++ow) gm[(ow - lo) * g.sw] += t[ow];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Direct fused path
// ---------------------------------------------------------------------------------------------
// SIMD width (bytes), output channels per micro-tile and store flavour are template parameters, so
// one body is compiled three times on x86-64: baseline (32-byte GCC vectors, emulated with SSE),
// AVX2+FMA (ymm, 6 channels x 2 vectors: 12 accumulators of 16 registers) and AVX-512 (zmm,
// 8 channels x 2 vectors: 16 accumulators of 32 registers, no padded channel blocks for the
// common multiples of 8). The best one the CPU supports is picked at run time.
enum Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

template <typename T, int VB>
struct Simd {
  typedef T vec __attribute__((vector_size(VB)));
  typedef T uvec __attribute__((vector_size(VB), aligned(sizeof(T))));  // unaligned access
  static constexpr int kLanes = VB / sizeof(T);
  static inline __attribute__((always_inline)) vec load(const T* p) { return *reinterpret_cast<const uvec*>(p); }
  static inline __attribute__((always_inline)) void store(T* p, const vec& v) { *reinterpret_cast<uvec*>(p) = v; }
};

// Non-temporal (streaming) store of one aligned vector: the output line goes to memory without
// being read first (no read-for-ownership) and without evicting the inputs from the cache. Inline
// asm, so that the shared body needs no target-specific intrinsics.
template <typename T, int VB, int ISA>
inline __attribute__((always_inline)) void stream_store(T* p, const typename Simd<T, VB>::vec& v) {
  using vec = typename Simd<T, VB>::vec;
#ifdef ROBUSTOPS_X86_DISPATCH
  if constexpr (ISA == kAvx2 && VB == 32) {
    if constexpr (sizeof(T) == 4) {
      asm volatile("vmovntps %1, %0" : "=m"(*reinterpret_cast<vec*>(p)) : "x"(v));
    } else {
      asm volatile("vmovntpd %1, %0" : "=m"(*reinterpret_cast<vec*>(p)) : "x"(v));
    }
    return;
  } else if constexpr (ISA == kAvx512 && VB == 64) {
    if constexpr (sizeof(T) == 4) {
      asm volatile("vmovntps %1, %0" : "=m"(*reinterpret_cast<vec*>(p)) : "v"(v));
    } else {
      asm volatile("vmovntpd %1, %0" : "=m"(*reinterpret_cast<vec*>(p)) : "v"(v));
    }
    return;
  }
#endif
  *reinterpret_cast<vec*>(p) = v;
}

inline void store_fence() {
#ifdef ROBUSTOPS_X86_DISPATCH
  asm volatile("sfence" ::: "memory");  // order the streaming stores before the op returns
#endif
}

constexpr int kNVec = 2;  // SIMD vectors of pixels per micro-tile

template <typename T, int VB>
inline constexpr int64_t pix_per_micro() {
  return static_cast<int64_t>(kNVec) * Simd<T, VB>::kLanes;
}

// Arguments of one direct-path task: pixels [p0, p0 + cnt) of image n, group grp.
template <typename T>
struct DirectArgs {
  const T* x;       // [N, C, H, W]
  const T* wpack;   // per group, per block of CO output channels: [K][CO]
  const T* bias;    // [Cout] or nullptr
  T* y;             // [N, Cout, Ho, Wo]
  T* cols;          // scratch [K][ldc]
  T* inv;           // scratch [ldc]
  int64_t ldc;
  T alpha, delta;
  bool stream;      // streaming stores for the output (large outputs only)
};

template <typename T, int VB, int CO, int ISA>
__attribute__((always_inline)) inline void direct_tile_impl(const DirectArgs<T>& A, const CompactConvGeom& g,
                                                            int64_t n, int64_t grp, int64_t p0, int64_t cnt) {
  using S = Simd<T, VB>;
  using vec = typename S::vec;
  constexpr int L = S::kLanes;
  constexpr int64_t PM = pix_per_micro<T, VB>();
  const int64_t K = g.Cg * g.kh * g.kw;
  const int64_t P = g.Ho * g.Wo;
  const int64_t ldc = A.ldc;
  const int64_t cnt_pad = (cnt + PM - 1) / PM * PM;
  T* __restrict__ cols = A.cols;

  // 1. im2col of this tile: cols[k][j] = x[n, grp*Cg + c, oh*sh - ph + kh*dh, ow*sw - pw + kw*dw]
  //    The tile is split into row segments (one output row each) once; then every tap copies its
  //    valid span per segment and zero-fills the padding.
  int64_t seg_oh[kMaxTile], seg_ow0[kMaxTile], seg_len[kMaxTile], seg_j[kMaxTile];
  int64_t nseg = 0;
  for (int64_t j = 0, p = p0; j < cnt; ++nseg) {
    const int64_t oh = p / g.Wo;
    const int64_t ow0 = p - oh * g.Wo;
    const int64_t len = std::min(g.Wo - ow0, cnt - j);
    seg_oh[nseg] = oh;
    seg_ow0[nseg] = ow0;
    seg_len[nseg] = len;
    seg_j[nseg] = j;
    j += len;
    p += len;
  }
  const T* xn = A.x + (n * g.C + grp * g.Cg) * g.H * g.W;
  for (int64_t c = 0; c < g.Cg; ++c) {
    const T* xc = xn + c * g.H * g.W;
    for (int64_t kh = 0; kh < g.kh; ++kh) {
      for (int64_t kw = 0; kw < g.kw; ++kw) {
        T* __restrict__ dst = cols + ((c * g.kh + kh) * g.kw + kw) * ldc;
        const int64_t offw = kw * g.dw - g.pw;
        int64_t lo, hi;
        valid_range(offw, g.sw, g.W, g.Wo, lo, hi);
        for (int64_t sgi = 0; sgi < nseg; ++sgi) {
          const int64_t ow0 = seg_ow0[sgi], ow1 = ow0 + seg_len[sgi];
          const int64_t ih = seg_oh[sgi] * g.sh - g.ph + kh * g.dh;
          T* __restrict__ d = dst + seg_j[sgi] - ow0;  // d[ow] for ow in [ow0, ow1)
          const int64_t a = std::max(ow0, lo), b = std::min(ow1, hi);
          if (ih < 0 || ih >= g.H || a >= b) {
            for (int64_t ow = ow0; ow < ow1; ++ow) d[ow] = T(0);
            continue;
          }
          for (int64_t ow = ow0; ow < a; ++ow) d[ow] = T(0);
          const T* __restrict__ src = xc + ih * g.W + (a * g.sw + offw);  // tap of output column a
          if (g.sw == 1) {
            for (int64_t ow = a; ow < b; ++ow) d[ow] = src[ow - a];
          } else {
            for (int64_t ow = a; ow < b; ++ow) d[ow] = src[(ow - a) * g.sw];
          }
          for (int64_t ow = b; ow < ow1; ++ow) d[ow] = T(0);
        }
        for (int64_t jj = cnt; jj < cnt_pad; ++jj) dst[jj] = T(0);
      }
    }
  }

  // 2. column norms -> inv[j] = alpha / (sqrt(sum_k cols[k][j]^2) + delta)
  T* __restrict__ inv = A.inv;
  for (int64_t j = 0; j < cnt_pad; ++j) inv[j] = T(0);
  for (int64_t k = 0; k < K; ++k) {
    const T* __restrict__ ck = cols + k * ldc;
    for (int64_t j = 0; j < cnt_pad; ++j) inv[j] += ck[j] * ck[j];
  }
  for (int64_t j = 0; j < cnt_pad; ++j) inv[j] = A.alpha / (std::sqrt(inv[j]) + A.delta);

  // 3. register-blocked W x with the scaling and bias folded into the store. Each (channel,
  //    micro-tile) store is PM contiguous outputs (64 bytes for float with AVX2, 128 with AVX-512):
  //    whole cache lines, written once and never re-read, streamed past the cache when large.
  const int64_t nblk = (g.Og + CO - 1) / CO;
  const T* wg = A.wpack + grp * nblk * K * CO;
  for (int64_t j0 = 0; j0 < cnt_pad; j0 += PM) {
    const int64_t valid = std::min<int64_t>(PM, cnt - j0);
    const T* __restrict__ cj = cols + j0;
    vec sc[kNVec];
    for (int v = 0; v < kNVec; ++v) sc[v] = S::load(inv + j0 + v * L);
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const T* __restrict__ wb = wg + blk * K * CO;
      vec acc[CO][kNVec];
      for (int r = 0; r < CO; ++r)
        for (int v = 0; v < kNVec; ++v) acc[r][v] = vec{};
      for (int64_t k = 0; k < K; ++k) {
        vec cv[kNVec];
        for (int v = 0; v < kNVec; ++v) cv[v] = S::load(cj + k * ldc + v * L);
        const T* wk = wb + k * CO;
        for (int r = 0; r < CO; ++r) {
          const T wr = wk[r];  // scalar * vector: broadcast
          for (int v = 0; v < kNVec; ++v) acc[r][v] += wr * cv[v];
        }
      }
      const int64_t co0 = blk * CO;
      const int rows = static_cast<int>(std::min<int64_t>(CO, g.Og - co0));
      for (int r = 0; r < rows; ++r) {
        const int64_t co = grp * g.Og + co0 + r;
        const T bv = A.bias != nullptr ? A.bias[co] : T(0);
        T* dst = A.y + (n * g.Cout + co) * P + p0 + j0;
        if (valid == PM) {
          if (A.stream && (reinterpret_cast<uintptr_t>(dst) % VB) == 0) {
            for (int v = 0; v < kNVec; ++v) stream_store<T, VB, ISA>(dst + v * L, acc[r][v] * sc[v] + bv);
          } else {
            for (int v = 0; v < kNVec; ++v) S::store(dst + v * L, acc[r][v] * sc[v] + bv);
          }
        } else {
          T tmp[PM];
          for (int v = 0; v < kNVec; ++v) S::store(tmp + v * L, acc[r][v] * sc[v] + bv);
          for (int64_t e = 0; e < valid; ++e) dst[e] = tmp[e];
        }
      }
    }
  }
}

// The three builds of the tile and the matching weight packing / tile geometry.
template <typename T>
using DirectTileFn = void (*)(const DirectArgs<T>&, const CompactConvGeom&, int64_t, int64_t, int64_t, int64_t);

template <typename T>
struct DirectKernel {
  DirectTileFn<T> tile;
  int co;       // output channels per micro-tile
  int64_t pm;   // pixels per micro-tile
  int vb;       // vector bytes (alignment of streaming stores)
};

template <typename T>
void direct_tile_base(const DirectArgs<T>& A, const CompactConvGeom& g, int64_t n, int64_t grp, int64_t p0,
                      int64_t cnt) {
  direct_tile_impl<T, 32, 6, kBase>(A, g, n, grp, p0, cnt);
}
#ifdef ROBUSTOPS_X86_DISPATCH
template <typename T>
__attribute__((target("avx2,fma"))) void direct_tile_avx2(const DirectArgs<T>& A, const CompactConvGeom& g, int64_t n,
                                                          int64_t grp, int64_t p0, int64_t cnt) {
  direct_tile_impl<T, 32, 6, kAvx2>(A, g, n, grp, p0, cnt);
}
template <typename T>
__attribute__((target("avx512f,avx2,fma"))) void direct_tile_avx512(const DirectArgs<T>& A, const CompactConvGeom& g,
                                                                    int64_t n, int64_t grp, int64_t p0, int64_t cnt) {
  direct_tile_impl<T, 64, 8, kAvx512>(A, g, n, grp, p0, cnt);
}
bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
bool cpu_has_avx512f() {
  static const bool ok = __builtin_cpu_supports("avx512f") && cpu_has_avx2_fma();
  return ok;
}
#endif

// ROBUSTOPS_COMPACT_CONV_ISA=base|avx2|avx512 caps the instruction set (for tests and benchmarks).
int isa_cap() {
  const char* s = std::getenv("ROBUSTOPS_COMPACT_CONV_ISA");
  if (s == nullptr) return kAvx512;
  const std::string v(s);
  if (v == "base") return kBase;
  if (v == "avx2") return kAvx2;
  return kAvx512;
}

template <typename T>
DirectKernel<T> pick_direct_kernel() {
  const int cap = isa_cap();
#ifdef ROBUSTOPS_X86_DISPATCH
  if (cap >= kAvx512 && cpu_has_avx512f()) return {&direct_tile_avx512<T>, 8, pix_per_micro<T, 64>(), 64};
  if (cap >= kAvx2 && cpu_has_avx2_fma()) return {&direct_tile_avx2<T>, 6, pix_per_micro<T, 32>(), 32};
#endif
  (void)cap;
  return {&direct_tile_base<T>, 6, pix_per_micro<T, 32>(), 32};
}

// Outputs at least this large are written with streaming stores (they do not fit in the caches
// anyway, and the next layer would find them evicted).
constexpr int64_t kStreamMinBytes = int64_t(4) << 20;

template <typename T>
void compact_conv2d_direct(const at::Tensor& x, const at::Tensor& w, const T* bias, const CompactConvGeom& g,
                           T alpha, T delta, at::Tensor& y) {
  const DirectKernel<T> kern = pick_direct_kernel<T>();
  const int64_t CO = kern.co;
  const int64_t PM = kern.pm;
  const int64_t K = g.Cg * g.kh * g.kw;
  const int64_t P = g.Ho * g.Wo;
  const int64_t nblk = (g.Og + CO - 1) / CO;

  // Pack the weights: per group, per block of CO output channels, [K][CO] (zero pad).
  std::vector<T> wpack(static_cast<size_t>(g.G * nblk * K * CO), T(0));
  const T* wp = w.const_data_ptr<T>();
  for (int64_t grp = 0; grp < g.G; ++grp)
    for (int64_t o = 0; o < g.Og; ++o) {
      const int64_t blk = o / CO, r = o % CO;
      const T* src = wp + (grp * g.Og + o) * K;
      T* dst = wpack.data() + ((grp * nblk + blk) * K) * CO + r;
      for (int64_t k = 0; k < K; ++k) dst[k * CO] = src[k];
    }

  // Task = (image, group, tile of output pixels). A whole image plane is one tile when it has at
  // most kMaxTile pixels and its column buffer fits kTileBytes (fewer, fuller tasks: no 16-pixel
  // remainder tiles); otherwise tiles of kTile pixels.
  const int64_t p_pad = (P + PM - 1) / PM * PM;
  const int64_t tile_px = (P <= kMaxTile && K * p_pad * static_cast<int64_t>(sizeof(T)) <= kTileBytes) ? P : kTile;
  const int64_t tiles = (P + tile_px - 1) / tile_px;
  const int64_t ldc = (std::min(P, tile_px) + PM - 1) / PM * PM;
  const int64_t ntasks = g.N * g.G * tiles;
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  // ROBUSTOPS_COMPACT_CONV_STREAM=0|1 forces the store flavour (benchmarks); default by size.
  const char* env_stream = std::getenv("ROBUSTOPS_COMPACT_CONV_STREAM");
  const bool stream = env_stream != nullptr ? std::string(env_stream) != "0"
                                            : y.numel() * static_cast<int64_t>(sizeof(T)) >= kStreamMinBytes;
  at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> cols(static_cast<size_t>(K * ldc));
    std::vector<T> inv(static_cast<size_t>(ldc));
    DirectArgs<T> A{xp, wpack.data(), bias, yp, cols.data(), inv.data(), ldc, alpha, delta, stream};
    for (int64_t t = begin; t < end; ++t) {
      const int64_t tile = t % tiles;
      const int64_t ng = t / tiles;
      const int64_t grp = ng % g.G, n = ng / g.G;
      const int64_t p0 = tile * tile_px;
      kern.tile(A, g, n, grp, p0, std::min(tile_px, P - p0));
    }
    if (stream) store_fence();
  });
}

// ---------------------------------------------------------------------------------------------
// GEMM path: ATen convolution, then per (image, group) norm map + in-place scaling.
// ---------------------------------------------------------------------------------------------
template <typename T>
void compact_scale_inplace(const at::Tensor& x, const T* bias, const CompactConvGeom& g, T alpha, T delta,
                           at::Tensor& u) {
  const T* xp = x.const_data_ptr<T>();
  T* up = u.mutable_data_ptr<T>();
  const int64_t P = g.Ho * g.Wo;
  at::parallel_for(0, g.N * g.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> Q(static_cast<size_t>(g.H * g.W)), R(static_cast<size_t>(g.H * g.Wo)), S(static_cast<size_t>(P));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / g.G, grp = t % g.G;
      patch_sumsq_plane<T>(xp + (n * g.C + grp * g.Cg) * g.H * g.W, g, Q.data(), R.data(), S.data());
      T* s = S.data();
      for (int64_t p = 0; p < P; ++p) s[p] = alpha / (std::sqrt(s[p]) + delta);
      for (int64_t o = 0; o < g.Og; ++o) {
        const int64_t co = grp * g.Og + o;
        T* __restrict__ yo = up + (n * g.Cout + co) * P;
        const T bv = bias != nullptr ? bias[co] : T(0);
        for (int64_t p = 0; p < P; ++p) yo[p] = yo[p] * s[p] + bv;
      }
    }
  });
}

at::Tensor compact_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups, const at::Tensor& alpha, double delta) {
  TORCH_CHECK(x.device().is_cpu(), "compact_conv2d (CPU kernel): x must be a CPU tensor, got ", x.device());
  const CompactConvGeom g = check_compact_conv2d_args(x, weight, bias, stride, padding, dilation, groups, alpha, delta);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "compact_conv2d (CPU kernel): x must be float32 or float64, got ", x.scalar_type());
  const double a = alpha.item<double>();
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  if (g.N == 0) return at::empty({0, g.Cout, g.Ho, g.Wo}, xc.options());

  const int64_t K = g.Cg * g.kh * g.kw;
  Impl impl = impl_override();
  if (impl == Impl::Auto) impl = K <= kDirectMaxK ? Impl::Direct : Impl::Gemm;

  at::Tensor y;
  if (impl == Impl::Direct) {
    y = at::empty({g.N, g.Cout, g.Ho, g.Wo}, xc.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "compact_conv2d_direct", [&] {
      compact_conv2d_direct<scalar_t>(xc, wc, has_bias ? bc.const_data_ptr<scalar_t>() : nullptr, g,
                                      static_cast<scalar_t>(a), static_cast<scalar_t>(delta), y);
    });
  } else {
    y = at::convolution(xc, wc, c10::nullopt, stride, padding, dilation, /*transposed=*/false, {0, 0}, groups)
            .contiguous();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "compact_conv2d_scale", [&] {
      compact_scale_inplace<scalar_t>(xc, has_bias ? bc.const_data_ptr<scalar_t>() : nullptr, g,
                                      static_cast<scalar_t>(a), static_cast<scalar_t>(delta), y);
    });
  }
  return y;
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

// Pass 1 per (image, group): recompute the norm map, write gv = gy / n (if wanted) and
// gq = (dL/dn) / sqrt(S) with dL/dn = -sum_o gy * (y - b) / n (if wanted).
template <typename T>
void compact_backward_pass1(const at::Tensor& x, const at::Tensor& gy, const at::Tensor& y, const T* bias,
                            const CompactConvGeom& g, T delta, T* gv, T* gq) {
  const T* xp = x.const_data_ptr<T>();
  const T* gyp = gy.const_data_ptr<T>();
  const T* yp = y.const_data_ptr<T>();
  const int64_t P = g.Ho * g.Wo;
  at::parallel_for(0, g.N * g.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> Q(static_cast<size_t>(g.H * g.W)), R(static_cast<size_t>(g.H * g.Wo)), S(static_cast<size_t>(P)),
        inv(static_cast<size_t>(P));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / g.G, grp = t % g.G;
      patch_sumsq_plane<T>(xp + (n * g.C + grp * g.Cg) * g.H * g.W, g, Q.data(), R.data(), S.data());
      T* s = S.data();  // becomes sqrt(S)
      for (int64_t p = 0; p < P; ++p) {
        s[p] = std::sqrt(s[p]);
        inv[p] = T(1) / (s[p] + delta);
      }
      T* acc = gq != nullptr ? gq + t * P : nullptr;
      if (acc != nullptr) std::fill(acc, acc + P, T(0));
      for (int64_t o = 0; o < g.Og; ++o) {
        const int64_t co = grp * g.Og + o;
        const int64_t base = (n * g.Cout + co) * P;
        const T* __restrict__ gyo = gyp + base;
        if (gv != nullptr) {
          T* __restrict__ gvo = gv + base;
          for (int64_t p = 0; p < P; ++p) gvo[p] = gyo[p] * inv[p];
        }
        if (acc != nullptr) {
          const T* __restrict__ yo = yp + base;
          const T bv = bias != nullptr ? bias[co] : T(0);
          for (int64_t p = 0; p < P; ++p) acc[p] += gyo[p] * (yo[p] - bv);
        }
      }
      if (acc != nullptr) {
        for (int64_t p = 0; p < P; ++p) acc[p] = s[p] > T(0) ? -acc[p] * inv[p] / s[p] : T(0);
      }
    }
  });
}

// Pass 2 per (image, group): gx = alpha * gx' + x * boxsum^T(gq), in place in gx'.
template <typename T>
void compact_backward_pass2(const at::Tensor& x, const T* gq, const CompactConvGeom& g, T alpha, at::Tensor& gx) {
  const T* xp = x.const_data_ptr<T>();
  T* gxp = gx.mutable_data_ptr<T>();
  const int64_t P = g.Ho * g.Wo;
  const int64_t HW = g.H * g.W;
  at::parallel_for(0, g.N * g.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> Tm(static_cast<size_t>(g.H * g.Wo)), Gm(static_cast<size_t>(HW));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / g.G, grp = t % g.G;
      patch_boxsum_adjoint_plane<T>(gq + t * P, g, Tm.data(), Gm.data());
      const T* __restrict__ gm = Gm.data();
      for (int64_t c = 0; c < g.Cg; ++c) {
        const int64_t off = (n * g.C + grp * g.Cg + c) * HW;
        const T* __restrict__ xc = xp + off;
        T* __restrict__ gc = gxp + off;
        for (int64_t i = 0; i < HW; ++i) gc[i] = alpha * gc[i] + xc[i] * gm[i];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> compact_conv2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& out, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    const at::Tensor& alpha, double delta, std::array<bool, 4> mask) {
  TORCH_CHECK(x.device().is_cpu(), "_compact_conv2d_backward (CPU kernel): x must be a CPU tensor, got ", x.device());
  const CompactConvGeom g = check_compact_conv2d_backward_args(grad_out, x, weight, bias, out, stride, padding,
                                                               dilation, groups, alpha, delta);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "_compact_conv2d_backward (CPU kernel): x must be float32 or float64, got ", x.scalar_type());
  const at::Tensor gy = grad_out.contiguous();
  CompactConvBackwardPlan plan = plan_compact_conv2d_backward(gy, x, weight, bias, alpha, g.N, mask);
  if (plan.done) return std::make_tuple(plan.gx, plan.gw, plan.gb, plan.ga);
  const bool has_bias = plan.has_bias, need_x = plan.need_x, need_w = plan.need_w, need_a = plan.need_a;
  at::Tensor gx = plan.gx, gw = plan.gw, gb = plan.gb, ga = plan.ga;
  const double a = alpha.item<double>();

  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  const at::Tensor yc = out.contiguous();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor gv = at::empty_like(gy, at::MemoryFormat::Contiguous);
  at::Tensor gq = need_x ? at::empty({g.N, g.G, g.Ho, g.Wo}, xc.options()) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "compact_conv2d_backward_pass1", [&] {
    compact_backward_pass1<scalar_t>(xc, gy, yc, has_bias ? bc.const_data_ptr<scalar_t>() : nullptr, g,
                                     static_cast<scalar_t>(delta), gv.mutable_data_ptr<scalar_t>(),
                                     need_x ? gq.mutable_data_ptr<scalar_t>() : nullptr);
  });

  const bool conv_w = need_w || (need_a && !need_x);
  auto grads = at::convolution_backward(gv, xc, wc, c10::nullopt, stride, padding, dilation, /*transposed=*/false,
                                        {0, 0}, groups, {need_x, conv_w, false});
  at::Tensor gx1 = std::get<0>(grads);
  at::Tensor gw1 = std::get<1>(grads);
  if (need_a) {
    // <gv, conv(x, w)> equals <grad_w', w> and <grad_x', x> (the convolution is bilinear).
    at::Tensor dot = conv_w ? at::dot(gw1.reshape(-1), wc.reshape(-1)) : at::dot(gx1.reshape(-1), xc.reshape(-1));
    ga = dot.reshape(alpha.sizes()).to(alpha.options());
  }
  if (need_w) gw = gw1.mul_(a);
  if (need_x) {
    gx = gx1.contiguous();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "compact_conv2d_backward_pass2", [&] {
      compact_backward_pass2<scalar_t>(xc, gq.const_data_ptr<scalar_t>(), g, static_cast<scalar_t>(a), gx);
    });
  }
  return std::make_tuple(gx, gw, gb, ga);
}

}  // namespace

TORCH_LIBRARY_IMPL(robustops, CPU, m) {
  m.impl("compact_conv2d", &compact_conv2d_cpu);
  m.impl("_compact_conv2d_backward", &compact_conv2d_backward_cpu);
}

}  // namespace robustops
