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
// An input row is read regrouped for the stride (Phases: its s phases of
// columns s * u + p, padded with zeros), so that every offset's columns are
// at unit stride (no strided loads).
//
//   local_relation_forward_cpu: tasks are (sample, group, output row);
//     a thread's consecutive rows keep their regrouped window rows in a
//     ring (each input row regrouped once per chunk). Rows are padded to
//     whole vector blocks: an offset's out-of-map columns get weight 0 (a
//     mask, no scalar remainders). Three passes over the row's window: the
//     logits and their running max over the in-map offsets (NaN wins, as
//     torch.maximum), the weights exp(logit - max) and their sum, then the
//     channels' weighted sums, several channels at a time with their sums
//     in registers. Returns the output and the log-sum-exp max + log(sum)
//     per position, which backward recomputes the weights from.
//   local_relation_backward_cpu: tasks are (sample, group) planes, so a
//     task owns its planes of every gradient but the prior's (no atomics).
//     The task's value and key planes are regrouped (Phases) once, and
//     the value's and the key's gradients summed in that layout, then
//     written back. Per output row: the weights w_d = exp(logit_d - lse);
//     then per vector block of columns and block of channels, over the
//     window: out += w_d * value(d) (the output recomputed, and returned;
//     its sums in registers), dw_d += grad_out * value(d) (in registers
//     over the channels) and grad_value(d) += w_d * grad_out (scattered
//     into the task's planes); D = sum over the group's channels of
//     grad_out * out; then dlogit_d = w_d (dw_d - D) feeds grad_query (a
//     row at a time), grad_key(d) (scattered) and the task's partial sums
//     of the prior's gradient, which are added over the samples in a fixed
//     order after.
//
// Contiguous float32 / float64 CPU tensors, all of one dtype; logits and
// weights in that dtype (float exp: vec_math.h's polynomial), and so are
// the sums with few terms, as on the torch backend: the softmax's and the
// output's weighted values (at most k * k terms), dw and D (m terms), the
// query's, the key's and the value's gradients (at most k * k terms
// each); the prior's sums (over every position) in double. The same bits
// every run, at any thread count.
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

// Per column offset dj, a row of Wp (the padded output row): 1 on its
// in-map output columns, 0 elsewhere (the padding included).
template <typename T>
std::vector<T> in_map_columns(const Geometry& g, int64_t Wp) {
  std::vector<T> valid(static_cast<size_t>(g.k * Wp), T(0));
  for (int64_t dj = 0; dj < g.k; ++dj)
    for (int64_t j = g.col_lo[dj]; j < std::min(g.col_hi[dj], g.Wo); ++j)
      valid[dj * Wp + j] = T(1);
  return valid;
}

// GCC / Clang vectors of 64 bytes (lowered to the ISA's registers), loaded
// and stored at any alignment
template <typename T> struct VecOf;
template <> struct VecOf<float> {
  typedef float type __attribute__((vector_size(64), aligned(4)));
  typedef int32_t index __attribute__((vector_size(64)));  // lane indices
  static constexpr int64_t kLanes = 16;
};
template <> struct VecOf<double> {
  typedef double type __attribute__((vector_size(64), aligned(8)));
  typedef int64_t index __attribute__((vector_size(64)));
  static constexpr int64_t kLanes = 8;
};

// A row of an input plane regrouped for a stride: its s phases (the input
// columns x = s * u + p for phase p), each padded with P zeros on both
// sides, so that an offset's input column s * j + dx of every output
// column j lies at one unit-stride pointer: phase (dx mod s), u = j +
// floor(dx / s). Columns outside the map read zeros (an out-of-map
// offset's weight is 0 there: 0 * 0 adds nothing).
struct Phases {
  int64_t s, P, L;
  std::vector<int64_t> off;  // per column offset dj: its pointer's offset
  // Wp: the row's width padded (a multiple of the vector blocks); a phase's
  // length L rounded up to a multiple of `align` (whole vectors)
  Phases(const Geometry& g, int64_t Wp, int64_t align = 1)
      : s(g.s), P((g.r + g.s - 1) / g.s),
        L((Wp + 2 * ((g.r + g.s - 1) / g.s) + align - 1) / align * align) {
    for (int64_t dj = 0; dj < g.k; ++dj) {
      const int64_t dx = dj - g.r;
      const int64_t fl = dx >= 0 ? dx / s : -((-dx + s - 1) / s);
      off.push_back((dx - fl * s) * L + P + fl);
    }
  }
  int64_t size() const { return s * L; }
};

// row[2 u + p] into phase p's u for both phases, a vector of each at a
// time from two loads (one two-source shuffle each, in place of the
// generic loop's scalar stride-2 loads); returns the first u not done (the
// rest: scalar; all of it where the compiler has no __builtin_shuffle,
// Clang).
template <typename T>
int64_t split_even_odd(const T* __restrict__ row, int64_t W,
                       T* __restrict__ even, T* __restrict__ odd) {
#if defined(__clang__)
  return 0;
#else
  using vec = typename VecOf<T>::type;
  using index = typename VecOf<T>::index;
  constexpr int64_t V = VecOf<T>::kLanes;
  index evens, odds;
  for (int64_t l = 0; l < V; ++l) {
    evens[l] = 2 * l;
    odds[l] = 2 * l + 1;
  }
  int64_t u = 0;
  for (; 2 * (u + V) <= W; u += V) {
    const vec a = *reinterpret_cast<const vec*>(row + 2 * u);
    const vec b = *reinterpret_cast<const vec*>(row + 2 * u + V);
    *reinterpret_cast<vec*>(even + u) = __builtin_shuffle(a, b, evens);
    *reinterpret_cast<vec*>(odd + u) = __builtin_shuffle(a, b, odds);
  }
  return u;
#endif
}

// The inverse: dst[2 u + p] = phase p's u for u < done (returned),
// 2 * done <= W (the rest: scalar; Clang: all of it).
template <typename T>
int64_t merge_even_odd(const T* __restrict__ even,
                       const T* __restrict__ odd, int64_t W,
                       T* __restrict__ dst) {
#if defined(__clang__)
  return 0;
#else
  using vec = typename VecOf<T>::type;
  using index = typename VecOf<T>::index;
  constexpr int64_t V = VecOf<T>::kLanes;
  index low, high;  // lane l of the result: even[l / 2] or odd[l / 2]
  for (int64_t l = 0; l < V; ++l) {
    low[l] = l / 2 + (l % 2) * V;
    high[l] = V / 2 + l / 2 + (l % 2) * V;
  }
  int64_t u = 0;
  for (; 2 * (u + V) <= W; u += V) {
    const vec e = *reinterpret_cast<const vec*>(even + u);
    const vec o = *reinterpret_cast<const vec*>(odd + u);
    *reinterpret_cast<vec*>(dst + 2 * u) = __builtin_shuffle(e, o, low);
    *reinterpret_cast<vec*>(dst + 2 * u + V) = __builtin_shuffle(e, o, high);
  }
  return u;
#endif
}

template <typename T>
void fill_phases(const Phases& ph, const T* __restrict__ row, int64_t W,
                 T* __restrict__ buf) {
  const int64_t s = ph.s, P = ph.P, L = ph.L;
  // phase p's columns: min(L - P, ceil((W - p) / s))
  auto count = [&](int64_t p) {
    return W > p ? std::min(L - P, (W - p + s - 1) / s) : int64_t(0);
  };
  int64_t done = 0;  // columns u of every phase already written
  if (s == 2 && count(0) == (W + 1) / 2)
    done = split_even_odd(row, W, buf + P, buf + L + P);
  for (int64_t p = 0; p < s; ++p) {
    T* __restrict__ b = buf + p * L;
    const int64_t n = count(p);
    std::fill(b, b + P, T(0));
    if (s == 1) {
      std::copy(row, row + n, b + P);
    } else {
      const T* __restrict__ src = row + p;
#pragma omp simd
      for (int64_t u = done; u < n; ++u) b[P + u] = src[u * s];
    }
    std::fill(b + P + n, b + L, T(0));
  }
}

// One offset's logits along the padded row, with the running max over
// its in-map columns (valid: 1 there, 0 elsewhere; a whole row of vector
// blocks, no scalar remainder); krow: the offset's key columns at unit
// stride (Phases), q: the query's row padded with zeros.
template <Similarity M, typename T>
void tap_logits(const T* __restrict__ q, const T* __restrict__ krow, T p,
                const T* __restrict__ valid, int64_t Wp, T* __restrict__ logit,
                T* __restrict__ peak) {
#pragma omp simd
  for (int64_t j = 0; j < Wp; ++j) {
    const T l = phi<M>(q[j], krow[j]) + p;
    logit[j] = l;
    const T best = peak[j];
    // NaN wins and stays
    peak[j] = (valid[j] != T(0) && (l > best || l != l)) ? l : best;
  }
}

// One offset's weights exp(logit - max) along the padded row, 0 outside
// its in-map columns, and their sum (in the dtype: at most k * k terms in
// [0, 1]).
template <typename T>
void tap_exp(const T* __restrict__ peak, const T* __restrict__ valid,
             int64_t Wp, T* __restrict__ w, T* __restrict__ total) {
#pragma omp simd
  for (int64_t j = 0; j < Wp; ++j) {
    const T e = weight_exp(T(w[j] - peak[j]));
    const T x = valid[j] != T(0) ? e : T(0);
    w[j] = x;
    total[j] += x;
  }
}

// the output: the weighted sum times 1 / the softmax's sum (float: a
// product with the reciprocal; double: the quotient)
inline float scale_out(float a, float inv, float) { return a * inv; }
inline double scale_out(double a, double, double tot) { return a / tot; }

// channels per pass over a row's weights: their sums' vectors stay in
// registers (32 of them on AVX-512, 16 narrower ones on AVX2)
#if defined(__AVX512F__)
constexpr int kChannelBlock = 8;
#else
constexpr int kChannelBlock = 4;
#endif

// The output row i of NC channels from plane `first` on: per vector block
// of columns, the channels' sums stay in registers over a window row's
// offsets (the same order of terms as one channel at a time).
template <int NC, typename T>
void weighted_sums(const Geometry& g, const Phases& ph, int64_t Wp,
                   int64_t first, int64_t i, int64_t di_lo,
                   int64_t di_hi, const T* __restrict__ weights,
                   const T* __restrict__ iv, const T* __restrict__ tot,
                   const T* const* rows, T* __restrict__ acc, T* out) {
  using vec = typename VecOf<T>::type;
  constexpr int64_t V = VecOf<T>::kLanes;
  const int64_t Wo = g.Wo;
  std::fill(acc, acc + NC * Wp, T(0));
  for (int64_t di = di_lo; di < di_hi; ++di) {
    const T* rb[NC];  // the channels' window row di (Phases)
    for (int c = 0; c < NC; ++c) rb[c] = rows[c * g.k + di];
    const T* wrow = weights + di * g.k * Wp;
    for (int64_t jb = 0; jb < Wp; jb += V) {
      vec a[NC];
      for (int c = 0; c < NC; ++c) a[c] = *reinterpret_cast<const vec*>(acc + c * Wp + jb);
      for (int64_t dj = 0; dj < g.k; ++dj) {
        const vec w = *reinterpret_cast<const vec*>(wrow + dj * Wp + jb);
        const int64_t o = ph.off[dj] + jb;
        for (int c = 0; c < NC; ++c)
          a[c] += w * *reinterpret_cast<const vec*>(rb[c] + o);
      }
      for (int c = 0; c < NC; ++c) *reinterpret_cast<vec*>(acc + c * Wp + jb) = a[c];
    }
  }
  for (int c = 0; c < NC; ++c) {
    const T* __restrict__ a = acc + c * Wp;
    T* __restrict__ orow = out + ((first + c) * g.Ho + i) * Wo;
#pragma omp simd
    for (int64_t j = 0; j < Wo; ++j) orow[j] = scale_out(a[j], iv[j], tot[j]);
  }
}

template <typename T>
void forward_kernel(const Geometry& g, Similarity method, const T* query,
                    const T* key, const T* value, const T* prior, T* out,
                    T* lse) {
  const int64_t Wo = g.Wo, taps = g.taps;
  const int64_t s = g.s;
  // rows padded to whole vector blocks (0 weights and values there)
  constexpr int64_t V = VecOf<T>::kLanes;
  const int64_t Wp = (Wo + V - 1) / V * V;
  const Phases ph(g, Wp);
  const std::vector<T> valid = in_map_columns<T>(g, Wp);
  // rows per task chunk: about 64k multiply-adds of weighted sums each
  const int64_t work = std::max<int64_t>(1, g.m * taps * Wo);
  const int64_t grain = std::max<int64_t>(1, 65536 / work);
  at::parallel_for(0, g.B * g.G * g.Ho, grain, [&](int64_t begin,
                                                  int64_t end) {
    std::vector<T> weights(static_cast<size_t>(taps * Wp));
    std::vector<T> peak(static_cast<size_t>(Wp));
    std::vector<T> qpad(static_cast<size_t>(Wp), T(0));
    std::vector<T> inv(static_cast<size_t>(Wo));
    std::vector<T> total(static_cast<size_t>(Wp));
    std::vector<T> acc(static_cast<size_t>(kChannelBlock * Wp));
    // a ring of each plane's window rows (the value's m channels, then
    // the key), input row y in slot y % k: consecutive output rows of a
    // task chunk share their input rows, regrouped once
    const int64_t len = ph.size();
    std::vector<T> ring(static_cast<size_t>((g.m + 1) * g.k * len));
    std::vector<int64_t> tag(static_cast<size_t>((g.m + 1) * g.k), -1);
    std::vector<const T*> rows(static_cast<size_t>((g.m + 1) * g.k));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task % g.Ho, bg = task / g.Ho;
      const int64_t b = bg / g.G, grp = bg % g.G;
      const int64_t di_lo = g.row_lo(i), di_hi = g.row_hi(i);
      T* __restrict__ q = qpad.data();  // (zeros past Wo)
      std::copy(query + (bg * g.Ho + i) * Wo, query + (bg * g.Ho + i + 1) * Wo,
                q);
      const T* __restrict__ pr = prior + grp * taps;
      T* __restrict__ pk = peak.data();
      // plane c's input row y (c = m: the key's) regrouped
      auto window_row = [&](int64_t c, int64_t y) -> const T* {
        const int64_t slot = c * g.k + y % g.k, id = bg * g.H + y;
        T* buf = ring.data() + slot * len;
        if (tag[slot] != id) {
          const T* src = c < g.m ? value + (b * g.C + grp * g.m + c) * g.H * g.W
                                 : key + bg * g.H * g.W;
          fill_phases(ph, src + y * g.W, g.W, buf);
          tag[slot] = id;
        }
        return buf;
      };
      T* __restrict__ tot = total.data();
      std::fill(pk, pk + Wp, -std::numeric_limits<T>::infinity());
      // pass 1: logits and their max
      for (int64_t di = di_lo; di < di_hi; ++di) {
        const T* rb = window_row(g.m, i * s + di - g.r);
        for (int64_t dj = 0; dj < g.k; ++dj) {
          const int64_t t = di * g.k + dj;
          const T* vd = valid.data() + dj * Wp;
          const T* krow = rb + ph.off[dj];
          T* lt = weights.data() + t * Wp;
          switch (method) {
            case Similarity::kSquaredDifference:
              tap_logits<Similarity::kSquaredDifference>(q, krow, pr[t], vd,
                                                         Wp, lt, pk);
              break;
            case Similarity::kDotProduct:
              tap_logits<Similarity::kDotProduct>(q, krow, pr[t], vd, Wp,
                                                  lt, pk);
              break;
            case Similarity::kAbsoluteDifference:
              tap_logits<Similarity::kAbsoluteDifference>(q, krow, pr[t], vd,
                                                          Wp, lt, pk);
              break;
          }
        }
      }
      // pass 2: the weights exp(logit - max) and their sum
      std::fill(tot, tot + Wp, T(0));
      for (int64_t di = di_lo; di < di_hi; ++di) {
        for (int64_t dj = 0; dj < g.k; ++dj) {
          tap_exp(pk, valid.data() + dj * Wp, Wp,
                  weights.data() + (di * g.k + dj) * Wp, tot);
        }
      }
      T* __restrict__ lr = lse + (bg * g.Ho + i) * Wo;
      T* __restrict__ iv = inv.data();
      for (int64_t j = 0; j < Wo; ++j) {
        lr[j] = T(double(pk[j]) + std::log(double(tot[j])));
        iv[j] = T(1.0 / double(tot[j]));
      }
      // pass 3: each channel's weighted sum (in the dtype: at most k * k
      // terms), every offset over the whole padded row (0 weights off the
      // map), kChannelBlock channels at a time (then 4, then one at a time)
      for (int64_t c = 0; c < g.m; ++c)
        for (int64_t di = di_lo; di < di_hi; ++di)
          rows[c * g.k + di] = window_row(c, i * s + di - g.r);
      int64_t c = 0;
      for (; c + kChannelBlock <= g.m; c += kChannelBlock)
        weighted_sums<kChannelBlock>(g, ph, Wp, b * g.C + grp * g.m + c, i,
                              di_lo, di_hi, weights.data(), iv, tot,
                              rows.data() + c * g.k,
                              acc.data(), out);
      for (; c + 4 <= g.m; c += 4)
        weighted_sums<4>(g, ph, Wp, b * g.C + grp * g.m + c, i,
                              di_lo, di_hi, weights.data(), iv, tot,
                              rows.data() + c * g.k,
                              acc.data(), out);
      for (; c < g.m; ++c)
        weighted_sums<1>(g, ph, Wp, b * g.C + grp * g.m + c, i,
                         di_lo, di_hi, weights.data(), iv, tot,
                         rows.data() + c * g.k,
                         acc.data(), out);
    }
  });
}

// --------------------------------------------------------------- backward

// One offset's weights exp(logit - lse) along the padded row, 0 outside
// its in-map columns (valid: 1 there; a whole row of vector blocks, no
// scalar remainder: at 14 or 7 columns a remainder loop was all there was);
// krow: the offset's key columns at unit stride (Phases), q and lse: rows
// padded with zeros.
template <Similarity M, typename T>
void tap_weights(const T* __restrict__ q, const T* __restrict__ krow, T p,
                 const T* __restrict__ lse, const T* __restrict__ valid,
                 int64_t Wp, T* __restrict__ w) {
#pragma omp simd
  for (int64_t j = 0; j < Wp; ++j) {
    const T l = phi<M>(q[j], krow[j]) + p;
    const T e = weight_exp(T(l - lse[j]));
    w[j] = valid[j] != T(0) ? e : T(0);
  }
}

// One offset's logit gradients dlogit = w (dw - D) along the padded row (0
// outside its in-map columns, whatever the padding holds): into the query's
// row, the key's regrouped row (scattered; its padding is never copied
// back) and the offset's prior sum (returned); in the dtype (each element
// at most k * k terms).
template <Similarity M, typename T>
T tap_logit_grads(const T* __restrict__ q, const T* __restrict__ krow,
                  const T* __restrict__ w, const T* __restrict__ dw,
                  const T* __restrict__ D, const T* __restrict__ valid,
                  int64_t Wp, T* __restrict__ gq, T* __restrict__ gkrow) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < Wp; ++j) {
    const bool in = valid[j] != T(0);
    const T dl = in ? w[j] * (dw[j] - D[j]) : T(0);
    sum += dl;
    gq[j] += in ? dl * phi_grad_query<M>(q[j], krow[j]) : T(0);
    gkrow[j] += in ? dl * phi_grad_key<M>(q[j], krow[j]) : T(0);
  }
  return sum;
}

// An output row's NC channels from the group's channel `c0` on, a vector
// block of columns at a time over the whole padded row: the output
// (sum_d w_d value(d), its sums in registers over the window) and dw_d
// (sum over the channels of grad_out * value(d), in registers over the
// channels; the first channel block writes it, the others add).
// Out-of-map offsets have weight 0 and read the rows' zero padding.
// (weights, go: rows of stride WB)
template <int NC, typename T>
void channel_block(const Geometry& g, const Phases& ph, int64_t Wp,
                   int64_t WB, int64_t i, int64_t c0, int64_t plen,
                   const T* __restrict__ weights, const T* __restrict__ go,
                   const T* __restrict__ vph, T* __restrict__ dweights,
                   T* __restrict__ acc) {
  using vec = typename VecOf<T>::type;
  constexpr int64_t V = VecOf<T>::kLanes;
  const int64_t di_lo = g.row_lo(i), di_hi = g.row_hi(i);
  const int64_t len = ph.size();
  for (int64_t jb = 0; jb < Wp; jb += V) {
    vec gout[NC], sum[NC];
    for (int c = 0; c < NC; ++c) {
      gout[c] = *reinterpret_cast<const vec*>(go + (c0 + c) * WB + jb);
      sum[c] = vec{};
    }
    for (int64_t di = di_lo; di < di_hi; ++di) {
      const int64_t row = (i * g.s + di - g.r) * len;
      for (int64_t dj = 0; dj < g.k; ++dj) {
        const int64_t t = di * g.k + dj;
        const int64_t at = row + ph.off[dj] + jb;
        const vec w = *reinterpret_cast<const vec*>(weights + t * WB + jb);
        vec* dwp = reinterpret_cast<vec*>(dweights + t * Wp + jb);
        vec dw = c0 == 0 ? vec{} : *dwp;
        for (int c = 0; c < NC; ++c) {
          const vec v = *reinterpret_cast<const vec*>(
              vph + (c0 + c) * plen + at);
          dw += gout[c] * v;
          sum[c] += w * v;
        }
        *dwp = dw;
      }
    }
    for (int c = 0; c < NC; ++c)
      *reinterpret_cast<vec*>(acc + (c0 + c) * Wp + jb) = sum[c];
  }
}

// grad_value(d) += w_d grad_out for an output row's NC channels from `c0`
// on, input-centric along the regrouped rows: per window row, phase and
// vector block of a regrouped input row, the sum over that phase's column
// offsets of w_d grad_out at the output columns that reach it (the weight
// and grad_out rows read shifted: zero margins), one add into the plane
// per block (offsets adding into one block one after another would reload
// overlapping vectors still being stored).
template <int NC, typename T>
void value_grads(const Geometry& g, const Phases& ph, int64_t WB, int64_t i,
                 int64_t c0, int64_t plen, const T* __restrict__ weights,
                 const T* __restrict__ go, T* __restrict__ gvph) {
  using vec = typename VecOf<T>::type;
  constexpr int64_t V = VecOf<T>::kLanes;
  const int64_t di_lo = g.row_lo(i), di_hi = g.row_hi(i);
  const int64_t len = ph.size();
  for (int64_t di = di_lo; di < di_hi; ++di) {
    const int64_t row = (i * g.s + di - g.r) * len;
    for (int64_t p = 0; p < ph.s; ++p) {
      const int64_t base = p * ph.L;  // the phase's start in the row
      for (int64_t zb = 0; zb < ph.L; zb += V) {
        vec sum[NC];
        for (int c = 0; c < NC; ++c) sum[c] = vec{};
        for (int64_t dj = 0; dj < g.k; ++dj) {
          const int64_t shift = ph.off[dj] - base;  // this phase's offsets
          if (shift < 0 || shift >= ph.L) continue;
          const int64_t j = zb - shift;  // the output columns (margins)
          const vec w = *reinterpret_cast<const vec*>(
              weights + (di * g.k + dj) * WB + j);
          for (int c = 0; c < NC; ++c)
            sum[c] += w * *reinterpret_cast<const vec*>(go + (c0 + c) * WB +
                                                        j);
        }
        for (int c = 0; c < NC; ++c) {
          vec* gv = reinterpret_cast<vec*>(gvph + (c0 + c) * plen + row +
                                           base + zb);
          *gv += sum[c];
        }
      }
    }
  }
}

template <typename T>
void backward_kernel(const Geometry& g, Similarity method, const T* grad_out,
                     const T* query, const T* key, const T* value,
                     const T* prior, const T* lse, T* out, T* grad_query,
                     T* grad_key, T* grad_value, double* prior_partial) {
  const int64_t Wo = g.Wo, taps = g.taps, HW = g.H * g.W;
  constexpr int64_t V = VecOf<T>::kLanes;
  const int64_t Wp = (Wo + V - 1) / V * V;
  // the task's value and key planes, and its gradients' sums, regrouped a
  // row at a time (Phases: zero padding, the stride's phases), so that
  // every offset's columns are at unit stride; the sums go back to the map
  // at the end
  const Phases ph(g, Wp, V);
  const int64_t len = ph.size();
  // the weight and grad_out rows: Wp columns between zero margins of M
  // (value_grads reads them shifted by up to a phase's length)
  const int64_t M = (ph.L + V - 1) / V * V, WB = Wp + 2 * M;
  // the regrouped planes' stride: whole 4 KiB pages and one vector more,
  // so that the group's planes start at distinct cache sets (at a multiple
  // of 4 KiB apart, e.g. a 512x832 map's, the same element of every plane
  // fell in one set: 2 x m lines per offset in an 8-way L1, 5x the time)
  constexpr int64_t kPage = 4096 / sizeof(T);
  const int64_t plen = (g.H * len + kPage - 1) / kPage * kPage + V;
  const std::vector<T> valid = in_map_columns<T>(g, Wp);
  at::parallel_for(0, g.B * g.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> vph(static_cast<size_t>(g.m * plen));
    std::vector<T> gvph(static_cast<size_t>(g.m * plen));
    std::vector<T> kph(static_cast<size_t>(plen));
    std::vector<T> gkph(static_cast<size_t>(plen));
    // a row's weights and dw per offset, padded to whole vector blocks
    // (the weights 0 outside an offset's in-map columns: never written)
    std::vector<T> weight_rows(static_cast<size_t>(taps * WB), T(0));
    std::vector<T> dweights(static_cast<size_t>(taps * Wp));
    std::vector<T> go_rows(static_cast<size_t>(g.m * WB), T(0));
    T* const weights = weight_rows.data() + M;  // row t: weights + t * WB
    T* const go = go_rows.data() + M;
    std::vector<T> acc(static_cast<size_t>(g.m * Wp));
    std::vector<T> d_total(static_cast<size_t>(Wp));
    std::vector<T> gq(static_cast<size_t>(Wp));
    // the row's query and log-sum-exp, padded with zeros
    std::vector<T> qpad(static_cast<size_t>(Wp), T(0));
    std::vector<T> lpad(static_cast<size_t>(Wp), T(0));
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / g.G, grp = bg % g.G;
      const int64_t first = b * g.C + grp * g.m;  // the group's first plane
      const T* kplane = key + bg * HW;
      T* gkplane = grad_key + bg * HW;
      const T* __restrict__ pr = prior + grp * taps;
      double* __restrict__ pp = prior_partial + bg * taps;
      std::fill(pp, pp + taps, 0.0);
      for (int64_t y = 0; y < g.H; ++y) {
        fill_phases(ph, kplane + y * g.W, g.W, kph.data() + y * len);
        for (int64_t c = 0; c < g.m; ++c)
          fill_phases(ph, value + (first + c) * HW + y * g.W, g.W,
                      vph.data() + c * plen + y * len);
      }
      std::fill(gvph.begin(), gvph.end(), T(0));
      std::fill(gkph.begin(), gkph.end(), T(0));
      // input row y's offset dj: the pointer its output columns j index
      auto at = [&](auto* regrouped, int64_t y, int64_t dj) {
        return regrouped + y * len + ph.off[dj];
      };
      for (int64_t i = 0; i < g.Ho; ++i) {
        const int64_t di_lo = g.row_lo(i), di_hi = g.row_hi(i);
        const int64_t row = (bg * g.Ho + i) * Wo;
        T* __restrict__ q = qpad.data();
        T* __restrict__ lr = lpad.data();
        std::copy(query + row, query + row + Wo, q);
        std::copy(lse + row, lse + row + Wo, lr);
        // the weights
        for (int64_t di = di_lo; di < di_hi; ++di) {
          const int64_t y = i * g.s + di - g.r;
          for (int64_t dj = 0; dj < g.k; ++dj) {
            const int64_t t = di * g.k + dj;
            const T* kb = at(kph.data(), y, dj);
            const T* vd = valid.data() + dj * Wp;
            T* w = weights + t * WB;
            switch (method) {
              case Similarity::kSquaredDifference:
                tap_weights<Similarity::kSquaredDifference>(q, kb, pr[t], lr,
                                                            vd, Wp, w);
                break;
              case Similarity::kDotProduct:
                tap_weights<Similarity::kDotProduct>(q, kb, pr[t], lr, vd,
                                                     Wp, w);
                break;
              case Similarity::kAbsoluteDifference:
                tap_weights<Similarity::kAbsoluteDifference>(q, kb, pr[t],
                                                             lr, vd, Wp, w);
                break;
            }
          }
        }
        // the group's grad_out rows, padded with zeros
        for (int64_t c = 0; c < g.m; ++c) {
          const T* src = grad_out + ((first + c) * g.Ho + i) * Wo;
          std::copy(src, src + Wo, go + c * WB);
        }
        // the output, dw and grad_value, kChannelBlock channels at a time
        int64_t c = 0;
        for (; c + kChannelBlock <= g.m; c += kChannelBlock) {
          channel_block<kChannelBlock>(g, ph, Wp, WB, i, c, plen, weights, go,
                                       vph.data(), dweights.data(),
                                       acc.data());
          value_grads<kChannelBlock>(g, ph, WB, i, c, plen, weights, go,
                                     gvph.data());
        }
        for (; c + 4 <= g.m; c += 4) {
          channel_block<4>(g, ph, Wp, WB, i, c, plen, weights, go,
                           vph.data(), dweights.data(), acc.data());
          value_grads<4>(g, ph, WB, i, c, plen, weights, go, gvph.data());
        }
        for (; c < g.m; ++c) {
          channel_block<1>(g, ph, Wp, WB, i, c, plen, weights, go,
                           vph.data(), dweights.data(), acc.data());
          value_grads<1>(g, ph, WB, i, c, plen, weights, go, gvph.data());
        }
        // the output rows; D = sum over the channels of grad_out * out
        T* __restrict__ D = d_total.data();
        std::fill(D, D + Wp, T(0));
        for (int64_t c = 0; c < g.m; ++c) {
          const T* __restrict__ a = acc.data() + c * Wp;
          const T* __restrict__ gor = go + c * WB;
          std::copy(a, a + Wo, out + ((first + c) * g.Ho + i) * Wo);
#pragma omp simd
          for (int64_t j = 0; j < Wp; ++j) D[j] += gor[j] * a[j];
        }
        // dlogit_d = w_d (dw_d - D): the query's, the key's and the
        // prior's gradients
        T* __restrict__ gqr = gq.data();
        std::fill(gqr, gqr + Wp, T(0));
        for (int64_t di = di_lo; di < di_hi; ++di) {
          const int64_t y = i * g.s + di - g.r;
          for (int64_t dj = 0; dj < g.k; ++dj) {
            const int64_t t = di * g.k + dj;
            const T* kb = at(kph.data(), y, dj);
            T* gkb = at(gkph.data(), y, dj);
            const T* vd = valid.data() + dj * Wp;
            const T* w = weights + t * WB;
            const T* dw = dweights.data() + t * Wp;
            T sum = 0;
            switch (method) {
              case Similarity::kSquaredDifference:
                sum = tap_logit_grads<Similarity::kSquaredDifference>(
                    q, kb, w, dw, D, vd, Wp, gqr, gkb);
                break;
              case Similarity::kDotProduct:
                sum = tap_logit_grads<Similarity::kDotProduct>(
                    q, kb, w, dw, D, vd, Wp, gqr, gkb);
                break;
              case Similarity::kAbsoluteDifference:
                sum = tap_logit_grads<Similarity::kAbsoluteDifference>(
                    q, kb, w, dw, D, vd, Wp, gqr, gkb);
                break;
            }
            pp[t] += double(sum);
          }
        }
        std::copy(gqr, gqr + Wo, grad_query + row);
      }
      // the regrouped sums back to the map
      for (int64_t y = 0; y < g.H; ++y) {
        for (int64_t c = 0; c <= g.m; ++c) {
          const T* src = c < g.m ? gvph.data() + c * plen + y * len
                                 : gkph.data() + y * len;
          T* dst = (c < g.m ? grad_value + (first + c) * HW : gkplane) +
                   y * g.W;
          if (ph.s == 1) {
            std::copy(src + ph.P, src + ph.P + g.W, dst);
            continue;
          }
          const int64_t done =
              ph.s == 2 ? merge_even_odd(src + ph.P, src + ph.L + ph.P, g.W,
                                         dst)
                        : 0;
          for (int64_t p = 0; p < ph.s; ++p)
            for (int64_t u = done; p + u * ph.s < g.W; ++u)
              dst[p + u * ph.s] = src[p * ph.L + ph.P + u];
        }
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
local_relation_backward_cpu(const at::Tensor& grad_out,
                            const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& value, const at::Tensor& prior,
                            const at::Tensor& lse,
                            int64_t kernel_size, int64_t stride,
                            c10::string_view method) {
  const Similarity sim = parse_similarity(method);
  const Geometry g =
      check_inputs(query, key, value, prior, kernel_size, stride);
  check_map(grad_out, value, {g.B, g.C, g.Ho, g.Wo}, "grad_out");
  check_map(lse, value, {g.B, g.G, g.Ho, g.Wo}, "lse");
  at::Tensor grad_query = at::zeros_like(query);
  at::Tensor grad_key = at::empty_like(key);
  at::Tensor grad_value = at::empty_like(value);
  at::Tensor grad_prior = at::zeros_like(prior);
  at::Tensor out = at::empty({g.B, g.C, g.Ho, g.Wo}, value.options());
  if (lse.numel() == 0) {
    grad_key.zero_();
    grad_value.zero_();
    return {grad_query, grad_key, grad_value, grad_prior, out};
  }
  // per (sample, group), its sums of the prior's gradient
  std::vector<double> partial(static_cast<size_t>(g.B * g.G * g.taps));
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "local_relation_backward",
                             [&] {
    using T = scalar_t;
    backward_kernel<T>(g, sim, grad_out.data_ptr<T>(), query.data_ptr<T>(),
        key.data_ptr<T>(), value.data_ptr<T>(), prior.data_ptr<T>(),
        lse.data_ptr<T>(), out.data_ptr<T>(), grad_query.data_ptr<T>(),
        grad_key.data_ptr<T>(), grad_value.data_ptr<T>(), partial.data());
    // the samples' sums added in order: the same bits every run
    T* gp = grad_prior.data_ptr<T>();
    for (int64_t gt = 0; gt < g.G * g.taps; ++gt) {
      double sum = 0;
      for (int64_t b = 0; b < g.B; ++b) sum += partial[b * g.G * g.taps + gt];
      gp[gt] = T(sum);
    }
  });
  return {grad_query, grad_key, grad_value, grad_prior, out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prm_det, m) {
  m.def(
      "local_relation_forward_cpu(Tensor query, Tensor key, Tensor value, "
      "Tensor prior, int kernel_size, int stride, str method) "
      "-> (Tensor, Tensor)");
  m.def(
      "local_relation_backward_cpu(Tensor grad_out, Tensor query, "
      "Tensor key, Tensor value, Tensor prior, Tensor lse, "
      "int kernel_size, int stride, str method) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(prm_det, CPU, m) {
  m.impl("local_relation_forward_cpu", &local_relation_forward_cpu);
  m.impl("local_relation_backward_cpu", &local_relation_backward_cpu);
}

}  // namespace prm_det
