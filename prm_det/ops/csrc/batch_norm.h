// PRM CPU kernel: BatchNorm folded in (its per-channel affine, batch
// statistics, running-statistics update as native_batch_norm).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "tensor_args.h"

namespace prm_det {
namespace {

// A BatchNorm's per-channel view: x = c * a + shift and
// xhat = (c - mean) * invstd, with the statistics the forward normalized
// with. One [4, C] table in c's dtype: mean, invstd, a, shift (held in
// doubles, room for either dtype: no tensor allocated per call).
struct NormView {
  std::vector<double> table;
  int64_t C;
  template <typename T>
  const T* row(int64_t i) const {
    return reinterpret_cast<const T*>(table.data()) + i * C;
  }
};

NormView norm_view(const at::Tensor& c, const c10::optional<at::Tensor>& weight,
                   const c10::optional<at::Tensor>& bias,
                   const c10::optional<at::Tensor>& running_mean,
                   const c10::optional<at::Tensor>& running_var,
                   const at::Tensor& save_mean, const at::Tensor& save_invstd,
                   bool training, double bn_eps) {
  const int64_t C = c.size(1);
  std::vector<double> mean, stat;  // stat: invstd (eval: var, made invstd)
  if (training) {
    mean = doubles(save_mean, C, "save_mean");
    stat = doubles(save_invstd, C, "save_invstd");
  } else {
    TORCH_CHECK(given(running_mean) && given(running_var),
                "prm_det: BatchNorm in eval mode needs running statistics");
    mean = doubles(*running_mean, C, "running_mean");
    stat = doubles(*running_var, C, "running_var");
  }
  const std::vector<double> w =
      given(weight) ? doubles(*weight, C, "weight") : std::vector<double>();
  const std::vector<double> b =
      given(bias) ? doubles(*bias, C, "bias") : std::vector<double>();
  if (!training) {
    // var -> invstd, a vector at a time (built with -fno-math-errno: a
    // square root that may set errno stays scalar, 2048 of them per call
    // were most of this function's time)
    double* v = stat.data();
#pragma omp simd
    for (int64_t ch = 0; ch < C; ++ch) v[ch] = 1.0 / std::sqrt(v[ch] + bn_eps);
  }
  NormView nv{std::vector<double>(4 * C), C};
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "prm_det_norm_view", [&] {
    scalar_t* o = reinterpret_cast<scalar_t*>(nv.table.data());
    for (int64_t ch = 0; ch < C; ++ch) {
      const double invstd = stat[ch];
      const double a = w.empty() ? invstd : invstd * w[ch];
      o[ch] = static_cast<scalar_t>(mean[ch]);
      o[C + ch] = static_cast<scalar_t>(invstd);
      o[2 * C + ch] = static_cast<scalar_t>(a);
      o[3 * C + ch] =
          static_cast<scalar_t>((b.empty() ? 0.0 : b[ch]) - mean[ch] * a);
    }
  });
  return nv;
}

// BatchNorm's batch statistics of c [b, C, P] per channel, in double: the
// mean and the biased variance, from sums shifted by the channel's first
// value (one pass, without the cancellation of plain sums of squares).
template <typename T>
void batch_stats(const T* c, int64_t b, int64_t C, int64_t P, double* mean,
                 double* var) {
  const double count = double(b) * P;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(
                                                 1, b * P));
  at::parallel_for(0, C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      const double x0 = double(c[ch * P]);
      double s1 = 0, s2 = 0;
      for (int64_t i = 0; i < b; ++i) {
        const T* __restrict__ row = c + (i * C + ch) * P;
#pragma omp simd reduction(+ : s1, s2)
        for (int64_t k = 0; k < P; ++k) {
          const double d = double(row[k]) - x0;
          s1 += d;
          s2 += d * d;
        }
      }
      const double m = s1 / count;
      mean[ch] = x0 + m;
      var[ch] = std::max(s2 / count - m * m, 0.0);
    }
  });
}

// BatchNorm in training from c's batch statistics, as native_batch_norm:
// returns save_mean and save_invstd (c's dtype) and updates the running
// statistics (momentum, unbiased variance) when given.
std::pair<at::Tensor, at::Tensor> batch_norm_stats(
    const at::Tensor& c, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, double momentum,
    double bn_eps) {
  const int64_t b = c.size(0), C = c.size(1), P = c.numel() / (b * C);
  std::vector<double> mean(C), var(C);
  at::Tensor save_mean = at::empty({C}, c.options());
  at::Tensor save_invstd = at::empty({C}, c.options());
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "prm_det_batch_stats", [&] {
    batch_stats(c.data_ptr<scalar_t>(), b, C, P, mean.data(), var.data());
    scalar_t* sm = save_mean.data_ptr<scalar_t>();
    scalar_t* si = save_invstd.data_ptr<scalar_t>();
    for (int64_t ch = 0; ch < C; ++ch) {
      sm[ch] = static_cast<scalar_t>(mean[ch]);
      si[ch] = static_cast<scalar_t>(1.0 / std::sqrt(var[ch] + bn_eps));
    }
  });
  const double unbias = double(b * P) / double(b * P - 1);
  auto update = [&](const c10::optional<at::Tensor>& running,
                    const std::vector<double>& batch, double factor,
                    const char* name) {
    if (!given(running)) return;
    TORCH_CHECK(running->device().is_cpu() && running->is_contiguous() &&
                    running->numel() == C,
                "prm_det: BatchNorm ", name, " must be a contiguous CPU "
                "tensor of ", C, " values, got ", running->sizes());
    AT_DISPATCH_FLOATING_TYPES(running->scalar_type(), "prm_det_running", [&] {
      scalar_t* r = running->data_ptr<scalar_t>();
      for (int64_t ch = 0; ch < C; ++ch)
        r[ch] = static_cast<scalar_t>((1 - momentum) * double(r[ch]) +
                                      momentum * batch[ch] * factor);
    });
  };
  update(running_mean, mean, 1.0, "running_mean");
  update(running_var, var, unbias, "running_var");
  return {save_mean, save_invstd};
}

}  // namespace
}  // namespace prm_det
