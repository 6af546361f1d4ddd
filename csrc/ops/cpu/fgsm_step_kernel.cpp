// CPU kernel of fgsm_step: reads x and grad once, writes all K clamped steps.
//
// Work is split into cache-sized blocks: sign(grad) for a block is computed once into a small
// buffer, then each of the K outputs is written from it. The inner loops are plain, branch-free
// and contiguous so the compiler vectorises them for whatever ISA the wheel targets.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../fgsm_step_checks.h"

namespace robustops {
namespace {

constexpr int64_t kBlock = 1024;        // elements per inner block (fits L1 with x and sign)
constexpr int64_t kGrain = 16 * kBlock;  // elements per parallel task

template <typename scalar_t>
void fgsm_step_loop(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                    const std::vector<scalar_t>& eps, scalar_t lo, scalar_t hi,
                    scalar_t* __restrict__ out, int64_t n) {
  const int64_t K = static_cast<int64_t>(eps.size());
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    scalar_t sign[kBlock];
    for (int64_t start = begin; start < end; start += kBlock) {
      const int64_t len = std::min(kBlock, end - start);
      const scalar_t* xb = x + start;
      const scalar_t* gb = g + start;
      for (int64_t j = 0; j < len; ++j) {
        // torch.sign semantics: sign(0) = 0, and NaN compares false both ways -> 0.
        sign[j] = static_cast<scalar_t>(gb[j] > scalar_t(0)) - static_cast<scalar_t>(gb[j] < scalar_t(0));
      }
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t e = eps[k];
        scalar_t* ob = out + k * n + start;
        for (int64_t j = 0; j < len; ++j) {
          const scalar_t v = xb[j] + e * sign[j];
          // max then min in this order keeps NaN in x as NaN, like torch.clamp.
          ob[j] = std::min(std::max(v, lo), hi);
        }
      }
    }
  });
}

at::Tensor fgsm_step_cpu(const at::Tensor& x, const at::Tensor& grad, const at::Tensor& eps,
                         double lo, double hi) {
  TORCH_CHECK(x.device().is_cpu(), "fgsm_step (CPU kernel): x must be a CPU tensor, got ", x.device());
  const std::vector<double> eps_values = check_fgsm_step_args(x, grad, eps, lo, hi);
  const int64_t K = static_cast<int64_t>(eps_values.size());

  const at::Tensor xc = x.contiguous();
  const at::Tensor gc = grad.contiguous();
  std::vector<int64_t> out_shape{K};
  out_shape.insert(out_shape.end(), x.sizes().begin(), x.sizes().end());
  at::Tensor out = at::empty(out_shape, xc.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = xc.numel();
  if (n == 0) return out;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fgsm_step_cpu", [&] {
    // Step sizes are rounded to the tensor dtype first, exactly as `x + eps * grad.sign()` does.
    std::vector<scalar_t> e(eps_values.begin(), eps_values.end());
    fgsm_step_loop<scalar_t>(xc.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(), e,
                             static_cast<scalar_t>(lo), static_cast<scalar_t>(hi),
                             out.mutable_data_ptr<scalar_t>(), n);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(robustops, CPU, m) {
  m.impl("fgsm_step", &fgsm_step_cpu);
}

}  // namespace robustops
