// PRM CPU kernel: the ops' tensor arguments read and checked (options,
// parameters as doubles, map shapes).
#pragma once

#include <ATen/ATen.h>
#include <vector>

#include "prm_passes.h"
#include "prm_types.h"

namespace prm_det {
namespace {

Options make_options(const at::Tensor& x, int64_t groups, bool use_position,
                     bool use_norm, bool normalized, double eps) {
  TORCH_CHECK(x.dim() == 4, "prm_det: PRM expects a 4-d [b, c, h, w] map, got ",
              x.dim(), " dims");
  TORCH_CHECK(groups > 0 && x.size(1) % groups == 0,
              "prm_det: channels (", x.size(1),
              ") must be divisible by groups (", groups, ")");
  Options o;
  o.groups = groups;
  o.cg = x.size(1) / groups;
  o.h = x.size(2);
  o.w = x.size(3);
  o.P = o.h * o.w;
  o.use_position = use_position;
  o.use_norm = use_norm;
  o.normalized = normalized;
  o.eps = eps;
  return o;
}

// PRM's six parameters, in the official order (weight = lambda, bias = xi,
// one = beta, zero = alpha, theta, scale = sigma), any shape of the right
// size; contiguous copies of the map's dtype.
struct PRMParams {
  std::vector<at::Tensor> t;  // lam, xi, beta, alpha, theta, sigma
  std::vector<double> per_group[4];  // lam, xi, beta, alpha
  double theta_row, theta_col, sigma;
  std::vector<double> gauss;  // distance_gaussians (with use_position)
  int64_t h;
  PRMParams(const at::Tensor& x, const Options& o,
            std::initializer_list<at::Tensor> params)
      : h(o.h) {
    const int64_t groups = o.groups;
    const int64_t sizes[6] = {groups, groups, groups, groups, 2, 1};
    const char* names[6] = {"weight", "bias", "one", "zero", "theta",
                            "scale"};
    int i = 0;
    for (const auto& p : params) {
      TORCH_CHECK(p.device().is_cpu() && p.numel() == sizes[i],
                  "prm_det: PRM's ", names[i], " must be a CPU tensor of ",
                  sizes[i], " values, got ", p.sizes());
      // (to() and contiguous() are dispatcher calls even when they have
      // nothing to do: skipped for the usual, already right, parameters)
      t.push_back(p.scalar_type() == x.scalar_type() && p.is_contiguous()
                      ? p
                      : p.to(x.scalar_type()).contiguous());
      ++i;
    }
    // every value as a double, read once here rather than once per group
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "prm_det_params", [&] {
      for (int j = 0; j < 4; ++j) {
        const scalar_t* v = t[j].data_ptr<scalar_t>();
        per_group[j].assign(v, v + groups);
      }
      const scalar_t* theta = t[4].data_ptr<scalar_t>();
      theta_row = double(theta[0]);
      theta_col = double(theta[1]);
      sigma = double(t[5].data_ptr<scalar_t>()[0]);
    });
    if (o.use_position)
      gauss = distance_gaussians(o, theta_row, theta_col, sigma);
  }
  Params group(int64_t g) const {
    return Params{per_group[0][g], per_group[1][g], per_group[2][g],
                  per_group[3][g], theta_row,       theta_col,
                  sigma,           gauss.empty() ? nullptr : gauss.data(),
                  gauss.empty() ? nullptr : gauss.data() + h};
  }
};

void check_map(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() &&
                  t.sizes() == like.sizes() &&
                  t.scalar_type() == like.scalar_type(),
              "prm_det: ", name, " must be a contiguous CPU tensor of shape ",
              like.sizes(), " and dtype ", like.scalar_type());
}

bool given(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

// whether two contiguous maps' bytes overlap
bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  const auto pa = reinterpret_cast<uintptr_t>(a.data_ptr());
  const auto pb = reinterpret_cast<uintptr_t>(b.data_ptr());
  return pa < pb + b.nbytes() && pb < pa + a.nbytes();
}
// values of a small CPU tensor as doubles (no torch ops: dispatching a few
// of them per block would cost more than the arithmetic)
std::vector<double> doubles(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.numel() == n, "prm_det: BatchNorm ",
              name, " must be a CPU tensor of ", n, " values, got ",
              t.sizes());
  const at::Tensor u = t.is_contiguous() ? t : t.contiguous();
  std::vector<double> out(n);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, u.scalar_type(), "prm_det_doubles", [&] {
        const scalar_t* p = u.data_ptr<scalar_t>();
        for (int64_t i = 0; i < n; ++i) out[i] = static_cast<double>(p[i]);
      });
  return out;
}

}  // namespace
}  // namespace prm_det
