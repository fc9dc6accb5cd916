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

// Index of the first maximum (as torch.argmax), vectorized: each of L
// lanes keeps its own first maximum, then the lanes are merged.
template <typename T>
int64_t first_argmax(const T* v, int64_t n) {
  constexpr int64_t L = 16;
  int64_t best_index = 0;
  T best = v[0];
  const int64_t body = n / L * L;
  if (body > 0) {
    T lane_best[L];
    int32_t lane_index[L];
    for (int64_t l = 0; l < L; ++l) {
      lane_best[l] = v[l];
      lane_index[l] = static_cast<int32_t>(l);
    }
    for (int64_t k0 = L; k0 < body; k0 += L) {
#pragma omp simd
      for (int64_t l = 0; l < L; ++l) {
        const T x = v[k0 + l];
        const bool better = x > lane_best[l];
        lane_best[l] = better ? x : lane_best[l];
        lane_index[l] = better ? static_cast<int32_t>(k0 + l) : lane_index[l];
      }
    }
    best = lane_best[0];
    best_index = lane_index[0];
    for (int64_t l = 1; l < L; ++l)
      if (lane_best[l] > best ||
          (lane_best[l] == best && lane_index[l] < best_index)) {
        best = lane_best[l];
        best_index = lane_index[l];
      }
  }
  for (int64_t k = body; k < n; ++k)
    if (v[k] > best) {
      best = v[k];
      best_index = k;
    }
  return best_index;
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
  const int64_t qi = first_argmax(colsum, P);
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

// Row c of dL/dx, from the per-position maps and four numbers per row:
//   gate_p g_cp + kq coef_q_p + kz grad_s_p + gz   (+ gq at the query)
template <typename T>
struct RowGrad {
  T kq, kz, gz, gq;
};

// Per-position maps of one group's backward: the gate, the coefficient of
// q . x_p and dL/dS.
template <typename T>
struct Maps {
  T *gate, *coef_q, *grad_s;
};

// Everything of one group's backward except writing dL/dx: the masked
// upstream gradient (with ReLU), the maps, the row numbers and the
// parameters' gradients. Scratch: 3 P + h + 2 w values of T and h doubles.
template <typename T, bool FromNorm, bool Relu>
void backward_group(const Options& o, const Params& p, const State& st,
                    const Source<T, FromNorm>& src, const T* grad_y,
                    const T* y, const T* query, const T* context, T* masked,
                    const Maps<T>& maps, RowGrad<T>* rows, ParamGrads& pg,
                    T* scratch, double* ghr) {
  const int64_t P = o.P, cg = o.cg, qi = st.query_index;
  T *sq = scratch, *sz = sq + P, *s = sz + P, *hr = s + P, *hc = hr + o.h,
    *ghc = hc + o.w;
  T* gg = maps.coef_q;  // dL/dgate, then dL/d(pre-sigmoid), then coef_q
  T *gate = maps.gate, *grad_s = maps.grad_s;
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
  std::copy(s, s + P, gate);
  gate_from_map(o, p, st, gate);

  // through the sigmoid, the affine and the normalization
  double sum_grad = 0, dot_centered = 0;
  const T mean = static_cast<T>(st.mean);
#pragma omp simd reduction(+ : sum_grad, dot_centered)
  for (int64_t k = 0; k < P; ++k) {
    const T gpre = gg[k] * gate[k] * (T(1) - gate[k]);
    gg[k] = gpre;
    sum_grad += gpre;
    dot_centered += double(gpre) * (s[k] - mean);
  }
  pg.xi += sum_grad;
  if (o.use_norm && P == 1) {  // the normalized value is constant 0
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

  // S = alpha (q.x) D + beta (z.x): D's gradient goes to theta and sigma
  T* coef_q = maps.coef_q;
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

  // the key gradients, one row reduction per channel; then the row numbers
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
    rows[c] = RowGrad<T>{alpha * query[c], beta * context[c],
                         beta * gkz * inv_p, alpha * gkq};
  }
  pg.alpha += grad_alpha;
  pg.beta += grad_beta;
}

// dL/dx for one row
template <typename T>
inline void write_grad_row(const T* g, const Maps<T>& m, const RowGrad<T>& r,
                           int64_t P, int64_t qi, T* out) {
#pragma omp simd
  for (int64_t k = 0; k < P; ++k)
    out[k] = g[k] * m.gate[k] + r.kq * m.coef_q[k] + r.kz * m.grad_s[k] + r.gz;
  out[qi] += r.gq;
}

// Sums of one row of dL/dx and of dL/dx * c (BatchNorm's backward
// reductions), without storing the row. out: [2] doubles.
template <typename T>
inline void grad_row_sums(const T* g, const T* c, const Maps<T>& m,
                          const RowGrad<T>& r, int64_t P, int64_t qi,
                          double* out) {
  double s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t k = 0; k < P; ++k) {
    const T gx = g[k] * m.gate[k] + r.kq * m.coef_q[k] + r.kz * m.grad_s[k] +
                 r.gz;
    s1 += gx;
    s2 += double(gx) * c[k];
  }
  out[0] = s1 + r.gq;
  out[1] = s2 + double(r.gq) * c[qi];
}

// dL/dc for one row: aw * dL/dx + slope * c + offset (BatchNorm's backward
// in affine form), dL/dx recomputed from the maps.
template <typename T>
inline void write_norm_grad_row(const T* g, const T* c, const Maps<T>& m,
                                const RowGrad<T>& r, T aw, T slope, T offset,
                                int64_t P, int64_t qi, T* out) {
  const T kq = aw * r.kq, kz = aw * r.kz, gz = aw * r.gz + offset;
#pragma omp simd
  for (int64_t k = 0; k < P; ++k)
    out[k] = aw * g[k] * m.gate[k] + kq * m.coef_q[k] + kz * m.grad_s[k] +
             gz + slope * c[k];
  out[qi] += aw * r.gq;
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

// PRM's six parameters, in the official order (weight = lambda, bias = xi,
// one = beta, zero = alpha, theta, scale = sigma), any shape of the right
// size; contiguous copies of the map's dtype.
struct PRMParams {
  std::vector<at::Tensor> t;  // lam, xi, beta, alpha, theta, sigma
  PRMParams(const at::Tensor& x, int64_t groups,
            std::initializer_list<at::Tensor> params) {
    const int64_t sizes[6] = {groups, groups, groups, groups, 2, 1};
    const char* names[6] = {"weight", "bias", "one", "zero", "theta",
                            "scale"};
    int i = 0;
    for (const auto& p : params) {
      TORCH_CHECK(p.device().is_cpu() && p.numel() == sizes[i],
                  "prm_det: PRM's ", names[i], " must be a CPU tensor of ",
                  sizes[i], " values, got ", p.sizes());
      t.push_back(p.to(x.scalar_type()).contiguous());
      ++i;
    }
  }
  template <typename T>
  Params group(int64_t g) const {
    return Params{double(t[0].data_ptr<T>()[g]), double(t[1].data_ptr<T>()[g]),
                  double(t[2].data_ptr<T>()[g]), double(t[3].data_ptr<T>()[g]),
                  double(t[4].data_ptr<T>()[0]), double(t[4].data_ptr<T>()[1]),
                  double(t[5].data_ptr<T>()[0])};
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

// PRM forward on x into y (y may be x itself: the gating pass reads each
// value before writing it). Returns query_index, query, context, stats.
std::vector<at::Tensor> forward_into(const at::Tensor& x,
                                     const c10::optional<at::Tensor>& identity,
                                     bool relu, const PRMParams& params,
                                     const Options& o, at::Tensor& y) {
  const bool has_identity = given(identity);
  if (has_identity) check_map(*identity, x, "identity");
  const int64_t n = x.size(0) * o.groups;
  auto query_index = at::empty({n}, x.options().dtype(at::kLong));
  auto query = at::empty({n, o.cg}, x.options());
  auto context = at::empty({n, o.cg}, x.options());
  auto stats = at::empty({n, 2}, x.options().dtype(at::kDouble));
  if (n == 0 || o.P == 0) return {query_index, query, context, stats};

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
        const Params p = params.group<T>(k % o.groups);
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
  return {query_index, query, context, stats};
}

// Calls backward_group for group k with the right instantiation.
template <typename T>
struct BackwardCall {
  const Options& o;
  const PRMParams& params;
  const at::Tensor &query_index, &query, &context, &stats;
  const T *src, *grad_y, *y, *norm_a, *norm_b;  // norm_a: source is c
  T* masked;

  void operator()(int64_t k, const Maps<T>& maps, RowGrad<T>* rows,
                  ParamGrads& pg, T* scratch, double* ghr) const {
    const int64_t group = k % o.groups, block = o.cg * o.P;
    const Params p = params.group<T>(group);
    const double* sp = stats.data_ptr<double>();
    const State st{query_index.data_ptr<int64_t>()[k], sp[2 * k],
                   sp[2 * k + 1]};
    const T* qk = query.data_ptr<T>() + k * o.cg;
    const T* zk = context.data_ptr<T>() + k * o.cg;
    const T* yk = y ? y + k * block : nullptr;
    T* mk = masked ? masked + k * block : nullptr;
    auto run = [&](auto fn, const auto& view) {
      fn(o, p, st, view, grad_y + k * block, yk, qk, zk, mk, maps, rows, pg,
         scratch, ghr);
    };
    if (norm_a) {
      // the group's channels: (k % groups) * cg .. + cg
      const Source<T, true> v{src + k * block, norm_a + group * o.cg,
                              norm_b + group * o.cg};
      if (y) run(backward_group<T, true, true>, v);
      else run(backward_group<T, true, false>, v);
    } else {
      const Source<T, false> v{src + k * block, nullptr, nullptr};
      if (y) run(backward_group<T, false, true>, v);
      else run(backward_group<T, false, false>, v);
    }
  }
};

void store_param_grads(double* out, const ParamGrads& pg) {
  out[0] = pg.lam;
  out[1] = pg.xi;
  out[2] = pg.beta;
  out[3] = pg.alpha;
  out[4] = pg.theta_row;
  out[5] = pg.theta_col;
  out[6] = pg.sigma;
}

// [b * g, 7] per (sample, group) -> the six parameters' gradients, shaped
// like the parameters given.
std::vector<at::Tensor> param_grads(const at::Tensor& partial, int64_t b,
                                    int64_t groups, at::ScalarType dtype,
                                    const std::vector<at::Tensor>& like) {
  auto per_group = partial.view({b, groups, 7}).sum(0);
  auto col = [&](int64_t i, const at::Tensor& l) {
    return per_group.select(1, i).to(dtype).view(l.sizes());
  };
  return {col(0, like[0]), col(1, like[1]), col(2, like[2]), col(3, like[3]),
          per_group.narrow(1, 4, 2).sum(0).to(dtype).view(like[4].sizes()),
          per_group.select(1, 6).sum().to(dtype).view(like[5].sizes())};
}

at::Tensor none_tensor(const at::Tensor& like) {
  // an empty tensor stands for "none": a Tensor[] holds no undefined ones
  return at::empty({0}, like.options());
}

// y = x * gate(x) (+ identity, ReLU). Returns y, query_index [n] (int64),
// query [n, cg], context [n, cg] and stats [n, 2] (mean and std of S).
std::vector<at::Tensor> prm_forward(
    const at::Tensor& x, const c10::optional<at::Tensor>& identity, bool relu,
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& one,
    const at::Tensor& zero, const at::Tensor& theta, const at::Tensor& scale,
    int64_t groups, bool use_position, bool use_norm, bool normalized,
    double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(),
              "prm_det: the CPU kernel takes contiguous CPU maps");
  const Options o =
      make_options(x, groups, use_position, use_norm, normalized, eps);
  const PRMParams params(x, groups, {weight, bias, one, zero, theta, scale});
  auto y = at::empty_like(x);
  auto saved = forward_into(x, identity, relu, params, o, y);
  saved.insert(saved.begin(), y);
  return saved;
}

// Gradients of prm_forward: grad_x, the masked upstream gradient (the
// identity's gradient; empty without relu) and the six parameters'.
std::vector<at::Tensor> prm_backward(
    const at::Tensor& grad_y, const c10::optional<at::Tensor>& y,
    const at::Tensor& x, const at::Tensor& query_index,
    const at::Tensor& query, const at::Tensor& context,
    const at::Tensor& stats, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& one, const at::Tensor& zero, const at::Tensor& theta,
    const at::Tensor& scale, int64_t groups, bool use_position,
    bool use_norm, bool normalized, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(),
              "prm_det: the CPU kernel takes contiguous CPU maps");
  check_map(grad_y, x, "grad_y");
  const Options o =
      make_options(x, groups, use_position, use_norm, normalized, eps);
  const PRMParams params(x, groups, {weight, bias, one, zero, theta, scale});
  const bool relu = given(y);
  if (relu) check_map(*y, x, "y");
  const int64_t b = x.size(0), n = b * groups;
  auto grad_x = at::empty_like(x);
  at::Tensor masked = relu ? at::empty_like(x) : none_tensor(x);
  auto partial = at::zeros({n, 7}, x.options().dtype(at::kDouble));
  if (n > 0 && o.P > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "prm_det_backward", [&] {
      using T = scalar_t;
      const BackwardCall<T> call{
          o, params, query_index, query, context, stats, x.data_ptr<T>(),
          grad_y.data_ptr<T>(), relu ? y->data_ptr<T>() : nullptr, nullptr,
          nullptr, relu ? masked.data_ptr<T>() : nullptr};
      T* gxp = grad_x.data_ptr<T>();
      double* pp = partial.data_ptr<double>();
      at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
        std::vector<T> buf(6 * o.P + o.h + 2 * o.w);
        std::vector<double> ghr(o.h);
        std::vector<RowGrad<T>> rows(o.cg);
        const Maps<T> maps{buf.data(), buf.data() + o.P,
                           buf.data() + 2 * o.P};
        T* scratch = buf.data() + 3 * o.P;
        const int64_t block = o.cg * o.P;
        for (int64_t k = begin; k < end; ++k) {
          ParamGrads pg;
          call(k, maps, rows.data(), pg, scratch, ghr.data());
          const T* g = (relu ? call.masked : call.grad_y) + k * block;
          for (int64_t c = 0; c < o.cg; ++c)
            write_grad_row(g + c * o.P, maps, rows[c], o.P,
                           query_index.data_ptr<int64_t>()[k],
                           gxp + k * block + c * o.P);
          store_param_grads(pp + 7 * k, pg);
        }
      });
    });
  }
  auto out = param_grads(partial, b, groups, x.scalar_type(), params.t);
  out.insert(out.begin(), {grad_x, masked});
  return out;
}

// A BatchNorm's per-channel view for backward: x = c * a + shift and
// xhat = (c - mean) * invstd, with the statistics forward normalized with.
struct NormView {
  at::Tensor mean, invstd, a, shift;
};

NormView norm_view(const at::Tensor& c, const c10::optional<at::Tensor>& weight,
                   const c10::optional<at::Tensor>& bias,
                   const c10::optional<at::Tensor>& running_mean,
                   const c10::optional<at::Tensor>& running_var,
                   const at::Tensor& save_mean, const at::Tensor& save_invstd,
                   bool training, double bn_eps) {
  at::Tensor mean, invstd;
  if (training) {
    mean = save_mean;
    invstd = save_invstd;
  } else {
    TORCH_CHECK(given(running_mean) && given(running_var),
                "prm_det: BatchNorm in eval mode needs running statistics");
    mean = *running_mean;
    invstd = (*running_var + bn_eps).rsqrt();
  }
  at::Tensor a = given(weight) ? invstd * *weight : invstd;
  at::Tensor shift = -mean * a;
  if (given(bias)) shift = shift + *bias;
  auto prep = [&](const at::Tensor& t) {
    return t.to(c.scalar_type()).contiguous();
  };
  return NormView{prep(mean), prep(invstd), prep(a), prep(shift)};
}

// relu(PRM(BatchNorm(c)) + identity): torch's native_batch_norm (and its
// running-statistics update), then PRM's passes writing y over the
// normalized map (it is not kept: backward recomputes it from c). Returns
// y, save_mean, save_invstd, query_index, query, context, stats.
std::vector<at::Tensor> bn_prm_forward(
    const at::Tensor& c, const c10::optional<at::Tensor>& bn_weight,
    const c10::optional<at::Tensor>& bn_bias,
    const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training,
    double momentum, double bn_eps, const c10::optional<at::Tensor>& identity,
    bool relu, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& one, const at::Tensor& zero, const at::Tensor& theta,
    const at::Tensor& scale, int64_t groups, bool use_position,
    bool use_norm, bool normalized, double eps) {
  TORCH_CHECK(c.device().is_cpu() && c.is_contiguous(),
              "prm_det: the CPU kernel takes contiguous CPU maps");
  const Options o =
      make_options(c, groups, use_position, use_norm, normalized, eps);
  const PRMParams params(c, groups, {weight, bias, one, zero, theta, scale});
  auto normed = at::native_batch_norm(c, bn_weight, bn_bias, running_mean,
                                      running_var, training, momentum, bn_eps);
  at::Tensor x = std::get<0>(normed).contiguous();
  auto saved = forward_into(x, identity, relu, params, o, x);
  saved.insert(saved.begin(),
               {x, std::get<1>(normed), std::get<2>(normed)});
  return saved;
}

// Gradients of bn_prm_forward: grad_c, grad_bn_weight, grad_bn_bias (each
// empty unless asked for), the masked upstream gradient (empty without
// relu) and PRM's six parameters'. BatchNorm's backward is fused in: PRM's
// dL/dx is never stored; its per-channel sums are taken in the first phase
// and each row is recomputed and mapped to dL/dc in the second.
std::vector<at::Tensor> bn_prm_backward(
    const at::Tensor& grad_y, const c10::optional<at::Tensor>& y,
    const at::Tensor& c, const c10::optional<at::Tensor>& bn_weight,
    const c10::optional<at::Tensor>& bn_bias,
    const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var,
    const at::Tensor& save_mean, const at::Tensor& save_invstd,
    bool training, double bn_eps, const at::Tensor& query_index,
    const at::Tensor& query, const at::Tensor& context,
    const at::Tensor& stats, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& one, const at::Tensor& zero, const at::Tensor& theta,
    const at::Tensor& scale, int64_t groups, bool use_position,
    bool use_norm, bool normalized, double eps, bool need_c,
    bool need_bn_weight, bool need_bn_bias) {
  TORCH_CHECK(c.device().is_cpu() && c.is_contiguous(),
              "prm_det: the CPU kernel takes contiguous CPU maps");
  check_map(grad_y, c, "grad_y");
  const Options o =
      make_options(c, groups, use_position, use_norm, normalized, eps);
  const PRMParams params(c, groups, {weight, bias, one, zero, theta, scale});
  const bool relu = given(y);
  if (relu) check_map(*y, c, "y");
  const NormView nv = norm_view(c, bn_weight, bn_bias, running_mean,
                                running_var, save_mean, save_invstd, training,
                                bn_eps);
  const int64_t b = c.size(0), n = b * groups, C = c.size(1);
  at::Tensor masked = relu ? at::empty_like(c) : none_tensor(c);
  at::Tensor grad_c = need_c ? at::empty_like(c) : none_tensor(c);
  auto partial = at::zeros({n, 7}, c.options().dtype(at::kDouble));
  // per (sample, channel): sum of dL/dx and of dL/dx * c
  auto sums = at::zeros({b, C, 2}, c.options().dtype(at::kDouble));
  std::pair<at::Tensor, at::Tensor> bn_grads_out;  // weight, bias
  if (n > 0 && o.P > 0) {
    AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "prm_det_bn_backward", [&] {
      using T = scalar_t;
      const T* cp = c.data_ptr<T>();
      const BackwardCall<T> call{
          o, params, query_index, query, context, stats, cp,
          grad_y.data_ptr<T>(), relu ? y->data_ptr<T>() : nullptr,
          nv.a.data_ptr<T>(), nv.shift.data_ptr<T>(),
          relu ? masked.data_ptr<T>() : nullptr};
      const T* g_all = relu ? call.masked : call.grad_y;
      const int64_t* qip = query_index.data_ptr<int64_t>();
      // the per-position maps and row numbers of every group, for phase 2
      std::vector<T> map_store(static_cast<size_t>(n) * 3 * o.P);
      std::vector<RowGrad<T>> row_store(static_cast<size_t>(n) * o.cg);
      auto maps_of = [&](int64_t k) {
        T* base = map_store.data() + k * 3 * o.P;
        return Maps<T>{base, base + o.P, base + 2 * o.P};
      };
      double* pp = partial.data_ptr<double>();
      double* sp = sums.data_ptr<double>();
      const int64_t block = o.cg * o.P;
      at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
        std::vector<T> scratch(3 * o.P + o.h + 2 * o.w);
        std::vector<double> ghr(o.h);
        for (int64_t k = begin; k < end; ++k) {
          ParamGrads pg;
          const Maps<T> m = maps_of(k);
          RowGrad<T>* rows = row_store.data() + k * o.cg;
          call(k, m, rows, pg, scratch.data(), ghr.data());
          store_param_grads(pp + 7 * k, pg);
          for (int64_t ch = 0; ch < o.cg; ++ch) {
            const T* g = g_all + k * block + ch * o.P;
            const T* cr = cp + k * block + ch * o.P;
            grad_row_sums(g, cr, m, rows[ch], o.P, qip[k],
                          sp + 2 * (k * o.cg + ch));
          }
        }
      });
      // per channel over the batch: dL/d(bn bias) = sum dL/dx,
      // dL/d(bn weight) = sum dL/dx * xhat = invstd (sum dL/dx c - mean sum)
      auto per_channel = sums.sum(0);  // [C, 2]
      const double* pc = per_channel.data_ptr<double>();
      const T* mean = nv.mean.data_ptr<T>();
      const T* invstd = nv.invstd.data_ptr<T>();
      const T* a = nv.a.data_ptr<T>();
      std::vector<double> sum_g(C), sum_gxhat(C);
      for (int64_t ch = 0; ch < C; ++ch) {
        sum_g[ch] = pc[2 * ch];
        sum_gxhat[ch] = double(invstd[ch]) * (pc[2 * ch + 1] -
                                              double(mean[ch]) * pc[2 * ch]);
      }
      if (need_bn_bias || need_bn_weight) {
        // (copies: the vectors die with this scope)
        auto as_tensor = [&](std::vector<double>& v) {
          return at::from_blob(v.data(), {C}, c.options().dtype(at::kDouble))
              .to(c.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
        };
        bn_grads_out = std::make_pair(as_tensor(sum_gxhat), as_tensor(sum_g));
      }
      if (!need_c) return;
      // phase 2: dL/dc per row, from the row of dL/dx recomputed:
      //   training: a (gx - mean(gx) - xhat mean(gx xhat)); eval: a gx
      const double count = double(b) * o.P;
      T* gcp = grad_c.data_ptr<T>();
      at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          const Maps<T> m = maps_of(k);
          const int64_t group = k % o.groups;
          for (int64_t cl = 0; cl < o.cg; ++cl) {
            const int64_t ch = group * o.cg + cl;
            const RowGrad<T>& r = row_store[k * o.cg + cl];
            const T* g = g_all + k * block + cl * o.P;
            const T* cr = cp + k * block + cl * o.P;
            T* out = gcp + k * block + cl * o.P;
            const T aw = a[ch];
            T slope = 0, offset = 0;
            if (training) {  // xhat = (c - mean) invstd
              const double mg = sum_g[ch] / count;
              const double mgx = sum_gxhat[ch] / count;
              slope = static_cast<T>(-double(aw) * mgx * double(invstd[ch]));
              offset = static_cast<T>(-double(aw) * mg +
                                      double(aw) * mgx * double(invstd[ch]) *
                                          double(mean[ch]));
            }
            write_norm_grad_row(g, cr, m, r, aw, slope, offset, o.P,
                                qip[k], out);
          }
        }
      });
    });
  }
  at::Tensor grad_bn_weight = none_tensor(c), grad_bn_bias = none_tensor(c);
  if (bn_grads_out.first.defined()) {
    if (need_bn_weight) grad_bn_weight = bn_grads_out.first;
    if (need_bn_bias) grad_bn_bias = bn_grads_out.second;
  }
  auto out = param_grads(partial, b, groups, c.scalar_type(), params.t);
  out.insert(out.begin(), {grad_c, grad_bn_weight, grad_bn_bias, masked});
  return out;
}

}  // namespace

TORCH_LIBRARY(prm_det, m) {
  m.def(
      "prm_forward(Tensor x, Tensor? identity, bool relu, Tensor weight, "
      "Tensor bias, Tensor one, Tensor zero, Tensor theta, Tensor scale, "
      "int groups, bool use_position, bool use_norm, bool normalized, "
      "float eps) -> Tensor[]");
  m.def(
      "prm_backward(Tensor grad_y, Tensor? y, Tensor x, Tensor query_index, "
      "Tensor query, Tensor context, Tensor stats, Tensor weight, "
      "Tensor bias, Tensor one, Tensor zero, Tensor theta, Tensor scale, "
      "int groups, bool use_position, bool use_norm, bool normalized, "
      "float eps) -> Tensor[]");
  m.def(
      "bn_prm_forward(Tensor c, Tensor? bn_weight, Tensor? bn_bias, "
      "Tensor? running_mean, Tensor? running_var, bool training, "
      "float momentum, float bn_eps, Tensor? identity, bool relu, "
      "Tensor weight, Tensor bias, Tensor one, Tensor zero, Tensor theta, "
      "Tensor scale, int groups, bool use_position, bool use_norm, "
      "bool normalized, float eps) -> Tensor[]");
  m.def(
      "bn_prm_backward(Tensor grad_y, Tensor? y, Tensor c, Tensor? bn_weight, "
      "Tensor? bn_bias, Tensor? running_mean, Tensor? running_var, "
      "Tensor save_mean, Tensor save_invstd, bool training, float bn_eps, "
      "Tensor query_index, Tensor query, Tensor context, Tensor stats, "
      "Tensor weight, Tensor bias, Tensor one, Tensor zero, Tensor theta, "
      "Tensor scale, int groups, bool use_position, bool use_norm, "
      "bool normalized, float eps, bool need_c, bool need_bn_weight, "
      "bool need_bn_bias) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(prm_det, CPU, m) {
  m.impl("prm_forward", &prm_forward);
  m.impl("prm_backward", &prm_backward);
  m.impl("bn_prm_forward", &bn_prm_forward);
  m.impl("bn_prm_backward", &bn_prm_backward);
}

}  // namespace prm_det
