// The local relation aggregation's CPU kernels (LR-Net;
// prm_det/ops/local_relation.py has the math, and
// prm_det/ops/backends/local_relation_torch.py the same contract on torch
// ops). Per (sample, group g, output position (i, j)), over the window
// offsets d = (di, dj) whose input position (i, j) * stride + d - k // 2
// lies inside the map (the others are left out of the softmax):
//
//   logit_d = phi(query, key(d)) + prior[g, d],  w_d = softmax_d(logit)
//   out_c   = sum_d w_d value_c(d)  for the group's m = C / G channels c
//
// Both kernels work an output row at a time, vectorized along the row: a
// row's logits and weights (k * k * Wo values, a few KiB: never anything of
// k * k times the map's size) stay in cache while the group's channels use
// them. An offset reaches the same range of output columns on every row
// (and a range of rows), so the in-map test is a loop bound, not a mask.
//
//   local_relation_forward_cpu: tasks are (sample, group, output row).
//     Three passes over the row's window: the logits and their running max
//     (NaN wins, as torch.maximum), the weights exp(logit - max) and their
//     sum, then each channel's weighted sum. Returns the output and the
//     log-sum-exp max + log(sum) per position, which backward recomputes
//     the weights from.
//   local_relation_backward_cpu: tasks are (sample, group) planes, so a
//     task owns its planes of every gradient but the prior's (no atomics).
//     Per output row: the weights w_d = exp(logit_d - lse); D = sum over
//     the group's channels of grad_out * out; per channel,
//     dw_d += grad_out * value(d) and grad_value(d) += w_d * grad_out
//     (scattered into the task's planes); then dlogit_d = w_d (dw_d - D)
//     feeds grad_query (a row at a time), grad_key(d) (scattered) and the
//     task's partial sums of the prior's gradient, which are added over
//     the samples in a fixed order after.
//
// Contiguous float32 / float64 CPU tensors, all of one dtype; logits and
// weights in that dtype (float exp: vec_math.h's polynomial), the sums of
// the softmax, of the output's weighted values, of D, dw, the query's
// gradient and the prior's in double; the key's and the value's gradients
// (at most k * k terms each) accumulate in the dtype, as on the torch
// backend. The same bits every run, at any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "vec_math.h"

namespace prm_det {
namespace {

enum class Similarity { kSquaredDifference, kDotProduct, kAbsoluteDifference };

Similarity parse_similarity(c10::string_view method) {
  if (method == "squared_difference") return Similarity::kSquaredDifference;
  if (method == "dot_product") return Similarity::kDotProduct;
  if (method == "absolute_difference") return Similarity::kAbsoluteDifference;
  TORCH_CHECK(false,
              "prm_det local relation: method must be one of "
              "'squared_difference', 'dot_product', 'absolute_difference', "
              "got '", std::string(method.data(), method.size()), "'");
  return Similarity::kSquaredDifference;  // not reached
}

// phi(q, k) and its derivatives (local_relation.similarity and
// similarity_grads, the same operations in the same order)
template <Similarity M, typename T>
inline T phi(T q, T k) {
  if (M == Similarity::kSquaredDifference) {
    const T d = q - k;
    return -(d * d);
  }
  if (M == Similarity::kDotProduct) return q * k;
  return -std::abs(q - k);
}

// d phi / d key (d phi / d query is its negative for both differences, the
// key itself for the dot product)
template <Similarity M, typename T>
inline T phi_grad_key(T q, T k) {
  if (M == Similarity::kSquaredDifference) return T(2) * (q - k);
  if (M == Similarity::kDotProduct) return q;
  const T d = q - k;  // torch.sign: 0 at 0, NaN at NaN
  return d > T(0) ? T(1) : (d < T(0) ? T(-1) : d);
}

template <Similarity M, typename T>
inline T phi_grad_query(T q, T k) {
  if (M == Similarity::kDotProduct) return k;
  return -phi_grad_key<M>(q, k);
}

// exp of a weight's argument, logit - max or logit - lse: at most 0 (or a
// NaN, which passes). Float: the vectorizable polynomial, 0 below its range
// (an exp(-inf) must stay 0: 0 * inf is a NaN, as in torch).
inline float weight_exp(float x) {
  const float e = exp_poly(x);  // both sides computed: a select, no branch
  return x < -87.3f ? 0.0f : e;
}
inline double weight_exp(double x) { return std::exp(x); }

// The sizes of a call, and per column offset dj the output columns
// [col_lo, col_hi) whose input column j * stride + dj - k // 2 is inside
// the map.
struct Geometry {
  int64_t B, C, G, m, H, W, Ho, Wo, k, r, s, taps;
  std::vector<int64_t> col_lo, col_hi;

  Geometry(const at::Tensor& value, int64_t groups, int64_t kernel_size,
           int64_t stride)
      : B(value.size(0)),
        C(value.size(1)),
        G(groups),
        m(value.size(1) / groups),
        H(value.size(2)),
        W(value.size(3)),
        Ho(H > 0 ? (H - 1) / stride + 1 : 0),
        Wo(W > 0 ? (W - 1) / stride + 1 : 0),
        k(kernel_size),
        r(kernel_size / 2),
        s(stride),
        taps(kernel_size * kernel_size) {
    for (int64_t dj = 0; dj < k; ++dj) {
      const int64_t lo = in_map_first(dj - r), hi = in_map_end(dj - r, W, Wo);
      col_lo.push_back(lo);
      col_hi.push_back(std::max(lo, hi));
    }
  }
  // the first output index o with o * s + offset >= 0
  int64_t in_map_first(int64_t offset) const {
    return (std::max<int64_t>(0, -offset) + s - 1) / s;
  }
  // one past the last output index o < out with o * s + offset < size
  int64_t in_map_end(int64_t offset, int64_t size, int64_t out) const {
    const int64_t room = size - 1 - offset;
    return room < 0 ? 0 : std::min(out, room / s + 1);
  }
  // the row offsets di inside the map for output row i: [lo, hi)
  int64_t row_lo(int64_t i) const { return std::max<int64_t>(0, r - i * s); }
  int64_t row_hi(int64_t i) const {
    return std::max(row_lo(i), std::min(k, H - i * s + r));
  }
};

// ---------------------------------------------------------------- forward

// A row of an input plane regrouped for a stride: its s phases (the input
// columns x = s * u + p for phase p), each padded with P zeros on both
// sides, so that an offset's input column s * j + dx of every output
// column j lies at one unit-stride pointer: phase (dx mod s), u = j +
// floor(dx / s). Columns outside the map read zeros (an out-of-map
// offset's weight is 0 there: 0 * 0 adds nothing).
struct Phases {
  int64_t s, P, L;
  std::vector<int64_t> off;  // per column offset dj: its pointer's offset
  explicit Phases(const Geometry& g)
      : s(g.s), P((g.r + g.s - 1) / g.s), L(g.Wo + 2 * ((g.r + g.s - 1) / g.s)) {
    for (int64_t dj = 0; dj < g.k; ++dj) {
      const int64_t dx = dj - g.r;
      const int64_t fl = dx >= 0 ? dx / s : -((-dx + s - 1) / s);
      off.push_back((dx - fl * s) * L + P + fl);
    }
  }
  int64_t size() const { return s * L; }
};

template <typename T>
void fill_phases(const Phases& ph, const T* __restrict__ row, int64_t W,
                 T* __restrict__ buf) {
  const int64_t s = ph.s, P = ph.P, L = ph.L;
  for (int64_t p = 0; p < s; ++p) {
    T* __restrict__ b = buf + p * L;
    const int64_t n = W > p ? std::min(L - P, (W - p + s - 1) / s) : 0;
    std::fill(b, b + P, T(0));
    if (s == 1) {
      std::copy(row, row + n, b + P);
    } else {
      const T* __restrict__ src = row + p;
#pragma omp simd
      for (int64_t u = 0; u < n; ++u) b[P + u] = src[u * s];
    }
    std::fill(b + P + n, b + L, T(0));
  }
}

// One offset's logits along a row (columns lo..hi), with the running max;
// krow: the offset's key columns at unit stride (Phases).
template <Similarity M, typename T>
void tap_logits(const T* __restrict__ q, const T* __restrict__ krow, T p,
                int64_t lo, int64_t hi, T* __restrict__ logit,
                T* __restrict__ peak) {
#pragma omp simd
  for (int64_t j = lo; j < hi; ++j) {
    const T l = phi<M>(q[j], krow[j]) + p;
    logit[j] = l;
    const T best = peak[j];
    peak[j] = (l > best || l != l) ? l : best;  // NaN wins and stays
  }
}

// One offset's weights exp(logit - max) along a row, over its logits, and
// their sum; 0 outside lo..hi (the offset's out-of-map columns).
template <typename T>
void tap_exp(const T* __restrict__ peak, int64_t lo, int64_t hi, int64_t Wo,
             T* __restrict__ w, double* __restrict__ total) {
  // (an offset reaching no column of a small map: lo = hi, maybe > Wo)
  std::fill(w, w + std::min(lo, Wo), T(0));
  std::fill(w + std::min(hi, Wo), w + Wo, T(0));
  // two loops: GCC leaves a loop with both exp_poly and a float -> double
  // conversion scalar ("control flow in loop")
#pragma omp simd
  for (int64_t j = lo; j < hi; ++j) w[j] = weight_exp(T(w[j] - peak[j]));
#pragma omp simd
  for (int64_t j = lo; j < hi; ++j) total[j] += double(w[j]);
}

// the output: the weighted sum times 1 / the softmax's sum (float: a
// product with the reciprocal; double: the quotient)
inline float scale_out(float a, float inv, double) { return a * inv; }
inline double scale_out(double a, double, double tot) { return a / tot; }

template <typename T>
void forward_kernel(const Geometry& g, Similarity method, const T* query,
                    const T* key, const T* value, const T* prior, T* out,
                    T* lse) {
  const int64_t Wo = g.Wo, taps = g.taps;
  const int64_t s = g.s;
  const Phases ph(g);
  // rows per task chunk: about 64k multiply-adds of weighted sums each
  const int64_t work = std::max<int64_t>(1, g.m * taps * Wo);
  const int64_t grain = std::max<int64_t>(1, 65536 / work);
  at::parallel_for(0, g.B * g.G * g.Ho, grain, [&](int64_t begin,
                                                  int64_t end) {
    std::vector<T> weights(static_cast<size_t>(taps * Wo));
    std::vector<T> peak(static_cast<size_t>(Wo));
    std::vector<T> inv(static_cast<size_t>(Wo));
    std::vector<double> total(static_cast<size_t>(Wo));
    std::vector<T> acc(static_cast<size_t>(Wo));
    std::vector<T> rowbuf(static_cast<size_t>(ph.size()));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task % g.Ho, bg = task / g.Ho;
      const int64_t b = bg / g.G, grp = bg % g.G;
      const int64_t di_lo = g.row_lo(i), di_hi = g.row_hi(i);
      const T* __restrict__ q = query + (bg * g.Ho + i) * Wo;
      const T* __restrict__ pr = prior + grp * taps;
      T* __restrict__ pk = peak.data();
      T* __restrict__ rb = rowbuf.data();
      double* __restrict__ tot = total.data();
      std::fill(pk, pk + Wo, -std::numeric_limits<T>::infinity());
      // pass 1: logits and their max
      for (int64_t di = di_lo; di < di_hi; ++di) {
        fill_phases(ph, key + (bg * g.H + i * s + di - g.r) * g.W, g.W, rb);
        for (int64_t dj = 0; dj < g.k; ++dj) {
          const int64_t t = di * g.k + dj;
          const int64_t lo = g.col_lo[dj], hi = g.col_hi[dj];
          const T* krow = rb + ph.off[dj];
          T* lt = weights.data() + t * Wo;
          switch (method) {
            case Similarity::kSquaredDifference:
              tap_logits<Similarity::kSquaredDifference>(q, krow, pr[t], lo,
                                                         hi, lt, pk);
              break;
            case Similarity::kDotProduct:
              tap_logits<Similarity::kDotProduct>(q, krow, pr[t], lo, hi, lt,
                                                  pk);
              break;
            case Similarity::kAbsoluteDifference:
              tap_logits<Similarity::kAbsoluteDifference>(q, krow, pr[t], lo,
                                                          hi, lt, pk);
              break;
          }
        }
      }
      // pass 2: the weights exp(logit - max) and their sum
      std::fill(tot, tot + Wo, 0.0);
      for (int64_t di = di_lo; di < di_hi; ++di) {
        for (int64_t dj = 0; dj < g.k; ++dj) {
          tap_exp(pk, g.col_lo[dj], g.col_hi[dj], Wo,
                  weights.data() + (di * g.k + dj) * Wo, tot);
        }
      }
      T* __restrict__ lr = lse + (bg * g.Ho + i) * Wo;
      T* __restrict__ iv = inv.data();
      for (int64_t j = 0; j < Wo; ++j) {
        lr[j] = T(double(pk[j]) + std::log(tot[j]));
        iv[j] = T(1.0 / tot[j]);
      }
      // pass 3: each channel's weighted sum (in the dtype: at most k * k
      // terms), every offset over the whole row (0 weights off the map)
      for (int64_t c = 0; c < g.m; ++c) {
        const int64_t plane = b * g.C + grp * g.m + c;
        const T* vplane = value + plane * g.H * g.W;
        T* __restrict__ a = acc.data();
        std::fill(a, a + Wo, T(0));
        for (int64_t di = di_lo; di < di_hi; ++di) {
          fill_phases(ph, vplane + (i * s + di - g.r) * g.W, g.W, rb);
          for (int64_t dj = 0; dj < g.k; ++dj) {
            const T* __restrict__ wt = weights.data() + (di * g.k + dj) * Wo;
            const T* __restrict__ vrow = rb + ph.off[dj];
#pragma omp simd
            for (int64_t j = 0; j < Wo; ++j) a[j] += wt[j] * vrow[j];
          }
        }
        T* __restrict__ orow = out + (plane * g.Ho + i) * Wo;
#pragma omp simd
        for (int64_t j = 0; j < Wo; ++j) orow[j] = scale_out(a[j], iv[j], tot[j]);
      }
    }
  });
}

// --------------------------------------------------------------- backward

// One offset's weights exp(logit - lse) along a row.
template <Similarity M, bool Unit, typename T>
void tap_weights(const T* __restrict__ q, const T* __restrict__ krow,
                 int64_t s, int64_t dx, T p, const T* __restrict__ lse,
                 int64_t lo, int64_t hi, T* __restrict__ w) {
#pragma omp simd
  for (int64_t j = lo; j < hi; ++j) {
    const T l = phi<M>(q[j], krow[(Unit ? j : j * s) + dx]) + p;
    w[j] = weight_exp(T(l - lse[j]));
  }
}

// One offset's logit gradients along a row: into the query's row (double),
// the key's plane (scattered) and the offset's prior sum (returned).
template <Similarity M, bool Unit, typename T>
double tap_logit_grads(const T* __restrict__ q, const T* __restrict__ krow,
                       int64_t s, int64_t dx, const T* __restrict__ w,
                       const double* __restrict__ dw,
                       const double* __restrict__ D, int64_t lo, int64_t hi,
                       double* __restrict__ gq, T* __restrict__ gkrow) {
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = lo; j < hi; ++j) {
    const int64_t x = (Unit ? j : j * s) + dx;
    const double dl = double(w[j]) * (dw[j] - D[j]);
    sum += dl;
    gq[j] += dl * double(phi_grad_query<M>(q[j], krow[x]));
    gkrow[x] += T(dl * double(phi_grad_key<M>(q[j], krow[x])));
  }
  return sum;
}

template <bool Unit, typename T>
void backward_kernel(const Geometry& g, Similarity method, const T* grad_out,
                     const T* query, const T* key, const T* value,
                     const T* prior, const T* out, const T* lse, T* grad_query,
                     T* grad_key, T* grad_value, double* prior_partial) {
  const int64_t Wo = g.Wo, taps = g.taps, HW = g.H * g.W;
  const int64_t s = Unit ? 1 : g.s;
  at::parallel_for(0, g.B * g.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> weights(static_cast<size_t>(taps * Wo));
    std::vector<double> dweights(static_cast<size_t>(taps * Wo));
    std::vector<double> d_total(static_cast<size_t>(Wo));
    std::vector<double> gq(static_cast<size_t>(Wo));
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / g.G, grp = bg % g.G;
      const int64_t first = b * g.C + grp * g.m;  // the group's first plane
      const T* kplane = key + bg * HW;
      T* gkplane = grad_key + bg * HW;
      std::fill(gkplane, gkplane + HW, T(0));
      std::fill(grad_value + first * HW, grad_value + (first + g.m) * HW,
                T(0));
      const T* __restrict__ pr = prior + grp * taps;
      double* __restrict__ pp = prior_partial + bg * taps;
      std::fill(pp, pp + taps, 0.0);
      for (int64_t i = 0; i < g.Ho; ++i) {
        const int64_t di_lo = g.row_lo(i), di_hi = g.row_hi(i);
        const int64_t row = (bg * g.Ho + i) * Wo;
        const T* __restrict__ q = query + row;
        const T* __restrict__ lr = lse + row;
        // the weights
        for (int64_t di = di_lo; di < di_hi; ++di) {
          const T* krow = kplane + (i * s + di - g.r) * g.W;
          for (int64_t dj = 0; dj < g.k; ++dj) {
            const int64_t t = di * g.k + dj, dx = dj - g.r;
            const int64_t lo = g.col_lo[dj], hi = g.col_hi[dj];
            T* w = weights.data() + t * Wo;
            switch (method) {
              case Similarity::kSquaredDifference:
                tap_weights<Similarity::kSquaredDifference, Unit>(
                    q, krow, s, dx, pr[t], lr, lo, hi, w);
                break;
              case Similarity::kDotProduct:
                tap_weights<Similarity::kDotProduct, Unit>(q, krow, s, dx,
                                                           pr[t], lr, lo, hi,
                                                           w);
                break;
              case Similarity::kAbsoluteDifference:
                tap_weights<Similarity::kAbsoluteDifference, Unit>(
                    q, krow, s, dx, pr[t], lr, lo, hi, w);
                break;
            }
            std::fill(dweights.data() + t * Wo + lo,
                      dweights.data() + t * Wo + hi, 0.0);
          }
        }
        // D = sum_c grad_out * out; dw_d and grad_value, a channel at a time
        double* __restrict__ D = d_total.data();
        std::fill(D, D + Wo, 0.0);
        for (int64_t c = 0; c < g.m; ++c) {
          const int64_t plane = first + c;
          const T* __restrict__ go = grad_out + (plane * g.Ho + i) * Wo;
          const T* __restrict__ orow = out + (plane * g.Ho + i) * Wo;
#pragma omp simd
          for (int64_t j = 0; j < Wo; ++j)
            D[j] += double(go[j]) * double(orow[j]);
          for (int64_t di = di_lo; di < di_hi; ++di) {
            const int64_t in_row = (plane * g.H + i * s + di - g.r) * g.W;
            const T* __restrict__ vrow = value + in_row;
            T* __restrict__ gvrow = grad_value + in_row;
            for (int64_t dj = 0; dj < g.k; ++dj) {
              const int64_t t = di * g.k + dj, dx = dj - g.r;
              const T* __restrict__ w = weights.data() + t * Wo;
              double* __restrict__ dw = dweights.data() + t * Wo;
              const int64_t lo = g.col_lo[dj], hi = g.col_hi[dj];
#pragma omp simd
              for (int64_t j = lo; j < hi; ++j) {
                const int64_t x = (Unit ? j : j * s) + dx;
                dw[j] += double(go[j]) * double(vrow[x]);
                gvrow[x] += w[j] * go[j];
              }
            }
          }
        }
        // dlogit_d = w_d (dw_d - D): the query's, the key's and the
        // prior's gradients
        double* __restrict__ gqr = gq.data();
        std::fill(gqr, gqr + Wo, 0.0);
        for (int64_t di = di_lo; di < di_hi; ++di) {
          const int64_t in_row = (i * s + di - g.r) * g.W;
          const T* krow = kplane + in_row;
          T* gkrow = gkplane + in_row;
          for (int64_t dj = 0; dj < g.k; ++dj) {
            const int64_t t = di * g.k + dj, dx = dj - g.r;
            const int64_t lo = g.col_lo[dj], hi = g.col_hi[dj];
            const T* w = weights.data() + t * Wo;
            const double* dw = dweights.data() + t * Wo;
            double sum = 0;
            switch (method) {
              case Similarity::kSquaredDifference:
                sum = tap_logit_grads<Similarity::kSquaredDifference, Unit>(
                    q, krow, s, dx, w, dw, D, lo, hi, gqr, gkrow);
                break;
              case Similarity::kDotProduct:
                sum = tap_logit_grads<Similarity::kDotProduct, Unit>(
                    q, krow, s, dx, w, dw, D, lo, hi, gqr, gkrow);
                break;
              case Similarity::kAbsoluteDifference:
                sum = tap_logit_grads<Similarity::kAbsoluteDifference, Unit>(
                    q, krow, s, dx, w, dw, D, lo, hi, gqr, gkrow);
                break;
            }
            pp[t] += sum;
          }
        }
        T* __restrict__ gqrow = grad_query + row;
        for (int64_t j = 0; j < Wo; ++j) gqrow[j] = T(gqr[j]);
      }
    }
  });
}

// ------------------------------------------------------------------ checks

const char* kWhere = "prm_det local relation (CPU kernel): ";

void check_map(const at::Tensor& t, const at::Tensor& value,
               at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == value.scalar_type(),
              kWhere, name, " must be a CPU ", value.scalar_type(),
              " tensor (the value's dtype: all inputs share one), got ",
              t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.sizes() == shape, kWhere, name, " must have shape ", shape,
              ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), kWhere, name, " must be contiguous");
}

// The call's geometry, every input checked against the value.
Geometry check_inputs(const at::Tensor& query, const at::Tensor& key,
                      const at::Tensor& value, const at::Tensor& prior,
                      int64_t kernel_size, int64_t stride) {
  TORCH_CHECK(value.device().is_cpu() &&
                  (value.scalar_type() == at::kFloat ||
                   value.scalar_type() == at::kDouble),
              kWhere, "the kernel takes float32 or float64 CPU tensors, got "
              "a value of ", value.scalar_type(), " on ", value.device());
  TORCH_CHECK(value.dim() == 4, kWhere, "value must be a 4-d [b, C, H, W] "
              "map, got ", value.sizes());
  TORCH_CHECK(value.is_contiguous(), kWhere, "value must be contiguous");
  TORCH_CHECK(kernel_size > 0 && kernel_size % 2 == 1, kWhere,
              "kernel_size must be a positive odd number, got ", kernel_size);
  TORCH_CHECK(stride > 0, kWhere, "stride must be positive, got ", stride);
  TORCH_CHECK(key.dim() == 4, kWhere, "key must be a 4-d [b, G, H, W] map, "
              "got ", key.sizes());
  const int64_t groups = key.size(1);
  TORCH_CHECK(groups > 0 && value.size(1) % groups == 0, kWhere,
              "the key's groups (", groups, ") must divide the value's "
              "channels (", value.size(1), ")");
  Geometry g(value, groups, kernel_size, stride);
  check_map(key, value, {g.B, g.G, g.H, g.W}, "key");
  check_map(query, value, {g.B, g.G, g.Ho, g.Wo}, "query");
  check_map(prior, value, {g.G, g.k, g.k}, "prior");
  return g;
}

std::tuple<at::Tensor, at::Tensor> local_relation_forward_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& prior, int64_t kernel_size, int64_t stride,
    c10::string_view method) {
  const Similarity sim = parse_similarity(method);
  const Geometry g =
      check_inputs(query, key, value, prior, kernel_size, stride);
  at::Tensor out = at::empty({g.B, g.C, g.Ho, g.Wo}, value.options());
  at::Tensor lse = at::empty({g.B, g.G, g.Ho, g.Wo}, value.options());
  if (lse.numel() == 0) return {out, lse};  // (no channels: lse alone)
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "local_relation_forward",
                             [&] {
    using T = scalar_t;
    forward_kernel<T>(g, sim, query.data_ptr<T>(), key.data_ptr<T>(), value.data_ptr<T>(),
        prior.data_ptr<T>(), out.data_ptr<T>(), lse.data_ptr<T>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
local_relation_backward_cpu(const at::Tensor& grad_out,
                            const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& value, const at::Tensor& prior,
                            const at::Tensor& out, const at::Tensor& lse,
                            int64_t kernel_size, int64_t stride,
                            c10::string_view method) {
  const Similarity sim = parse_similarity(method);
  const Geometry g =
      check_inputs(query, key, value, prior, kernel_size, stride);
  check_map(grad_out, value, {g.B, g.C, g.Ho, g.Wo}, "grad_out");
  check_map(out, value, {g.B, g.C, g.Ho, g.Wo}, "out");
  check_map(lse, value, {g.B, g.G, g.Ho, g.Wo}, "lse");
  at::Tensor grad_query = at::zeros_like(query);
  at::Tensor grad_key = at::empty_like(key);
  at::Tensor grad_value = at::empty_like(value);
  at::Tensor grad_prior = at::zeros_like(prior);
  if (lse.numel() == 0) {
    grad_key.zero_();
    grad_value.zero_();
    return {grad_query, grad_key, grad_value, grad_prior};
  }
  // per (sample, group), its sums of the prior's gradient
  std::vector<double> partial(static_cast<size_t>(g.B * g.G * g.taps));
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "local_relation_backward",
                             [&] {
    using T = scalar_t;
    auto run = g.s == 1 ? backward_kernel<true, T> : backward_kernel<false, T>;
    run(g, sim, grad_out.data_ptr<T>(), query.data_ptr<T>(),
        key.data_ptr<T>(), value.data_ptr<T>(), prior.data_ptr<T>(),
        out.data_ptr<T>(), lse.data_ptr<T>(), grad_query.data_ptr<T>(),
        grad_key.data_ptr<T>(), grad_value.data_ptr<T>(), partial.data());
    // the samples' sums added in order: the same bits every run
    T* gp = grad_prior.data_ptr<T>();
    for (int64_t gt = 0; gt < g.G * g.taps; ++gt) {
      double sum = 0;
      for (int64_t b = 0; b < g.B; ++b) sum += partial[b * g.G * g.taps + gt];
      gp[gt] = T(sum);
    }
  });
  return {grad_query, grad_key, grad_value, grad_prior};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prm_det, m) {
  m.def(
      "local_relation_forward_cpu(Tensor query, Tensor key, Tensor value, "
      "Tensor prior, int kernel_size, int stride, str method) "
      "-> (Tensor, Tensor)");
  m.def(
      "local_relation_backward_cpu(Tensor grad_out, Tensor query, "
      "Tensor key, Tensor value, Tensor prior, Tensor out, Tensor lse, "
      "int kernel_size, int stride, str method) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(prm_det, CPU, m) {
  m.impl("local_relation_forward_cpu", &local_relation_forward_cpu);
  m.impl("local_relation_backward_cpu", &local_relation_backward_cpu);
}

}  // namespace prm_det
