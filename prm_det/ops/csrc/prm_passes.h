// PRM CPU kernel: the per-group passes of forward and backward over one
// group's [cg, P] block (see prm_cpu.cpp for the plan).
#pragma once

#include <ATen/ATen.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "prm_types.h"
#include "vec_math.h"

namespace prm_det {
namespace {

// Half the Gaussian of every row distance 0..h-1 (out[0, h)) and column
// distance 0..w-1 (out[h, h + w)): the position weight's two 1-D halves
// before they are centred on a query. theta and sigma are per layer, so one
// table serves every group of a call.
std::vector<double> distance_gaussians(const Options& o, double theta_row,
                                       double theta_col, double sigma) {
  const double sr = o.normalized ? 1.0 / std::max<int64_t>(o.h - 1, 1) : 1.0;
  const double sc = o.normalized ? 1.0 / std::max<int64_t>(o.w - 1, 1) : 1.0;
  const double norm = 0.5 * kInvSqrt2Pi / sigma;
  std::vector<double> out(o.h + o.w);
  for (int64_t d = 0; d < o.h; ++d) {
    const double t = theta_row * d * sr / sigma;
    out[d] = norm * std::exp(-0.5 * t * t);
  }
  for (int64_t d = 0; d < o.w; ++d) {
    const double t = theta_col * d * sc / sigma;
    out[o.h + d] = norm * std::exp(-0.5 * t * t);
  }
  return out;
}

// Row and column halves of the position weight: D[i * w + j] = hr[i] + hc[j]
// (the mean of two 1-D Gaussians, the 1/2 in each table).
template <typename T>
void position_tables(const Options& o, const Params& p, int64_t qi, T* hr,
                     T* hc) {
  const int64_t qr = qi / o.w, qc = qi % o.w;
  for (int64_t i = 0; i < o.h; ++i)
    hr[i] = static_cast<T>(p.gauss_row[std::abs(i - qr)]);
  for (int64_t j = 0; j < o.w; ++j)
    hc[j] = static_cast<T>(p.gauss_col[std::abs(j - qc)]);
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
#if defined(__AVX512F__) || defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    gate_lanes(s, o.P, gain, mean, xi);
    return;
  }
#endif
#pragma omp simd
  for (int64_t k = 0; k < o.P; ++k) s[k] = sigmoid(xi + gain * (s[k] - mean));
}

// The map PRM reads: x itself, or the pre-BatchNorm map c with the
// per-channel affine x = c * a + b applied on the fly (BatchNorm with known
// statistics: eval in forward, and backward, which recomputes x).
template <typename T, bool FromNorm>
struct Source {
  const T* data;  // the group's [cg, P] block of x or c
  const T* a;     // the group's cg affine scales (FromNorm)
  const T* b;     // and shifts
  // One channel's row, with its affine hoisted out of the loops.
  struct Row {
    const T* __restrict__ p;
    T a, b;
    inline T operator()(int64_t k) const {
      if (FromNorm) return p[k] * a + b;
      return p[k];
    }
  };
  inline Row row(int64_t c, int64_t P) const {
    if (FromNorm) return Row{data + c * P, a[c], b[c]};
    return Row{data + c * P, T(1), T(0)};
  }
  inline T at(int64_t c, int64_t k, int64_t P) const { return row(c, P)(k); }
};

// Index of the first maximum (as torch.argmax): the maximum by a
// vectorized reduction, then the first position holding it.
template <typename T>
int64_t first_argmax(const T* v, int64_t n) {
  T best = v[0];
#pragma omp simd reduction(max : best)
  for (int64_t k = 0; k < n; ++k) best = v[k] > best ? v[k] : best;
  constexpr int64_t L = 64;  // scanned a block at a time
  for (int64_t k0 = 0; k0 < n; k0 += L) {
    const int64_t k1 = std::min(n, k0 + L);
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t k = k0; k < k1; ++k) hit |= v[k] == best;
    if (hit)
      for (int64_t k = k0; k < k1; ++k)
        if (v[k] == best) return k;
  }
  return 0;  // NaNs only
}

// Scratch of the calling thread, kept across calls and grown to the largest
// asked for: the passes' per-position buffers would otherwise be allocated
// (and, past malloc's mmap threshold, page-faulted in afresh) on every call.
// One user at a time per thread: take every buffer of a task from one call.
// Returns at least `bytes` bytes aligned for double.
inline void* thread_scratch(size_t bytes) {
  thread_local std::vector<double> buf;
  const size_t n = (bytes + sizeof(double) - 1) / sizeof(double);
  if (buf.size() < n) {
    std::vector<double>().swap(buf);  // free first: no two copies at once
    buf.resize(n);
  }
  return buf.data();
}

// Carves consecutive arrays out of thread_scratch.
class ScratchCarver {
 public:
  explicit ScratchCarver(char* base) : at_(base) {}
  template <typename U>
  U* take(int64_t count) {
    U* out = reinterpret_cast<U*>(at_);
    at_ += round_up(count * int64_t(sizeof(U)));
    return out;
  }
  template <typename U>
  static int64_t bytes(int64_t count) {
    return round_up(count * int64_t(sizeof(U)));
  }

 private:
  static int64_t round_up(int64_t b) { return (b + 63) / 64 * 64; }
  char* at_;
};

// Groups per parallel task: at least ~32K values of the map each, so that
// small maps (the last stages, small images) run on the calling thread
// instead of paying for waking the others.
inline int64_t group_grain(const Options& o) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, o.cg * o.P));
}

// Pass 1 over channels c .. c + 3: adds them to the channel sums cs (sets
// them if First) and stores their means in context.
template <bool First, typename T, bool FromNorm>
inline void channel_sums4(const Source<T, FromNorm>& x, int64_t c, int64_t P,
                          T* __restrict__ cs, T* context) {
  const auto r0 = x.row(c, P), r1 = x.row(c + 1, P), r2 = x.row(c + 2, P),
             r3 = x.row(c + 3, P);
  T a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t k = 0; k < P; ++k) {
    const T v0 = r0(k), v1 = r1(k), v2 = r2(k), v3 = r3(k);
    if (First) cs[k] = v0 + v1 + v2 + v3;
    else cs[k] = cs[k] + v0 + v1 + v2 + v3;
    a0 += v0;
    a1 += v1;
    a2 += v2;
    a3 += v3;
  }
  context[c] = a0 / static_cast<T>(P);
  context[c + 1] = a1 / static_cast<T>(P);
  context[c + 2] = a2 / static_cast<T>(P);
  context[c + 3] = a3 / static_cast<T>(P);
}

template <bool First, typename T, bool FromNorm>
inline void channel_sums1(const Source<T, FromNorm>& x, int64_t c, int64_t P,
                          T* __restrict__ cs, T* context) {
  const auto row = x.row(c, P);
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < P; ++k) {
    const T v = row(k);
    if (First) cs[k] = v;
    else cs[k] += v;
    acc += v;
  }
  context[c] = acc / static_cast<T>(P);
}

// B consecutive channel rows c .. c + B - 1 from position k0, with their
// affines (FromNorm) and query and context values: what the sweeps that
// accumulate over channels read.
template <int B, typename T, bool FromNorm>
struct ChannelRows {
  const T* p[B];
  T a[B], b[B], q[B], z[B];
  ChannelRows(const Source<T, FromNorm>& x, const T* query, const T* context,
              int64_t c, int64_t P, int64_t k0) {
    for (int i = 0; i < B; ++i) {
      const auto row = x.row(c + i, P);
      p[i] = row.p + k0;
      a[i] = row.a;
      b[i] = row.b;
      q[i] = query[c + i];
      z[i] = context[c + i];
    }
  }
  // x of row i at position k0 + l
  inline T operator()(int i, int64_t l) const {
    return FromNorm ? p[i][l] * a[i] + b[i] : p[i][l];
  }
};

// q . x_p and z . x_p over channels c .. c + B - 1 for the positions k0 ..
// k0 + len, added to aq and az (written, if First).
template <int B, bool First, typename T, bool FromNorm>
inline void similarity_sweep(const Source<T, FromNorm>& x, const T* query,
                             const T* context, int64_t c, int64_t P,
                             int64_t k0, int64_t len, T* __restrict__ aq,
                             T* __restrict__ az) {
  const ChannelRows<B, T, FromNorm> rows(x, query, context, c, P, k0);
#pragma omp simd
  for (int64_t l = 0; l < len; ++l) {
    T sq = First ? T(0) : aq[l], sz = First ? T(0) : az[l];
#pragma GCC unroll 4
    for (int i = 0; i < B; ++i) {
      const T v = rows(i, l);
      sq += rows.q[i] * v;
      sz += rows.z[i] * v;
    }
    aq[l] = sq;
    az[l] = sz;
  }
}

// q . x_p and z . x_p for the positions k0 .. k0 + len, accumulated over
// the channels into aq and az, four channels per sweep.
template <typename T, bool FromNorm>
inline void similarity_chunk(const Source<T, FromNorm>& x, const T* query,
                             const T* context, int64_t cg, int64_t P,
                             int64_t k0, int64_t len, T* aq, T* az) {
  int64_t c = 0;
  for (; c + 4 <= cg; c += 4) {
    if (c == 0) similarity_sweep<4, true>(x, query, context, c, P, k0, len,
                                          aq, az);
    else similarity_sweep<4, false>(x, query, context, c, P, k0, len, aq,
                                     az);
  }
  for (; c < cg; ++c) {
    if (c == 0) similarity_sweep<1, true>(x, query, context, c, P, k0, len,
                                          aq, az);
    else similarity_sweep<1, false>(x, query, context, c, P, k0, len, aq,
                                     az);
  }
}

template <typename T, bool FromNorm, bool HasIdentity, bool Relu>
void forward_group(const Options& o, const Params& p,
                   const Source<T, FromNorm>& x, const T* identity, T* y,
                   T* query, T* context, State& st, T* colsum, T* sq, T* sz,
                   T* hr, T* hc) {
  const int64_t P = o.P, cg = o.cg;
  // pass 1: the channel sum at every position and every channel's mean,
  // four channels per sweep (the sums are added in channel order all the
  // same)
  int64_t c = 0;
  for (; c + 4 <= cg; c += 4) {
    if (c == 0) channel_sums4<true>(x, c, P, colsum, context);
    else channel_sums4<false>(x, c, P, colsum, context);
  }
  for (; c < cg; ++c) {
    if (c == 0) channel_sums1<true>(x, c, P, colsum, context);
    else channel_sums1<false>(x, c, P, colsum, context);
  }
  const int64_t qi = first_argmax(colsum, P);
  st.query_index = qi;
  for (int64_t c = 0; c < cg; ++c) query[c] = x.at(c, qi, P);

  // pass 2, in chunks of whole rows that stay in L1: both similarities
  // accumulated over the channels, then S and its running mean and M2
  // (chunks merged as in Chan et al.'s parallel variance)
  if (o.use_position) position_tables(o, p, qi, hr, hc);
  T* s = colsum;  // reused
  const int64_t rows_per = std::max<int64_t>(1, kChunk / o.w);
  const T alpha = static_cast<T>(p.alpha), beta = static_cast<T>(p.beta);
  double mean = 0, m2 = 0;
  int64_t count = 0;
  for (int64_t i0 = 0; i0 < o.h; i0 += rows_per) {
    const int64_t i1 = std::min(o.h, i0 + rows_per);
    const int64_t k0 = i0 * o.w, len = (i1 - i0) * o.w;
    similarity_chunk(x, query, context, cg, P, k0, len, sq, sz);
    T* sc = s + k0;
    if (o.use_position) {
      for (int64_t i = i0; i < i1; ++i) {
        const T r = hr[i];
        const int64_t base = (i - i0) * o.w;
#pragma omp simd
        for (int64_t j = 0; j < o.w; ++j)
          sc[base + j] =
              alpha * sq[base + j] * (r + hc[j]) + beta * sz[base + j];
      }
    } else {
#pragma omp simd
      for (int64_t l = 0; l < len; ++l) sc[l] = alpha * sq[l] + beta * sz[l];
    }
    if (!o.use_norm) continue;
    double csum = 0;
#pragma omp simd reduction(+ : csum)
    for (int64_t l = 0; l < len; ++l) csum += sc[l];
    const double cmean = csum / len;
    double cm2 = 0;
#pragma omp simd reduction(+ : cm2)
    for (int64_t l = 0; l < len; ++l) {
      const double d = sc[l] - cmean;
      cm2 += d * d;
    }
    const int64_t total = count + len;
    const double delta = cmean - mean;
    mean += delta * len / total;
    m2 += cm2 + delta * delta * (double(count) * len / total);
    count = total;
  }
  if (o.use_norm) {
    const double var = m2 / std::max<int64_t>(P - 1, 1);
    st.mean = mean;
    st.std = std::sqrt(std::max(var, kTinyVar));
  } else {
    st.mean = 0;
    st.std = 1;
  }
  gate_from_map(o, p, st, s);

  // pass 3: y = x * gate (+ identity, ReLU)
  for (int64_t c = 0; c < cg; ++c) {
    const T* __restrict__ id = HasIdentity ? identity + c * P : nullptr;
    T* out = y + c * P;  // may be x itself: no restrict
    const auto row = x.row(c, P);
    const T* __restrict__ gate = s;
#pragma omp simd
    for (int64_t k = 0; k < P; ++k) {
      T v = row(k) * gate[k];
      if (HasIdentity) v += id[k];
      if (Relu) v = v < T(0) ? T(0) : v;  // NaN stays NaN, as torch.relu
      out[k] = v;
    }
  }
}

// Gradients of one group's parameters (summed over the batch afterwards).
struct ParamGrads {
  double lam = 0, xi = 0, beta = 0, alpha = 0, theta_row = 0, theta_col = 0,
         sigma = 0;
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

// Backward pass 1 over channels c .. c + B - 1 and the positions k0 ..
// k0 + len: adds sum_c g x, q . x and z . x to agg, aq and az (g: the
// upstream gradient, masked by y > 0 with Relu and stored in masked).
template <int B, typename T, bool FromNorm, bool Relu>
inline void backward_sums(const Source<T, FromNorm>& src, const T* grad_y,
                          const T* y, T* masked, const T* query,
                          const T* context, int64_t c, int64_t P, int64_t k0,
                          int64_t len, T* __restrict__ agg,
                          T* __restrict__ aq, T* __restrict__ az) {
  const ChannelRows<B, T, FromNorm> rows(src, query, context, c, P, k0);
  const T* gy[B];
  const T* yr[B];
  T* mr[B];
  for (int i = 0; i < B; ++i) {
    const int64_t off = (c + i) * P + k0;
    gy[i] = grad_y + off;
    yr[i] = Relu ? y + off : nullptr;
    mr[i] = Relu ? masked + off : nullptr;
  }
#pragma omp simd
  for (int64_t l = 0; l < len; ++l) {
    T sg = agg[l], sq = aq[l], sz = az[l];
#pragma GCC unroll 4
    for (int i = 0; i < B; ++i) {
      const T xv = rows(i, l);
      T g = gy[i][l];
      if (Relu) {
        g = yr[i][l] > T(0) ? g : T(0);
        mr[i][l] = g;
      }
      sg += g * xv;
      sq += rows.q[i] * xv;
      sz += rows.z[i] * xv;
    }
    agg[l] = sg;
    aq[l] = sq;
    az[l] = sz;
  }
}

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
  // pass 1, in chunks whose accumulators stay in L1: dL/dgate = sum_c g x,
  // q . x and z . x again, the ReLU mask
  for (int64_t k0 = 0; k0 < P; k0 += kChunk) {
    const int64_t len = std::min(kChunk, P - k0);
    T* __restrict__ agg = gg + k0;
    T* __restrict__ aq = sq + k0;
    T* __restrict__ az = sz + k0;
    std::fill(agg, agg + len, T(0));
    std::fill(aq, aq + len, T(0));
    std::fill(az, az + len, T(0));
    int64_t c = 0;
    for (; c + 4 <= cg; c += 4)
      backward_sums<4, T, FromNorm, Relu>(src, grad_y, y, masked, query,
                                          context, c, P, k0, len, agg, aq, az);
    for (; c < cg; ++c)
      backward_sums<1, T, FromNorm, Relu>(src, grad_y, y, masked, query,
                                          context, c, P, k0, len, agg, aq, az);
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
    const auto row = src.row(c, P);
    const T* __restrict__ cq = coef_q;
    const T* __restrict__ gs = grad_s;
#pragma omp simd reduction(+ : gkq, gkz)
    for (int64_t k = 0; k < P; ++k) {
      const T xv = row(k);
      gkq += xv * cq[k];
      gkz += xv * gs[k];
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

// One row of dL/dx recomputed from the maps (it is never stored). With
// Sums, its sum and its dot with c (BatchNorm's backward reductions) are
// added to sums[0] and sums[1]; with Write, dL/dc = aw * dL/dx + slope * c +
// offset (BatchNorm's backward in affine form) is written to out.
template <bool Sums, bool Write, typename T>
inline void norm_grad_row(const T* g, const T* c, const Maps<T>& m,
                          const RowGrad<T>& r, T aw, T slope, T offset,
                          int64_t P, int64_t qi, double* sums, T* out) {
  double s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t k = 0; k < P; ++k) {
    const T gx = g[k] * m.gate[k] + r.kq * m.coef_q[k] + r.kz * m.grad_s[k] +
                 r.gz;
    if (Sums) {
      s1 += gx;
      s2 += double(gx) * c[k];
    }
    if (Write) out[k] = aw * gx + slope * c[k] + offset;
  }
  if (Sums) {
    sums[0] += s1 + r.gq;
    sums[1] += s2 + double(r.gq) * c[qi];
  }
  if (Write) out[qi] += aw * r.gq;
}

}  // namespace
}  // namespace prm_det
