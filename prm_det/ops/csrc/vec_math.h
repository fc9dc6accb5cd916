// PRM CPU kernel: vector math (exp without libm, the float gates' sigmoid
// without a division), for AVX-512, AVX2 or plain builds.
#pragma once

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "prm_types.h"

namespace prm_det {
namespace {

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

// 2^n for a float (or float lanes) n holding an integer in exp's range.
// memcpy, not C++20's std::bit_cast: torch before 2.13 builds extensions
// as C++17.
inline float pow2i(float n) {
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
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

}  // namespace
}  // namespace prm_det
