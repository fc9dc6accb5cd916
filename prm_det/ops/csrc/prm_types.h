// PRM CPU kernel: the settings, per-group parameters and per-group state
// that every part of the kernel shares.
#pragma once

#include <cstdint>

namespace prm_det {
namespace {

constexpr double kInvSqrt2Pi = 0.39894228040143267794;
// the variance is clamped to this before the square root (reference.py _TINY_VAR)
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

}  // namespace
}  // namespace prm_det
