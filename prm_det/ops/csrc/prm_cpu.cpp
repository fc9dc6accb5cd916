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
// With BatchNorm fused in (bn_prm_*, see _BatchNormPRM in prm.py) the passes
// read the block's pre-BatchNorm map c and apply the per-channel affine on
// the fly, so the normalized map is never written: forward first takes the
// batch statistics (training), and backward runs one task per channel group
// over the whole batch (BatchNorm's sums over the batch, then dL/dc, while
// the group's rows are in cache).
// The passes that accumulate over channels take four channel rows per sweep
// (their per-position accumulators are loaded and stored a quarter as
// often), and bn_prm_eval_ (inference) writes y over the map it reads.
#include <ATen/ATen.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <bit>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace prm_det {
namespace {

constexpr double kInvSqrt2Pi = 0.39894228040143267794;
// the variance is clamped to this before the square root (prm.py _TINY_VAR)
constexpr double kTinyVar = 1e-30;
constexpr double kTinyStd = 1e-15;  // sqrt(kTinyVar)
// positions per chunk of the passes that accumulate over channels: their
// accumulators stay in L1 (chunks are whole rows, at least one)
constexpr int64_t kChunk = 512;

struct Options {
  int64_t groups, cg, h, w, P;
  bool use_position, use_norm, normalized;
  double eps;
};

// One group's parameters and fixed per-layer ones, in double; the
// Gaussians of the row and column distances 0..h-1 and 0..w-1 (they depend
// only on the per-layer theta and sigma: computed once per call).
struct Params {
  double lam, xi, beta, alpha, theta_row, theta_col, sigma;
  const double* gauss_row;
  const double* gauss_col;
};

// Per-group state kept from forward for backward.
struct State {
  int64_t query_index;
  double mean, std;  // of S over the positions (mean 0, std 1 if !use_norm)
};

#if defined(__AVX512F__) || defined(__AVX2__)
// Float lanes for the gates' sigmoid (GCC vector extensions: one version for
// both widths; see gate_lanes).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vfloat __attribute__((vector_size(4 * kLanes)));
typedef int32_t vint __attribute__((vector_size(4 * kLanes)));
#endif

// 2^n for a float (or float lanes) n holding an integer in exp's range
inline float pow2i(float n) {
  return std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}
#if defined(__AVX512F__) || defined(__AVX2__)
inline vfloat pow2i(vfloat n) {
  return reinterpret_cast<vfloat>((__builtin_convertvector(n, vint) + 127)
                                  << 23);
}
#endif

// exp for float, or float lanes, that the compiler vectorizes (std::exp is
// a scalar libm call here): range reduction by ln 2 and Cephes' degree-6
// polynomial for expf, relative error ~2e-7 (about an ulp). x is clamped to
// [-87.3, 88.3], where 2^n stays finite (at 88.7, 2^128 overflowed to
// inf, and the sigmoid's reciprocal estimate made 0 * inf = NaN of it);
// a NaN passes the clamps. Double keeps std::exp.
template <typename V>
inline V exp_poly(V x) {
  const V lo = V{} - 87.3f, hi = V{} + 88.3f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (std::floor would keep
  // the loop scalar)
  const V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const V r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const V e = p * r * r + r + 1.0f;
  return e * pow2i(n);
}
inline float vexp(float x) { return exp_poly(x); }
inline double vexp(double x) { return std::exp(x); }

template <typename T>
inline T sigmoid(T v) {
  return T(1) / (T(1) + vexp(-v));
}

#if defined(__AVX512F__) || defined(__AVX2__)
// Float sigmoid a vector at a time, without a division: the division in
// sigmoid (vdivps, a long-latency, low-throughput instruction) took most
// of the gate's time, itself a sixth of an inference forward on stage-1
// maps. 1 / d comes from the hardware's reciprocal estimate refined by one
// Newton step, r (2 - d r): relative error ~2^-28 (AVX-512's 14-bit
// estimate) or ~2^-23 (AVX2's 12-bit one), at most an ulp or two.
inline vfloat reciprocal_estimate(vfloat d) {
#if defined(__AVX512F__)
  return reinterpret_cast<vfloat>(_mm512_rcp14_ps(reinterpret_cast<__m512>(d)));
#else
  return reinterpret_cast<vfloat>(_mm256_rcp_ps(reinterpret_cast<__m256>(d)));
#endif
}

// s[k] = sigmoid(xi + gain * (s[k] - mean)) for k < n, two vectors per
// step (independent chains), the last few through a padded vector.
inline void gate_lanes(float* s, int64_t n, float gain, float mean,
                       float xi) {
  auto gate = [&](vfloat v) {
    const vfloat d = 1.0f + exp_poly(-(xi + gain * (v - mean)));
    const vfloat r = reciprocal_estimate(d);
    return r * (2.0f - d * r);
  };
  int64_t k = 0;
  for (; k + 2 * kLanes <= n; k += 2 * kLanes) {
    vfloat a, b;
    std::memcpy(&a, s + k, sizeof a);
    std::memcpy(&b, s + k + kLanes, sizeof b);
    a = gate(a);
    b = gate(b);
    std::memcpy(s + k, &a, sizeof a);
    std::memcpy(s + k + kLanes, &b, sizeof b);
  }
  for (; k < n; k += kLanes) {
    const int64_t m = std::min<int64_t>(kLanes, n - k);
    vfloat a = vfloat{} + mean;
    std::memcpy(&a, s + k, m * sizeof(float));
    a = gate(a);
    std::memcpy(s + k, &a, m * sizeof(float));
  }
}
#endif

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

// PRM forward on x into y (y may be x itself: the gating pass reads each
// value before writing it). Returns query_index, query, context, stats
// (what backward needs), or nothing without keep_state (inference: the
// query and context vectors then live in per-thread scratch).
//
// With norm the map read is x = c * a + shift per channel (``x`` is then
// BatchNorm's input c).
std::vector<at::Tensor> forward_into(const at::Tensor& x,
                                     const c10::optional<at::Tensor>& identity,
                                     bool relu, const PRMParams& params,
                                     const Options& o, at::Tensor& y,
                                     const NormView* norm = nullptr,
                                     bool keep_state = true) {
  const bool has_identity = given(identity);
  if (has_identity) check_map(*identity, x, "identity");
  const int64_t n = x.size(0) * o.groups;
  at::Tensor query_index, query, context, stats;
  if (keep_state) {
    query_index = at::empty({n}, x.options().dtype(at::kLong));
    query = at::empty({n, o.cg}, x.options());
    context = at::empty({n, o.cg}, x.options());
    stats = at::empty({n, 2}, x.options().dtype(at::kDouble));
  }
  auto result = [&]() -> std::vector<at::Tensor> {
    if (!keep_state) return {};
    return {query_index, query, context, stats};
  };
  if (n == 0 || o.P == 0) return result();

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "prm_det_forward", [&] {
    using T = scalar_t;
    const T* xp = x.data_ptr<T>();
    const T* ip = has_identity ? identity->data_ptr<T>() : nullptr;
    const T* ap = norm ? norm->row<T>(2) : nullptr;
    const T* bp = norm ? norm->row<T>(3) : nullptr;
    T* yp = y.data_ptr<T>();
    int64_t* qip = keep_state ? query_index.data_ptr<int64_t>() : nullptr;
    T* qp = keep_state ? query.data_ptr<T>() : nullptr;
    T* zp = keep_state ? context.data_ptr<T>() : nullptr;
    double* sp = keep_state ? stats.data_ptr<double>() : nullptr;
    const int64_t block = o.cg * o.P;
    at::parallel_for(0, n, group_grain(o), [&](int64_t begin, int64_t end) {
      const int64_t cap = std::max(kChunk, o.w);  // a chunk's positions
      T* colsum = static_cast<T*>(thread_scratch(
          sizeof(T) * (o.P + 2 * cap + o.h + o.w + 2 * o.cg)));
      T *sq = colsum + o.P, *sz = sq + cap, *hr = sz + cap, *hc = hr + o.h;
      T* own_query = hc + o.w;  // without keep_state
      T* own_context = own_query + o.cg;
      for (int64_t k = begin; k < end; ++k) {
        const Params p = params.group(k % o.groups);
        State st;
        const T* idk = has_identity ? ip + k * block : nullptr;
        T* qk = keep_state ? qp + k * o.cg : own_query;
        T* zk = keep_state ? zp + k * o.cg : own_context;
        auto run = [&](auto fn, const auto& view) {
          fn(o, p, view, idk, yp + k * block, qk, zk, st, colsum, sq, sz, hr,
             hc);
        };
        auto with_source = [&](const auto& view) {
          using V = std::decay_t<decltype(view)>;
          constexpr bool N = std::is_same_v<V, Source<T, true>>;
          if (has_identity && relu) run(forward_group<T, N, true, true>, view);
          else if (has_identity) run(forward_group<T, N, true, false>, view);
          else if (relu) run(forward_group<T, N, false, true>, view);
          else run(forward_group<T, N, false, false>, view);
        };
        if (ap) {
          const int64_t first = (k % o.groups) * o.cg;
          with_source(Source<T, true>{xp + k * block, ap + first, bp + first});
        } else {
          with_source(Source<T, false>{xp + k * block, nullptr, nullptr});
        }
        if (keep_state) {
          qip[k] = st.query_index;
          sp[2 * k] = st.mean;
          sp[2 * k + 1] = st.std;
        }
      }
    });
  });
  return result();
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
    const Params p = params.group(group);
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
// like the parameters given: summed over the batch, theta's and sigma's
// then over the groups (a plain loop: a dozen small torch ops per call
// would cost more than the sums).
std::vector<at::Tensor> param_grads(const at::Tensor& partial, int64_t b,
                                    int64_t groups, at::ScalarType dtype,
                                    const std::vector<at::Tensor>& like) {
  const double* pp = partial.data_ptr<double>();
  std::vector<double> per_group(groups * 7, 0.0);
  for (int64_t i = 0; i < b; ++i)
    for (int64_t g = 0; g < groups; ++g)
      for (int j = 0; j < 7; ++j)
        per_group[g * 7 + j] += pp[(i * groups + g) * 7 + j];
  double shared[3] = {0, 0, 0};  // theta_row, theta_col, sigma
  for (int64_t g = 0; g < groups; ++g)
    for (int j = 0; j < 3; ++j) shared[j] += per_group[g * 7 + 4 + j];
  std::vector<at::Tensor> out;
  for (int i = 0; i < 6; ++i) {
    at::Tensor t = at::empty(like[i].sizes(), like[i].options().dtype(dtype));
    AT_DISPATCH_FLOATING_TYPES(dtype, "prm_det_param_grads", [&] {
      scalar_t* o = t.data_ptr<scalar_t>();
      if (i < 4) {
        for (int64_t g = 0; g < groups; ++g)
          o[g] = static_cast<scalar_t>(per_group[g * 7 + i]);
      } else if (i == 4) {
        o[0] = static_cast<scalar_t>(shared[0]);
        o[1] = static_cast<scalar_t>(shared[1]);
      } else {
        o[0] = static_cast<scalar_t>(shared[2]);
      }
    });
    out.push_back(t);
  }
  return out;
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
  const PRMParams params(x, o, {weight, bias, one, zero, theta, scale});
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
  const PRMParams params(x, o, {weight, bias, one, zero, theta, scale});
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
      at::parallel_for(0, n, group_grain(o), [&](int64_t begin, int64_t end) {
        using Carve = ScratchCarver;
        const int64_t buf_n = 6 * o.P + o.h + 2 * o.w;
        Carve carve(static_cast<char*>(
            thread_scratch(Carve::bytes<T>(buf_n) + Carve::bytes<double>(o.h) +
                           Carve::bytes<RowGrad<T>>(o.cg))));
        T* buf = carve.take<T>(buf_n);
        double* ghr = carve.take<double>(o.h);
        RowGrad<T>* rows = carve.take<RowGrad<T>>(o.cg);
        const Maps<T> maps{buf, buf + o.P, buf + 2 * o.P};
        T* scratch = buf + 3 * o.P;
        const int64_t block = o.cg * o.P;
        for (int64_t k = begin; k < end; ++k) {
          ParamGrads pg;
          call(k, maps, rows, pg, scratch, ghr);
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

// relu(PRM(BatchNorm(c)) + identity), BatchNorm applied as PRM's passes
// read c (a per-channel affine x = c * a + shift): the normalized map is
// never written. In training the batch statistics are taken first (and
// the running ones updated, as native_batch_norm does). Returns y,
// save_mean, save_invstd (empty in eval), query_index, query, context,
// stats.
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
  const PRMParams params(c, o, {weight, bias, one, zero, theta, scale});
  at::Tensor save_mean = none_tensor(c), save_invstd = none_tensor(c);
  if (training) {
    TORCH_CHECK(c.size(0) * o.P > 1,
                "prm_det: BatchNorm in training needs more than one value "
                "per channel, got a map of shape ", c.sizes());
    std::tie(save_mean, save_invstd) =
        batch_norm_stats(c, running_mean, running_var, momentum, bn_eps);
  }
  // the table backward rebuilds from the same saved statistics
  const NormView nv = norm_view(c, bn_weight, bn_bias, running_mean,
                                running_var, save_mean, save_invstd, training,
                                bn_eps);
  at::Tensor y = at::empty_like(c);
  auto saved = forward_into(c, identity, relu, params, o, y, &nv);
  saved.insert(saved.begin(), {y, save_mean, save_invstd});
  return saved;
}

// Inference: relu(PRM(BatchNorm(c)) + identity) with BatchNorm in eval
// (its running statistics), written over c, which the caller no longer
// needs (a convolution's fresh output): no new map, and the gating pass
// writes the lines it has just read. Returns c.
at::Tensor bn_prm_eval_(
    at::Tensor& c, const c10::optional<at::Tensor>& bn_weight,
    const c10::optional<at::Tensor>& bn_bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, double bn_eps,
    const c10::optional<at::Tensor>& identity, bool relu,
    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& one,
    const at::Tensor& zero, const at::Tensor& theta, const at::Tensor& scale,
    int64_t groups, bool use_position, bool use_norm, bool normalized,
    double eps) {
  TORCH_CHECK(c.device().is_cpu() && c.is_contiguous(),
              "prm_det: the CPU kernel takes contiguous CPU maps");
  TORCH_CHECK(!given(identity) || !overlaps(*identity, c),
              "prm_det: bn_prm_eval_ writes over c, so identity must not "
              "overlap its memory");
  const Options o =
      make_options(c, groups, use_position, use_norm, normalized, eps);
  const PRMParams params(c, o, {weight, bias, one, zero, theta, scale});
  const NormView nv = norm_view(c, bn_weight, bn_bias, running_mean,
                                running_var, c, c, false, bn_eps);
  forward_into(c, identity, relu, params, o, c, &nv, /*keep_state=*/false);
  return c;
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
  const PRMParams params(c, o, {weight, bias, one, zero, theta, scale});
  const bool relu = given(y);
  if (relu) check_map(*y, c, "y");
  const NormView nv = norm_view(c, bn_weight, bn_bias, running_mean,
                                running_var, save_mean, save_invstd, training,
                                bn_eps);
  const int64_t b = c.size(0), n = b * groups, C = c.size(1);
  at::Tensor masked = relu ? at::empty_like(c) : none_tensor(c);
  at::Tensor grad_c = need_c ? at::empty_like(c) : none_tensor(c);
  auto partial = at::zeros({n, 7}, c.options().dtype(at::kDouble));
  // per channel over the batch: dL/d(bn bias) = sum dL/dx and
  // dL/d(bn weight) = sum dL/dx * xhat
  std::vector<double> sum_g(C, 0.0), sum_gxhat(C, 0.0);
  if (n > 0 && o.P > 0) {
    AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "prm_det_bn_backward", [&] {
      using T = scalar_t;
      const T* cp = c.data_ptr<T>();
      const BackwardCall<T> call{
          o, params, query_index, query, context, stats, cp,
          grad_y.data_ptr<T>(), relu ? y->data_ptr<T>() : nullptr,
          nv.row<T>(2), nv.row<T>(3),
          relu ? masked.data_ptr<T>() : nullptr};
      const T* g_all = relu ? call.masked : call.grad_y;
      const int64_t* qip = query_index.data_ptr<int64_t>();
      const T* mean = nv.row<T>(0);
      const T* invstd = nv.row<T>(1);
      const T* a = nv.row<T>(2);
      T* gcp = need_c ? grad_c.data_ptr<T>() : nullptr;
      double* pp = partial.data_ptr<double>();
      const int64_t block = o.cg * o.P;
      const double count = double(b) * o.P;
      // One task per channel group, over the whole batch: BatchNorm's
      // backward needs each channel's sums over the batch before any dL/dc
      // of it, and a group's channels are its own, so a task makes the
      // group's maps for every sample (phase 1), sums them, and writes dL/dc
      // (phase 2) while the group's rows are still in cache.
      const int64_t grain = std::max<int64_t>(1, group_grain(o) / b);
      at::parallel_for(0, o.groups, grain, [&](int64_t begin, int64_t end) {
        using Carve = ScratchCarver;
        const int64_t maps_n = b * 3 * o.P, scratch_n = 3 * o.P + o.h + 2 * o.w;
        Carve carve(static_cast<char*>(thread_scratch(
            Carve::bytes<T>(maps_n) + Carve::bytes<T>(scratch_n) +
            Carve::bytes<RowGrad<T>>(b * o.cg) +
            Carve::bytes<double>(o.h + 2 * o.cg))));
        T* map_buf = carve.take<T>(maps_n);
        T* scratch = carve.take<T>(scratch_n);
        RowGrad<T>* rows = carve.take<RowGrad<T>>(b * o.cg);
        double* ghr = carve.take<double>(o.h);
        double* sums = carve.take<double>(2 * o.cg);  // per channel: g, g c
        auto maps_of = [&](int64_t i) {
          T* base = map_buf + i * 3 * o.P;
          return Maps<T>{base, base + o.P, base + 2 * o.P};
        };
        // BatchNorm in eval: dL/dc = a dL/dx needs no sums over the batch,
        // so each row's dL/dc is written as its sums are taken
        const bool write_in_phase1 = need_c && !training;
        for (int64_t group = begin; group < end; ++group) {
          std::fill(sums, sums + 2 * o.cg, 0.0);
          for (int64_t i = 0; i < b; ++i) {  // phase 1
            const int64_t k = i * o.groups + group;
            ParamGrads pg;
            const Maps<T> m = maps_of(i);
            RowGrad<T>* r = rows + i * o.cg;
            call(k, m, r, pg, scratch, ghr);
            store_param_grads(pp + 7 * k, pg);
            for (int64_t cl = 0; cl < o.cg; ++cl) {
              const int64_t off = k * block + cl * o.P;
              if (write_in_phase1)
                norm_grad_row<true, true>(g_all + off, cp + off, m, r[cl],
                                          a[group * o.cg + cl], T(0), T(0),
                                          o.P, qip[k], sums + 2 * cl,
                                          gcp + off);
              else
                norm_grad_row<true, false>(g_all + off, cp + off, m, r[cl],
                                           T(0), T(0), T(0), o.P, qip[k],
                                           sums + 2 * cl,
                                           static_cast<T*>(nullptr));
            }
          }
          for (int64_t cl = 0; cl < o.cg; ++cl) {
            const int64_t ch = group * o.cg + cl;
            sum_g[ch] = sums[2 * cl];
            // xhat = (c - mean) invstd
            sum_gxhat[ch] =
                double(invstd[ch]) *
                (sums[2 * cl + 1] - double(mean[ch]) * sums[2 * cl]);
          }
          if (!need_c || write_in_phase1) continue;
          // phase 2 (training): dL/dc = a (gx - mean(gx) - xhat mean(gx
          // xhat)) per row, from the row of dL/dx recomputed
          for (int64_t i = 0; i < b; ++i) {
            const int64_t k = i * o.groups + group;
            const Maps<T> m = maps_of(i);
            for (int64_t cl = 0; cl < o.cg; ++cl) {
              const int64_t ch = group * o.cg + cl;
              const double aw = double(a[ch]), is = double(invstd[ch]);
              const double mg = sum_g[ch] / count;
              const double mgx = sum_gxhat[ch] / count;
              const T slope = static_cast<T>(-aw * mgx * is);
              const T offset =
                  static_cast<T>(-aw * mg + aw * mgx * is * double(mean[ch]));
              const int64_t off = k * block + cl * o.P;
              norm_grad_row<false, true>(g_all + off, cp + off, m,
                                         rows[i * o.cg + cl], a[ch], slope,
                                         offset, o.P, qip[k], nullptr,
                                         gcp + off);
            }
          }
        }
      });
    });
  }
  at::Tensor grad_bn_weight = none_tensor(c), grad_bn_bias = none_tensor(c);
  auto as_tensor = [&](std::vector<double>& v) {
    return at::from_blob(v.data(), {C}, c.options().dtype(at::kDouble))
        .to(c.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  };
  if (need_bn_weight) grad_bn_weight = as_tensor(sum_gxhat);
  if (need_bn_bias) grad_bn_bias = as_tensor(sum_g);
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
      "bn_prm_eval_(Tensor(a!) c, Tensor? bn_weight, Tensor? bn_bias, "
      "Tensor running_mean, Tensor running_var, float bn_eps, "
      "Tensor? identity, bool relu, Tensor weight, Tensor bias, Tensor one, "
      "Tensor zero, Tensor theta, Tensor scale, int groups, "
      "bool use_position, bool use_norm, bool normalized, float eps) "
      "-> Tensor(a!)");
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
  m.impl("bn_prm_eval_", &bn_prm_eval_);
  m.impl("bn_prm_backward", &bn_prm_backward);
}

}  // namespace prm_det
