// PRM with dot-product similarity on CPU: forward and backward, one group
// (a [cg, P] block of one sample's contiguous channels) at a time, groups in
// parallel. Compiled at first use by prm_det/ops/cpu_kernel.py.
//
// The math is prm_det/ops/prm.py's (_gate_forward / _apply_gate /
// _gate_backward); this file arranges it so that a group's block is read a
// few times while it sits in cache, instead of once per eager op:
//
//   forward   pass 1  channel sums (-> query position) and channel means
//             pass 2  q . x_p and z . x_p for every position
//             (small) position weight, S, normalization, gate    [P]
//             pass 3  y = x * gate (+ identity, ReLU)
//   backward  pass 1  masked dL/dy, dL/dgate and (recomputed) q . x_p, z . x_p
//             (small) gradients through the gate, normalization, Gaussians
//             pass 2  per channel: the key gradients (a reduction over the
//                     row), then that row of dL/dx
//
// Only the query index, the query and context vectors and two statistics per
// group are kept between forward and backward; the gate and the similarity
// maps are recomputed from them in backward (exactly: the same code runs).
// Backward can take the block's pre-BatchNorm map with the per-channel affine
// instead of x, recomputing x on the fly (see _BatchNormPRM in prm.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <bit>
#include <vector>

namespace prm_det {
namespace {

constexpr double kInvSqrt2Pi = 0.39894228040143267794;
// the variance is clamped to this before the square root (prm.py _TINY_VAR)
constexpr double kTinyVar = 1e-30;
constexpr double kTinyStd = 1e-15;  // sqrt(kTinyVar)

struct Options {
  int64_t groups, cg, h, w, P;
  bool use_position, use_norm, normalized;
  double eps;
};

// One group's parameters and fixed per-layer ones, in double.
struct Params {
  double lam, xi, beta, alpha, theta_row, theta_col, sigma;
};

// Per-group state kept from forward for backward.
struct State {
  int64_t query_index;
  double mean, std;  // of S over the positions (mean 0, std 1 if !use_norm)
};

// exp for float that the compiler vectorizes (std::exp is a scalar libm
// call here): range reduction by ln 2 and Cephes' degree-6 polynomial for
// expf, relative error ~2e-7 (about an ulp). Double keeps std::exp.
inline float vexp(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.7f ? 88.7f : x;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (std::floor would keep
  // the loop scalar)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return e * std::bit_cast<float>(bits);
}
inline double vexp(double x) { return std::exp(x); }

template <typename T>
inline T sigmoid(T v) {
  return T(1) / (T(1) + vexp(-v));
}

// Row and column halves of the position weight: D[i * w + j] = hr[i] + hc[j]
// (the mean of two 1-D Gaussians, the 1/2 in each table).
template <typename T>
void position_tables(const Options& o, const Params& p, int64_t qi, T* hr,
                     T* hc) {
  const int64_t qr = qi / o.w, qc = qi % o.w;
  const double sr = o.normalized ? 1.0 / std::max<int64_t>(o.h - 1, 1) : 1.0;
  const double sc = o.normalized ? 1.0 / std::max<int64_t>(o.w - 1, 1) : 1.0;
  const double norm = 0.5 * kInvSqrt2Pi / p.sigma;
  for (int64_t i = 0; i < o.h; ++i) {
    const double t = p.theta_row * std::abs(i - qr) * sr / p.sigma;
    hr[i] = static_cast<T>(norm * std::exp(-0.5 * t * t));
  }
  for (int64_t j = 0; j < o.w; ++j) {
    const double t = p.theta_col * std::abs(j - qc) * sc / p.sigma;
    hc[j] = static_cast<T>(norm * std::exp(-0.5 * t * t));
  }
}

// S = alpha * (q . x_p) * D_p + beta * (z . x_p), into s.
template <typename T>
void similarity_map(const Options& o, const Params& p, const T* sq,
                    const T* sz, const T* hr, const T* hc, T* s) {
  const T alpha = static_cast<T>(p.alpha), beta = static_cast<T>(p.beta);
  if (!o.use_position) {
#pragma omp simd
    for (int64_t k = 0; k < o.P; ++k) s[k] = alpha * sq[k] + beta * sz[k];
    return;
  }
  for (int64_t i = 0; i < o.h; ++i) {
    const T r = hr[i];
    const int64_t base = i * o.w;
#pragma omp simd
    for (int64_t j = 0; j < o.w; ++j)
      s[base + j] = alpha * sq[base + j] * (r + hc[j]) + beta * sz[base + j];
  }
}

// The gain multiplying (S - mean) before the bias and the sigmoid.
inline double gate_gain(const Options& o, const Params& p, const State& st) {
  return o.use_norm ? p.lam / (st.std + o.eps) : p.lam;
}

// gate_p = sigmoid(xi + gain * (S_p - mean)), in place over s.
template <typename T>
void gate_from_map(const Options& o, const Params& p, const State& st, T* s) {
  const T gain = static_cast<T>(gate_gain(o, p, st));
  const T mean = static_cast<T>(st.mean), xi = static_cast<T>(p.xi);
  if (o.use_norm && o.P == 1) {  // the normalized value is defined as 0
    s[0] = sigmoid(xi);
    return;
  }
#pragma omp simd
  for (int64_t k = 0; k < o.P; ++k) s[k] = sigmoid(xi + gain * (s[k] - mean));
}

template <typename T>
Params group_params(const Options& o, int64_t group, const T* lam,
                    const T* xi, const T* beta, const T* alpha,
                    const T* theta, const T* sigma) {
  return Params{double(lam[group]),  double(xi[group]),
                double(beta[group]), double(alpha[group]),
                double(theta[0]),    double(theta[1]),
                double(sigma[0])};
}

template <typename T, bool HasIdentity, bool Relu>
void forward_group(const Options& o, const Params& p, const T* x,
                   const T* identity, T* y, T* query, T* context, State& st,
                   T* colsum, T* sq, T* sz, T* hr, T* hc) {
  const int64_t P = o.P, cg = o.cg;
  // pass 1: the channel sum at every position and every channel's mean
  std::fill(colsum, colsum + P, T(0));
  for (int64_t c = 0; c < cg; ++c) {
    const T* row = x + c * P;
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < P; ++k) {
      colsum[k] += row[k];
      acc += row[k];
    }
    context[c] = acc / static_cast<T>(P);
  }
  T top = colsum[0];
#pragma omp simd reduction(max : top)
  for (int64_t k = 0; k < P; ++k) top = std::max(top, colsum[k]);
  int64_t qi = 0;  // the first maximum, as torch.argmax
  while (qi < P - 1 && !(colsum[qi] == top)) ++qi;
  st.query_index = qi;
  for (int64_t c = 0; c < cg; ++c) query[c] = x[c * P + qi];

  // pass 2: both similarities
  std::fill(sq, sq + P, T(0));
  std::fill(sz, sz + P, T(0));
  for (int64_t c = 0; c < cg; ++c) {
    const T* row = x + c * P;
    const T qc = query[c], zc = context[c];
#pragma omp simd
    for (int64_t k = 0; k < P; ++k) {
      sq[k] += qc * row[k];
      sz[k] += zc * row[k];
    }
  }
  if (o.use_position) position_tables(o, p, qi, hr, hc);
  T* s = colsum;  // reused
  similarity_map(o, p, sq, sz, hr, hc, s);
  if (o.use_norm) {
    double sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t k = 0; k < P; ++k) sum += s[k];
    const double mean = sum / P;
    double sq_dev = 0;
#pragma omp simd reduction(+ : sq_dev)
    for (int64_t k = 0; k < P; ++k) {
      const double d = s[k] - mean;
      sq_dev += d * d;
    }
    const double var = sq_dev / std::max<int64_t>(P - 1, 1);
    st.mean = mean;
    st.std = std::sqrt(std::max(var, kTinyVar));
  } else {
    st.mean = 0;
    st.std = 1;
  }
  gate_from_map(o, p, st, s);

  // pass 3: y = x * gate (+ identity, ReLU)
  for (int64_t c = 0; c < cg; ++c) {
    const T* row = x + c * P;
    const T* id = HasIdentity ? identity + c * P : nullptr;
    T* out = y + c * P;
#pragma omp simd
    for (int64_t k = 0; k < P; ++k) {
      T v = row[k] * s[k];
      if (HasIdentity) v += id[k];
      if (Relu) v = v > T(0) ? v : T(0);
      out[k] = v;
    }
  }
}

// Gradients of one group's parameters (summed over the batch afterwards).
struct ParamGrads {
  double lam = 0, xi = 0, beta = 0, alpha = 0, theta_row = 0, theta_col = 0,
         sigma = 0;
};

// x for backward: the saved map itself, or the pre-BatchNorm map c with the
// per-channel affine x = c * a + b recomputed on the fly.
template <typename T, bool FromNorm>
struct Source {
  const T* data;  // the group's [cg, P] block of x or c
  const T* a;     // the group's cg affine scales (FromNorm)
  const T* b;     // and shifts
  inline T at(int64_t c, int64_t k, int64_t P) const {
    if (FromNorm) return data[c * P + k] * a[c] + b[c];
    return data[c * P + k];
  }
};

template <typename T, bool FromNorm, bool Relu>
void backward_group(const Options& o, const Params& p, const State& st,
                    const Source<T, FromNorm>& src, const T* grad_y,
                    const T* y, const T* query, const T* context,
                    T* grad_x, T* masked, ParamGrads& pg, T* gg, T* sq,
                    T* sz, T* s, T* c0, T* c1, T* hr, T* hc, double* ghr,
                    T* ghc) {
  const int64_t P = o.P, cg = o.cg, qi = st.query_index;
  // pass 1: dL/dgate = sum_c g x; q . x and z . x again; the ReLU mask
  std::fill(gg, gg + P, T(0));
  std::fill(sq, sq + P, T(0));
  std::fill(sz, sz + P, T(0));
  for (int64_t c = 0; c < cg; ++c) {
    const T* gy = grad_y + c * P;
    const T* yr = Relu ? y + c * P : nullptr;
    T* mr = Relu ? masked + c * P : nullptr;
    const T qc = query[c], zc = context[c];
#pragma omp simd
    for (int64_t k = 0; k < P; ++k) {
      const T xv = src.at(c, k, P);
      T g = gy[k];
      if (Relu) {
        g = yr[k] > T(0) ? g : T(0);
        mr[k] = g;
      }
      gg[k] += g * xv;
      sq[k] += qc * xv;
      sz[k] += zc * xv;
    }
  }
  if (o.use_position) position_tables(o, p, qi, hr, hc);
  similarity_map(o, p, sq, sz, hr, hc, s);  // S
  T* gate = c0;
  std::copy(s, s + P, gate);
  gate_from_map(o, p, st, gate);

  // through the sigmoid, the affine and the normalization
  double sum_grad = 0, dot_centered = 0;
  const T mean = static_cast<T>(st.mean);
#pragma omp simd reduction(+ : sum_grad, dot_centered)
  for (int64_t k = 0; k < P; ++k) {
    const T gpre = gg[k] * gate[k] * (T(1) - gate[k]);
    gg[k] = gpre;  // gg now holds dL/d(pre-sigmoid)
    sum_grad += gpre;
    dot_centered += double(gpre) * (s[k] - mean);
  }
  pg.xi += sum_grad;
  T* grad_s = c1;
  if (o.use_norm && P == 1) {  // the normalized value is constant 0
    pg.lam += 0.0;
    grad_s[0] = T(0);
  } else if (o.use_norm) {
    const double inv = 1.0 / (st.std + o.eps);
    const double grad_lam = inv * dot_centered;
    pg.lam += grad_lam;
    const double gain_d = p.lam * inv;
    const T gain = static_cast<T>(gain_d);
    const T std_term = static_cast<T>(
        st.std > kTinyStd ? -gain_d * grad_lam / ((P - 1) * st.std) : 0.0);
    const T shift = static_cast<T>(-gain_d * sum_grad / P);
#pragma omp simd
    for (int64_t k = 0; k < P; ++k)
      grad_s[k] = gain * gg[k] + shift + (s[k] - mean) * std_term;
  } else {
    pg.lam += dot_centered;
    const T lam = static_cast<T>(p.lam);
#pragma omp simd
    for (int64_t k = 0; k < P; ++k) grad_s[k] = lam * gg[k];
  }

  // S = alpha (q.x) D + beta (z.x): D's gradient goes to theta and sigma;
  // the coefficient of q.x per position goes to gg (no longer needed)
  T* coef_q = gg;
  if (o.use_position) {
    // dL/dD = grad_s * alpha (q.x), summed along rows and columns
    const T alpha = static_cast<T>(p.alpha);
    std::fill(ghc, ghc + o.w, T(0));
    for (int64_t i = 0; i < o.h; ++i) {
      const int64_t base = i * o.w;
      const T r = hr[i];
      double row_acc = 0;
#pragma omp simd reduction(+ : row_acc)
      for (int64_t j = 0; j < o.w; ++j) {
        const T gs = grad_s[base + j];
        const T gd = gs * alpha * sq[base + j];
        row_acc += gd;
        ghc[j] += gd;
        coef_q[base + j] = gs * (r + hc[j]);
      }
      ghr[i] = row_acc;
    }
    // G(t) = exp(-t^2 / 2 sigma^2) / (sigma sqrt(2 pi)), t = theta d:
    // dG/dt = -t / sigma^2 G,  dG/dsigma = G (t^2 / sigma^2 - 1) / sigma
    const int64_t qr = qi / o.w, qcol = qi % o.w;
    const double sr =
        o.normalized ? 1.0 / std::max<int64_t>(o.h - 1, 1) : 1.0;
    const double sc =
        o.normalized ? 1.0 / std::max<int64_t>(o.w - 1, 1) : 1.0;
    const double inv_var = 1.0 / (p.sigma * p.sigma);
    double g_sigma = 0;
    for (int64_t i = 0; i < o.h; ++i) {
      const double d = std::abs(i - qr) * sr, t = p.theta_row * d;
      const double gh = ghr[i] * double(hr[i]);
      pg.theta_row += -gh * t * inv_var * d;
      g_sigma += gh * (t * t * inv_var - 1.0);
    }
    for (int64_t j = 0; j < o.w; ++j) {
      const double d = std::abs(j - qcol) * sc, t = p.theta_col * d;
      const double gh = double(ghc[j]) * double(hc[j]);
      pg.theta_col += -gh * t * inv_var * d;
      g_sigma += gh * (t * t * inv_var - 1.0);
    }
    pg.sigma += g_sigma / p.sigma;
  } else {
    std::copy(grad_s, grad_s + P, coef_q);
  }

  // pass 2, one channel at a time: the key gradients (row reductions), then
  // the row of dL/dx = g gate + alpha q_c coef_q + beta z_c grad_s
  //                    + (context's gradient) / P, + query's at qi
  const T* g_src = Relu ? masked : grad_y;
  const T alpha = static_cast<T>(p.alpha), beta = static_cast<T>(p.beta);
  const T inv_p = T(1) / static_cast<T>(P);
  double grad_alpha = 0, grad_beta = 0;
  for (int64_t c = 0; c < cg; ++c) {
    T gkq = 0, gkz = 0;
#pragma omp simd reduction(+ : gkq, gkz)
    for (int64_t k = 0; k < P; ++k) {
      const T xv = src.at(c, k, P);
      gkq += xv * coef_q[k];
      gkz += xv * grad_s[k];
    }
    grad_alpha += double(query[c]) * gkq;
    grad_beta += double(context[c]) * gkz;
    const T kq = alpha * query[c], kz = beta * context[c];
    const T gz = beta * gkz * inv_p;
    const T* g = g_src + c * P;
    T* out = grad_x + c * P;
#pragma omp simd
    for (int64_t k = 0; k < P; ++k)
      out[k] = g[k] * gate[k] + kq * coef_q[k] + kz * grad_s[k] + gz;
    out[qi] += alpha * gkq;
  }
  pg.alpha += grad_alpha;
  pg.beta += grad_beta;
}

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

void check_param(const at::Tensor& t, const at::Tensor& x, int64_t numel,
                 const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == x.scalar_type() &&
                  t.is_contiguous() && t.numel() == numel,
              "prm_det: ", name, " must be a contiguous CPU tensor of ", numel,
              " ", x.scalar_type(), " values");
}

// Returns y, query_index [n] (int64), query [n, cg], context [n, cg] and the
// statistics [n, 2] (mean and std of S) that backward needs.
std::vector<at::Tensor> prm_forward(
    const at::Tensor& x, const c10::optional<at::Tensor>& identity, bool relu,
    const at::Tensor& lam, const at::Tensor& xi, const at::Tensor& beta,
    const at::Tensor& alpha, const at::Tensor& theta, const at::Tensor& sigma,
    int64_t groups, bool use_position, bool use_norm, bool normalized,
    double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(),
              "prm_det: the CPU kernel takes contiguous CPU maps");
  const Options o =
      make_options(x, groups, use_position, use_norm, normalized, eps);
  for (auto* t : {&lam, &xi, &beta, &alpha}) check_param(*t, x, groups, "a group parameter");
  check_param(theta, x, 2, "theta");
  check_param(sigma, x, 1, "sigma");
  const bool has_identity = identity.has_value() && identity->defined();
  if (has_identity)
    TORCH_CHECK(identity->sizes() == x.sizes() && identity->is_contiguous() &&
                    identity->scalar_type() == x.scalar_type(),
                "prm_det: identity must be contiguous and match x");
  const int64_t n = x.size(0) * groups;
  auto y = at::empty_like(x);
  auto query_index = at::empty({n}, x.options().dtype(at::kLong));
  auto query = at::empty({n, o.cg}, x.options());
  auto context = at::empty({n, o.cg}, x.options());
  auto stats = at::empty({n, 2}, x.options().dtype(at::kDouble));
  if (n == 0 || o.P == 0) return {y, query_index, query, context, stats};

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "prm_det_forward", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    const T* ip = has_identity ? identity->data_ptr<T>() : nullptr;
    T* yp = y.data_ptr<T>();
    int64_t* qip = query_index.data_ptr<int64_t>();
    T* qp = query.data_ptr<T>();
    T* zp = context.data_ptr<T>();
    double* sp = stats.data_ptr<double>();
    const int64_t block = o.cg * o.P;
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> buf(3 * o.P + o.h + o.w);
      T *colsum = buf.data(), *sq = colsum + o.P, *sz = sq + o.P,
        *hr = sz + o.P, *hc = hr + o.h;
      for (int64_t k = begin; k < end; ++k) {
        const Params p = group_params(
            o, k % groups, lam.data_ptr<T>(), xi.data_ptr<T>(),
            beta.data_ptr<T>(), alpha.data_ptr<T>(), theta.data_ptr<T>(),
            sigma.data_ptr<T>());
        State st;
        const T* idk = has_identity ? ip + k * block : nullptr;
        auto run = [&](auto fn) {
          fn(o, p, xp + k * block, idk, yp + k * block, qp + k * o.cg,
             zp + k * o.cg, st, colsum, sq, sz, hr, hc);
        };
        if (has_identity && relu) run(forward_group<T, true, true>);
        else if (has_identity) run(forward_group<T, true, false>);
        else if (relu) run(forward_group<T, false, true>);
        else run(forward_group<T, false, false>);
        qip[k] = st.query_index;
        sp[2 * k] = st.mean;
        sp[2 * k + 1] = st.std;
      }
    });
  });
  return {y, query_index, query, context, stats};
}

// Gradients of y = x * gate(x) (+ identity, ReLU): returns grad_x, the
// masked upstream gradient (the identity's gradient; empty without relu), and the parameter gradients lambda [g], xi [g], beta [g],
// alpha [g], theta [2], sigma [1].
// ``source`` is x, or the pre-BatchNorm map when norm_scale / norm_shift
// (per channel, [c]) are given: x = source * norm_scale + norm_shift.
std::vector<at::Tensor> prm_backward(
    const at::Tensor& grad_y, const c10::optional<at::Tensor>& y,
    const at::Tensor& source, const c10::optional<at::Tensor>& norm_scale,
    const c10::optional<at::Tensor>& norm_shift,
    const at::Tensor& query_index, const at::Tensor& query,
    const at::Tensor& context, const at::Tensor& stats, const at::Tensor& lam,
    const at::Tensor& xi, const at::Tensor& beta, const at::Tensor& alpha,
    const at::Tensor& theta, const at::Tensor& sigma, int64_t groups,
    bool use_position, bool use_norm, bool normalized, double eps) {
  TORCH_CHECK(source.device().is_cpu() && source.is_contiguous() &&
                  grad_y.is_contiguous() && grad_y.sizes() == source.sizes() &&
                  grad_y.scalar_type() == source.scalar_type(),
              "prm_det: backward takes contiguous CPU maps of one shape");
  const Options o =
      make_options(source, groups, use_position, use_norm, normalized, eps);
  const bool relu = y.has_value() && y->defined();
  const bool from_norm = norm_scale.has_value() && norm_scale->defined();
  if (relu)
    TORCH_CHECK(y->is_contiguous() && y->sizes() == source.sizes(),
                "prm_det: y must be contiguous and match the map");
  if (from_norm) {
    check_param(*norm_scale, source, source.size(1), "norm_scale");
    TORCH_CHECK(norm_shift.has_value() && norm_shift->defined(),
                "prm_det: norm_shift goes with norm_scale");
    check_param(*norm_shift, source, source.size(1), "norm_shift");
  }
  const int64_t b = source.size(0), n = b * groups;
  auto grad_x = at::empty_like(source);
  // (an empty tensor stands for "none": a Tensor[] holds no undefined ones)
  at::Tensor masked =
      relu ? at::empty_like(source) : at::empty({0}, source.options());
  // per (sample, group): lam, xi, beta, alpha, theta_row, theta_col, sigma
  auto partial = at::zeros({n, 7}, source.options().dtype(at::kDouble));

  if (n > 0 && o.P > 0) {
    AT_DISPATCH_FLOATING_TYPES(source.scalar_type(), "prm_det_backward", [&] {
      using T = scalar_t;
      const T* src = source.data_ptr<T>();
      const T* gyp = grad_y.data_ptr<T>();
      const T* yp = relu ? y->data_ptr<T>() : nullptr;
      const T* ap = from_norm ? norm_scale->data_ptr<T>() : nullptr;
      const T* bp = from_norm ? norm_shift->data_ptr<T>() : nullptr;
      T* gxp = grad_x.data_ptr<T>();
      T* mp = relu ? masked.data_ptr<T>() : nullptr;
      const int64_t* qip = query_index.data_ptr<int64_t>();
      const T* qp = query.data_ptr<T>();
      const T* zp = context.data_ptr<T>();
      const double* sp = stats.data_ptr<double>();
      double* pp = partial.data_ptr<double>();
      const int64_t block = o.cg * o.P;
      at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
        std::vector<T> buf(6 * o.P + o.h + 2 * o.w);
        std::vector<double> ghr(o.h);
        T *gg = buf.data(), *sq = gg + o.P, *sz = sq + o.P, *s = sz + o.P,
          *c0 = s + o.P, *c1 = c0 + o.P, *hr = c1 + o.P, *hc = hr + o.h,
          *ghc = hc + o.w;
        for (int64_t k = begin; k < end; ++k) {
          const int64_t group = k % groups;
          const Params p = group_params(
              o, group, lam.data_ptr<T>(), xi.data_ptr<T>(),
              beta.data_ptr<T>(), alpha.data_ptr<T>(), theta.data_ptr<T>(),
              sigma.data_ptr<T>());
          const State st{qip[k], sp[2 * k], sp[2 * k + 1]};
          ParamGrads pg;
          const T* yk = relu ? yp + k * block : nullptr;
          T* mk = relu ? mp + k * block : nullptr;
          auto run = [&](auto fn, const auto& source_view) {
            fn(o, p, st, source_view, gyp + k * block, yk, qp + k * o.cg,
               zp + k * o.cg, gxp + k * block, mk, pg, gg, sq, sz, s, c0, c1,
               hr, hc, ghr.data(), ghc);
          };
          if (from_norm) {
            const Source<T, true> v{src + k * block, ap + group * o.cg,
                                    bp + group * o.cg};
            if (relu) run(backward_group<T, true, true>, v);
            else run(backward_group<T, true, false>, v);
          } else {
            const Source<T, false> v{src + k * block, nullptr, nullptr};
            if (relu) run(backward_group<T, false, true>, v);
            else run(backward_group<T, false, false>, v);
          }
          double* out = pp + 7 * k;
          out[0] = pg.lam;
          out[1] = pg.xi;
          out[2] = pg.beta;
          out[3] = pg.alpha;
          out[4] = pg.theta_row;
          out[5] = pg.theta_col;
          out[6] = pg.sigma;
        }
      });
    });
  }
  // sum over the batch: [b, g, 7] -> [g, 7] per-group, theta and sigma over all
  auto per_group = partial.view({b, groups, 7}).sum(0);
  auto dtype = source.scalar_type();
  auto col = [&](int64_t i) { return per_group.select(1, i).to(dtype); };
  auto grad_theta = per_group.narrow(1, 4, 2).sum(0).to(dtype);
  auto grad_sigma = per_group.select(1, 6).sum().view({1}).to(dtype);
  return {grad_x, masked, col(0), col(1), col(2), col(3), grad_theta,
          grad_sigma};
}

}  // namespace

TORCH_LIBRARY(prm_det, m) {
  m.def(
      "prm_forward(Tensor x, Tensor? identity, bool relu, Tensor lam, "
      "Tensor xi, Tensor beta, Tensor alpha, Tensor theta, Tensor sigma, "
      "int groups, bool use_position, bool use_norm, bool normalized, "
      "float eps) -> Tensor[]");
  m.def(
      "prm_backward(Tensor grad_y, Tensor? y, Tensor source, "
      "Tensor? norm_scale, Tensor? norm_shift, Tensor query_index, "
      "Tensor query, Tensor context, Tensor stats, Tensor lam, Tensor xi, "
      "Tensor beta, Tensor alpha, Tensor theta, Tensor sigma, int groups, "
      "bool use_position, bool use_norm, bool normalized, float eps) "
      "-> Tensor[]");
}

TORCH_LIBRARY_IMPL(prm_det, CPU, m) {
  m.impl("prm_forward", &prm_forward);
  m.impl("prm_backward", &prm_backward);
}

}  // namespace prm_det
