// The gate block tail's CPU kernels (prm_det/ops/gate_tail.py): a residual
// block's tail y = relu((c * scale + shift) * gate + identity), with
// BatchNorm and any channel gate folded into scale and shift per (sample,
// channel) and an optional gate per (sample, group, position); and the
// moments that feed BatchNorm and the gates. One pass over the map each:
//
//   gate_moments_cpu: per (sample, channel) plane, its mean and sum of
//     squared deviations (two sweeps of a plane while it sits in cache);
//   gate_tail_forward_cpu: the output, one plane at a time; with a gate, a
//     (sample, group, chunk of positions) at a time, the chunk's gate made
//     once for the group's channels (the sigmoid of its logits, with
//     gate_affine);
//   gate_position_pool_cpu (and its backward): per (sample, group,
//     position), the mean and max over the group's channels of c * scale +
//     shift (CBAM's spatial pooling, SGE's similarities, GC's attention
//     logits: the channel-gated map is never written);
//   gate_tail_backward_cpu: every gradient: the map's, the shortcut's (the
//     ReLU-masked output gradient), scale's and shift's (sums per plane)
//     and the gate's (sums over a group's channels per position). Tasks are
//     (sample, group, chunk of positions), so that a task owns its part of
//     the gate's gradient (or its logits' and the per-(sample, group)
//     affine's, through the sigmoid); the per-plane sums of the chunks are
//     added in a fixed order after (the same bits every run).
//
// Contiguous float32 / float64 maps; scale, shift and gate in the map's
// dtype. Sums in double.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "vec_math.h"

namespace prm_det {
namespace {

void check_map(const at::Tensor& t, const at::Tensor& c, const char* name) {
  TORCH_CHECK(t.sizes() == c.sizes() && t.scalar_type() == c.scalar_type() &&
                  t.is_contiguous() && t.device().is_cpu(),
              "prm_det gate tail: ", name, " must be a contiguous CPU ",
              c.scalar_type(), " tensor of c's shape ", c.sizes(), ", got ",
              t.scalar_type(), " ", t.sizes());
}

void check_small(const at::Tensor& t, const at::Tensor& c,
                 at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.sizes() == shape && t.scalar_type() == c.scalar_type() &&
                  t.is_contiguous(),
              "prm_det gate tail: ", name, " must be a contiguous ",
              c.scalar_type(), " tensor of shape ", shape, ", got ",
              t.scalar_type(), " ", t.sizes());
}

void check_c(const at::Tensor& c) {
  TORCH_CHECK(c.dim() == 4 && c.is_contiguous() && c.device().is_cpu() &&
                  (c.scalar_type() == at::kFloat ||
                   c.scalar_type() == at::kDouble),
              "prm_det gate tail: the CPU kernel takes a contiguous float32 "
              "or float64 [b, C, h, w] CPU map, got ", c.scalar_type(), " ",
              c.sizes());
}

// the gate's groups (0 without a gate), checked against c
int64_t gate_groups(const c10::optional<at::Tensor>& gate,
                    const at::Tensor& c) {
  if (!gate.has_value()) return 0;
  const auto& g = *gate;
  const int64_t groups = g.dim() == 4 ? g.size(1) : -1;
  TORCH_CHECK(groups > 0 && c.size(1) % groups == 0 && g.size(0) == c.size(0)
                  && g.size(2) == c.size(2) && g.size(3) == c.size(3) &&
                  g.scalar_type() == c.scalar_type() && g.is_contiguous(),
              "prm_det gate tail: gate must be a contiguous [b, G, h, w] ",
              c.scalar_type(), " tensor with G dividing the channels (",
              c.size(1), "), got ", g.scalar_type(), " ", g.sizes());
  return groups;
}

// The first position of a plane holding `value` (a NaN: the first NaN).
template <typename T>
int64_t first_at(const T* row, int64_t P, T value) {
  const bool nan = value != value;
  for (int64_t k = 0; k < P; ++k)
    if (nan ? row[k] != row[k] : row[k] == value) return k;
  return 0;
}

// Per (sample, channel) plane: the mean and M2 (two sweeps while the plane
// sits in cache, in the map's dtype from the plane's first value, so a
// mean far from the spread cancels nothing) and, when asked (best
// non-null), the max and min with the first position holding each (a NaN
// wins both, as in torch's max and min).
template <typename T>
void moments_kernel(const T* x, int64_t planes, int64_t P, T* out_mean,
                    T* out_m2, T* best, T* lowest, int64_t* arg_best,
                    int64_t* arg_lowest) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(P, 1));
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* __restrict__ row = x + i * P;
      if (P == 0) {
        out_mean[i] = out_m2[i] = T(0);
        continue;
      }
      const T first = row[0];
      T shifted = 0;
#pragma omp simd reduction(+ : shifted)
      for (int64_t k = 0; k < P; ++k) shifted += row[k] - first;
      const T m = first + shifted / T(P);
      T dev = 0;
#pragma omp simd reduction(+ : dev)
      for (int64_t k = 0; k < P; ++k) {
        const T d = row[k] - m;
        dev += d * d;
      }
      out_mean[i] = m;
      out_m2[i] = dev;
      if (!best) continue;
      T hi = first, lo = first;
      if (m != m) {  // a NaN (or inf - inf) in the plane
        const int64_t k = first_at(row, P, std::numeric_limits<T>::quiet_NaN());
        if (row[k] != row[k]) {
          best[i] = lowest[i] = row[k];
          arg_best[i] = arg_lowest[i] = k;
          continue;
        }
      }
#pragma omp simd reduction(max : hi) reduction(min : lo)
      for (int64_t k = 0; k < P; ++k) {
        hi = row[k] > hi ? row[k] : hi;
        lo = row[k] < lo ? row[k] : lo;
      }
      int64_t at_hi = P, at_lo = P;  // the first positions holding them
#pragma omp simd reduction(min : at_hi, at_lo)
      for (int64_t k = 0; k < P; ++k) {
        at_hi = row[k] == hi ? std::min(at_hi, k) : at_hi;
        at_lo = row[k] == lo ? std::min(at_lo, k) : at_lo;
      }
      best[i] = hi;
      lowest[i] = lo;
      arg_best[i] = at_hi;
      arg_lowest[i] = at_lo;
    }
  });
}

std::vector<at::Tensor> gate_moments_cpu(const at::Tensor& c,
                                         bool with_extrema) {
  check_c(c);
  const int64_t B = c.size(0), C = c.size(1), P = c.size(2) * c.size(3);
  at::Tensor mean = at::empty({B, C}, c.options());
  at::Tensor m2 = at::empty_like(mean);
  const int64_t rows = with_extrema ? B : 0;  // empty: not asked for
  at::Tensor best = at::empty({rows, C}, c.options());
  at::Tensor lowest = at::empty({rows, C}, c.options());
  at::Tensor arg_best = at::empty({rows, C}, c.options().dtype(at::kLong));
  at::Tensor arg_lowest = at::empty({rows, C}, c.options().dtype(at::kLong));
  const bool extrema = with_extrema && B * C > 0;
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "gate_moments_cpu", [&] {
    moments_kernel<scalar_t>(
        c.data_ptr<scalar_t>(), B * C, P, mean.data_ptr<scalar_t>(),
        m2.data_ptr<scalar_t>(),
        extrema ? best.data_ptr<scalar_t>() : nullptr,
        extrema ? lowest.data_ptr<scalar_t>() : nullptr,
        extrema ? arg_best.data_ptr<int64_t>() : nullptr,
        extrema ? arg_lowest.data_ptr<int64_t>() : nullptr);
  });
  return {mean, m2, best, lowest, arg_best, arg_lowest};
}

// the pointers of a tail: c, the shortcut, gate and gate_affine (null when
// absent), scale and shift
template <typename T>
struct TailArgs {
  const T* c;
  const T* identity;
  const T* gate;
  const T* gate_affine;  // [b, G, 2]: gate = sigmoid(gate * a0 + a1)
  const T* scale;
  const T* shift;
  int64_t B, C, P, groups, cg;  // groups: of the gate (0 without one)
};

template <typename T>
TailArgs<T> tail_args(const at::Tensor& c,
                      const c10::optional<at::Tensor>& identity,
                      const at::Tensor& scale, const at::Tensor& shift,
                      const c10::optional<at::Tensor>& gate,
                      const c10::optional<at::Tensor>& gate_affine,
                      int64_t groups) {
  const int64_t C = c.size(1);
  return {c.data_ptr<T>(),
          identity.has_value() ? identity->data_ptr<T>() : nullptr,
          groups ? gate->data_ptr<T>() : nullptr,
          gate_affine.has_value() ? gate_affine->data_ptr<T>() : nullptr,
          scale.data_ptr<T>(),
          shift.data_ptr<T>(),
          c.size(0),
          C,
          c.size(2) * c.size(3),
          groups,
          groups ? C / groups : 1};
}

// positions per task of the gated passes: all of a plane when there are
// enough (sample, group) tasks to share the threads, otherwise chunks of at
// least kMinChunk positions
constexpr int64_t kMinChunk = 1024;

int64_t chunk_length(int64_t tasks, int64_t P) {
  const int64_t wanted = 4 * at::get_num_threads();
  if (tasks >= wanted || P <= kMinChunk) return std::max<int64_t>(P, 1);
  const int64_t per_task = (wanted + tasks - 1) / tasks;
  return std::max<int64_t>(kMinChunk, (P + per_task - 1) / per_task);
}

// the gate of (sample, group) bg at positions k0..k0+n into out
template <typename T>
void gate_row(const TailArgs<T>& a, int64_t bg, int64_t k0, int64_t n,
              T* __restrict__ out) {
  const T* __restrict__ src = a.gate + bg * a.P + k0;
  if (!a.gate_affine) {
    std::copy(src, src + n, out);
    return;
  }
  const T s = a.gate_affine[bg * 2], t = a.gate_affine[bg * 2 + 1];
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) out[k] = sigmoid(src[k] * s + t);
}

template <typename T>
inline void apply_row(const T* __restrict__ row, const T* __restrict__ g,
                      const T* __restrict__ ir, T* __restrict__ o, T s, T t,
                      T lo, int64_t n) {
  if (g && ir) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k)
      o[k] = std::max((row[k] * s + t) * g[k] + ir[k], lo);
  } else if (g) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k)
      o[k] = std::max((row[k] * s + t) * g[k], lo);
  } else if (ir) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k)
      o[k] = std::max(row[k] * s + t + ir[k], lo);
  } else {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) o[k] = std::max(row[k] * s + t, lo);
  }
}

template <typename T>
void tail_forward_kernel(const TailArgs<T>& a, bool relu, T* out) {
  const T lo = relu ? T(0) : -std::numeric_limits<T>::infinity();
  const int64_t P = a.P;
  if (!a.gate) {  // a plane at a time
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(P, 1));
    at::parallel_for(0, a.B * a.C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        apply_row<T>(a.c + i * P, nullptr,
                     a.identity ? a.identity + i * P : nullptr, out + i * P,
                     a.scale[i], a.shift[i], lo, P);
    });
    return;
  }
  // a (sample, group, chunk) at a time: the gate's chunk made once for the
  // group's channels
  const int64_t len = chunk_length(a.B * a.groups, P);
  const int64_t chunks = (P + len - 1) / len;
  at::parallel_for(0, a.B * a.groups * chunks, 1, [&](int64_t begin,
                                                      int64_t end) {
    std::vector<T> g(static_cast<size_t>(len));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task % chunks, bg = task / chunks;
      const int64_t k0 = chunk * len, n = std::min(len, P - k0);
      const int64_t b = bg / a.groups, grp = bg % a.groups;
      gate_row(a, bg, k0, n, g.data());
      for (int64_t j = 0; j < a.cg; ++j) {
        const int64_t i = b * a.C + grp * a.cg + j, off = i * P + k0;
        apply_row<T>(a.c + off, g.data(),
                     a.identity ? a.identity + off : nullptr, out + off,
                     a.scale[i], a.shift[i], lo, n);
      }
    }
  });
}

at::Tensor gate_tail_forward_cpu(const at::Tensor& c,
                                 const c10::optional<at::Tensor>& identity,
                                 const at::Tensor& scale,
                                 const at::Tensor& shift,
                                 const c10::optional<at::Tensor>& gate,
                                 const c10::optional<at::Tensor>& gate_affine,
                                 bool relu) {
  check_c(c);
  const int64_t B = c.size(0), C = c.size(1);
  check_small(scale, c, {B, C}, "scale");
  check_small(shift, c, {B, C}, "shift");
  if (identity.has_value()) check_map(*identity, c, "identity");
  const int64_t groups = gate_groups(gate, c);
  if (gate_affine.has_value()) {
    TORCH_CHECK(groups > 0, "prm_det gate tail: gate_affine without a gate");
    check_small(*gate_affine, c, {B, groups, 2}, "gate_affine");
  }
  at::Tensor y = at::empty_like(c);
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "gate_tail_forward_cpu", [&] {
    tail_forward_kernel<scalar_t>(
        tail_args<scalar_t>(c, identity, scale, shift, gate, gate_affine,
                            groups),
        relu, y.data_ptr<scalar_t>());
  });
  return y;
}

// what backward writes: the map's gradient, the masked output gradient
// (null: not asked for), the gate's (null without a gate), the per (plane,
// chunk) sums of gx * c and gx (gx = masked gradient * gate) and the per
// (sample, group, chunk) sums of dz * logits and dz (dz: the gradient of
// the gate's logit, with gate_affine)
template <typename T>
struct TailGrads {
  T* c;
  T* masked;
  T* gate;
  double* partial;
  double* partial_affine;
};

template <typename T>
void tail_backward_kernel(const TailArgs<T>& a, const T* grad_y, const T* y,
                          const TailGrads<T>& out, int64_t len,
                          int64_t chunks) {
  const int64_t groups = a.gate ? a.groups : a.C;  // no gate: a plane each
  const int64_t cg = a.C / groups, P = a.P;
  at::parallel_for(0, a.B * groups * chunks, 1, [&](int64_t begin,
                                                    int64_t end) {
    std::vector<T> dy(static_cast<size_t>(len));
    std::vector<T> g(a.gate ? static_cast<size_t>(len) : 0);
    std::vector<double> gate_acc(a.gate ? static_cast<size_t>(len) : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task % chunks, bg = task / chunks;
      const int64_t k0 = chunk * len, n = std::min(len, P - k0);
      const int64_t b = bg / groups, grp = bg % groups;
      T* __restrict__ gr = a.gate ? g.data() : nullptr;
      double* __restrict__ acc = gate_acc.data();
      if (gr) {
        gate_row(a, bg, k0, n, gr);
        std::fill(acc, acc + n, 0.0);
      }
      for (int64_t j = 0; j < cg; ++j) {
        const int64_t i = b * a.C + grp * cg + j;  // the plane
        const int64_t off = i * P + k0;
        const T s = a.scale[i], t = a.shift[i];
        const T* __restrict__ row = a.c + off;
        const T* __restrict__ gyr = grad_y + off;
        T* __restrict__ d = dy.data();
        if (y) {
          const T* __restrict__ yr = y + off;
#pragma omp simd
          for (int64_t k = 0; k < n; ++k)
            d[k] = yr[k] > T(0) ? gyr[k] : T(0);
          if (out.masked) std::copy(d, d + n, out.masked + off);
        } else {
          std::copy(gyr, gyr + n, d);
        }
        double sum_gx = 0, sum_gxc = 0;
        T* __restrict__ gcr = out.c + off;
        if (gr) {
#pragma omp simd reduction(+ : sum_gx, sum_gxc)
          for (int64_t k = 0; k < n; ++k) {
            const T gx = d[k] * gr[k];
            acc[k] += double(d[k]) * double(row[k] * s + t);
            sum_gx += double(gx);
            sum_gxc += double(gx) * double(row[k]);
            gcr[k] = gx * s;
          }
        } else {
#pragma omp simd reduction(+ : sum_gx, sum_gxc)
          for (int64_t k = 0; k < n; ++k) {
            sum_gx += double(d[k]);
            sum_gxc += double(d[k]) * double(row[k]);
            gcr[k] = d[k] * s;
          }
        }
        out.partial[(i * chunks + chunk) * 2] = sum_gxc;
        out.partial[(i * chunks + chunk) * 2 + 1] = sum_gx;
      }
      if (!out.gate) continue;
      T* __restrict__ ggr = out.gate + bg * P + k0;
      if (!a.gate_affine) {
        for (int64_t k = 0; k < n; ++k) ggr[k] = T(acc[k]);
        continue;
      }
      // through the sigmoid and the affine: dz = d gate * g (1 - g)
      const T* __restrict__ logits = a.gate + bg * P + k0;
      const double scale_g = double(a.gate_affine[bg * 2]);
      double sum_dz = 0, sum_dz_logit = 0;
#pragma omp simd reduction(+ : sum_dz, sum_dz_logit)
      for (int64_t k = 0; k < n; ++k) {
        const double dz = acc[k] * double(gr[k]) * (1.0 - double(gr[k]));
        ggr[k] = T(dz * scale_g);
        sum_dz += dz;
        sum_dz_logit += dz * double(logits[k]);
      }
      out.partial_affine[(bg * chunks + chunk) * 2] = sum_dz_logit;
      out.partial_affine[(bg * chunks + chunk) * 2 + 1] = sum_dz;
    }
  });
}

// the chunks' sums, in order: out[r * 2 + q] = sum over chunks of
// partial[(r * chunks + chunk) * 2 + q]
template <typename T>
void sum_chunks(const std::vector<double>& partial, int64_t rows,
                int64_t chunks, T* first, T* second, int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) {
    double s0 = 0, s1 = 0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      s0 += partial[(r * chunks + chunk) * 2];
      s1 += partial[(r * chunks + chunk) * 2 + 1];
    }
    first[r * stride] = T(s0);
    second[r * stride] = T(s1);
  }
}

std::vector<at::Tensor> gate_tail_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& c,
    const c10::optional<at::Tensor>& y, const at::Tensor& scale,
    const at::Tensor& shift, const c10::optional<at::Tensor>& gate,
    const c10::optional<at::Tensor>& gate_affine, bool has_identity) {
  check_c(c);
  check_map(grad_y, c, "grad_y");
  if (y.has_value()) check_map(*y, c, "y");
  const int64_t B = c.size(0), C = c.size(1), P = c.size(2) * c.size(3);
  check_small(scale, c, {B, C}, "scale");
  check_small(shift, c, {B, C}, "shift");
  const int64_t groups = gate_groups(gate, c);
  if (gate_affine.has_value()) {
    TORCH_CHECK(groups > 0, "prm_det gate tail: gate_affine without a gate");
    check_small(*gate_affine, c, {B, groups, 2}, "gate_affine");
  }
  const int64_t len = chunk_length(B * (groups ? groups : C), P);
  const int64_t chunks = P > 0 ? (P + len - 1) / len : 1;
  const bool write_masked = has_identity && y.has_value();
  const auto none = at::empty({0}, c.options());
  at::Tensor grad_c = at::empty_like(c);
  at::Tensor masked = write_masked ? at::empty_like(c) : none;
  at::Tensor grad_gate = groups ? at::empty_like(*gate) : none;
  at::Tensor grad_affine =
      gate_affine.has_value() ? at::empty_like(*gate_affine) : none;
  // zeros: a task whose chunk is empty (P == 0) writes no sums
  std::vector<double> partial(static_cast<size_t>(B * C * chunks * 2), 0.0);
  std::vector<double> partial_affine(
      static_cast<size_t>(gate_affine.has_value() ? B * groups * chunks * 2
                                                  : 0),
      0.0);
  at::Tensor grad_scale = at::empty_like(scale);
  at::Tensor grad_shift = at::empty_like(shift);
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "gate_tail_backward_cpu", [&] {
    using T = scalar_t;
    tail_backward_kernel<T>(
        tail_args<T>(c, c10::nullopt, scale, shift, gate, gate_affine,
                     groups),
        grad_y.data_ptr<T>(), y.has_value() ? y->data_ptr<T>() : nullptr,
        {grad_c.data_ptr<T>(), write_masked ? masked.data_ptr<T>() : nullptr,
         groups ? grad_gate.data_ptr<T>() : nullptr, partial.data(),
         partial_affine.data()},
        len, chunks);
    sum_chunks<T>(partial, B * C, chunks, grad_scale.data_ptr<T>(),
                  grad_shift.data_ptr<T>(), 1);
    if (gate_affine.has_value()) {
      T* ga = grad_affine.data_ptr<T>();
      sum_chunks<T>(partial_affine, B * groups, chunks, ga, ga + 1, 2);
    }
  });
  return {grad_c, masked, grad_scale, grad_shift, grad_gate, grad_affine};
}

// Per (sample, group of C / G channels, position), over the group's
// channels of (c * scale + shift) (a channel-gated map, never written): the
// mean, the max and the first channel holding it (CBAM's spatial pooling,
// SGE's similarities, GC's attention logits). Tasks are (sample, group,
// chunk of positions); the chunk's running sums and maxima stay in cache
// across the group's channels.
template <typename T>
void position_pool_kernel(const T* c, const T* scale, const T* shift,
                          int64_t B, int64_t C, int64_t P, int64_t groups,
                          T* mean, T* best, int64_t* index) {
  // best and index null: the mean alone
  const int64_t cg = C / groups;
  const int64_t len = chunk_length(B * groups, P);
  const int64_t chunks = (P + len - 1) / len;
  at::parallel_for(0, B * groups * chunks, 1, [&](int64_t begin,
                                                  int64_t end) {
    std::vector<double> sum(static_cast<size_t>(len));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bg = task / chunks, k0 = (task % chunks) * len;
      const int64_t n = std::min(len, P - k0);
      const int64_t first = (bg / groups) * C + (bg % groups) * cg;
      T* __restrict__ mx = best ? best + bg * P + k0 : nullptr;
      int64_t* __restrict__ ix = index ? index + bg * P + k0 : nullptr;
      double* __restrict__ acc = sum.data();
      for (int64_t j = 0; j < cg; ++j) {
        const int64_t i = first + j;  // the plane
        const T s = scale[i], t = shift[i];
        const T* __restrict__ row = c + i * P + k0;
        if (!mx) {
          if (j == 0) std::fill(acc, acc + n, 0.0);
#pragma omp simd
          for (int64_t k = 0; k < n; ++k) acc[k] += double(row[k] * s + t);
          continue;
        }
        if (j == 0) {
          for (int64_t k = 0; k < n; ++k) {
            const T v = row[k] * s + t;
            acc[k] = double(v);
            mx[k] = v;
            ix[k] = 0;
          }
          continue;
        }
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) {
          const T v = row[k] * s + t;
          acc[k] += double(v);
          const bool higher = v > mx[k] || v != v;  // a NaN wins, as in torch
          mx[k] = higher ? v : mx[k];
          ix[k] = higher ? j : ix[k];
        }
      }
      T* __restrict__ mr = mean + bg * P + k0;
      for (int64_t k = 0; k < n; ++k) mr[k] = T(acc[k] / double(cg));
    }
  });
}

std::vector<at::Tensor> gate_position_pool_cpu(const at::Tensor& c,
                                               const at::Tensor& scale,
                                               const at::Tensor& shift,
                                               int64_t groups,
                                               bool with_max) {
  check_c(c);
  const int64_t B = c.size(0), C = c.size(1), P = c.size(2) * c.size(3);
  TORCH_CHECK(groups > 0 && C % groups == 0, "prm_det gate tail: groups (",
              groups, ") must divide the channels (", C, ")");
  check_small(scale, c, {B, C}, "scale");
  check_small(shift, c, {B, C}, "shift");
  at::Tensor mean = at::empty({B, groups, P}, c.options());
  const int64_t kept = with_max ? B * groups * P : 0;  // empty: no max
  at::Tensor best = at::empty({with_max ? B : 0, groups, P}, c.options());
  at::Tensor index = at::empty({with_max ? B : 0, groups, P},
                               c.options().dtype(at::kLong));
  if (P > 0 && C > 0) {
    AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "gate_position_pool_cpu",
                               [&] {
      position_pool_kernel<scalar_t>(
          c.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
          shift.data_ptr<scalar_t>(), B, C, P, groups,
          mean.data_ptr<scalar_t>(),
          kept ? best.data_ptr<scalar_t>() : nullptr,
          kept ? index.data_ptr<int64_t>() : nullptr);
    });
  }
  return {mean, best, index};
}

// Its backward: with w = grad_mean / (C / G) + (channel == index) *
// grad_max per (group, position), dL/dc = scale * w (written), dL/dscale =
// sum_p c w and dL/dshift = sum_p w per (sample, channel).
template <typename T>
void position_pool_backward_kernel(const T* c, const T* scale,
                                   const T* grad_mean, const T* grad_max,
                                   const int64_t* index, int64_t B, int64_t C,
                                   int64_t P, int64_t groups, T* grad_c,
                                   T* grad_scale, T* grad_shift) {
  const int64_t cg = C / groups;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(P, 1));
  const double inv_cg = 1.0 / double(cg);
  at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / C, ch = i % C, j = ch % cg;
      const int64_t bg = b * groups + ch / cg;
      const T s = scale[i];
      const T* __restrict__ row = c + i * P;
      const T* __restrict__ gm = grad_mean + bg * P;
      T* __restrict__ out = grad_c + i * P;
      double sum_w = 0, sum_wc = 0;
      if (!index) {  // the mean alone
#pragma omp simd reduction(+ : sum_w, sum_wc)
        for (int64_t k = 0; k < P; ++k) {
          const T w = T(gm[k] * inv_cg);
          out[k] = w * s;
          sum_w += double(w);
          sum_wc += double(w) * double(row[k]);
        }
      } else {
        const T* __restrict__ gx = grad_max + bg * P;
        const int64_t* __restrict__ ix = index + bg * P;
#pragma omp simd reduction(+ : sum_w, sum_wc)
        for (int64_t k = 0; k < P; ++k) {
          const T w = T(gm[k] * inv_cg) + (ix[k] == j ? gx[k] : T(0));
          out[k] = w * s;
          sum_w += double(w);
          sum_wc += double(w) * double(row[k]);
        }
      }
      grad_scale[i] = T(sum_wc);
      grad_shift[i] = T(sum_w);
    }
  });
}

std::vector<at::Tensor> gate_position_pool_backward_cpu(
    const at::Tensor& c, const at::Tensor& scale, const at::Tensor& grad_mean,
    const at::Tensor& grad_max, const at::Tensor& index) {
  check_c(c);
  const int64_t B = c.size(0), C = c.size(1), P = c.size(2) * c.size(3);
  const int64_t groups = grad_mean.dim() == 3 ? grad_mean.size(1) : 0;
  TORCH_CHECK(groups > 0 && C % groups == 0,
              "prm_det gate tail: grad_mean must be [b, G, P], G dividing "
              "the channels, got ", grad_mean.sizes());
  check_small(scale, c, {B, C}, "scale");
  check_small(grad_mean, c, {B, groups, P}, "grad_mean");
  const bool with_max = index.numel() > 0;  // empty: the mean alone
  if (with_max) {
    TORCH_CHECK(index.sizes() == at::IntArrayRef({B, groups, P}) &&
                    index.scalar_type() == at::kLong && index.is_contiguous(),
                "prm_det gate tail: index must be a contiguous int64 "
                "[b, G, P] tensor");
    check_small(grad_max, c, {B, groups, P}, "grad_max");
  }
  at::Tensor grad_c = at::empty_like(c);
  at::Tensor grad_scale = at::empty_like(scale);
  at::Tensor grad_shift = at::empty_like(scale);
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "gate_position_pool_backward",
                             [&] {
    position_pool_backward_kernel<scalar_t>(
        c.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
        grad_mean.data_ptr<scalar_t>(),
        with_max ? grad_max.data_ptr<scalar_t>() : nullptr,
        with_max ? index.data_ptr<int64_t>() : nullptr, B, C, P, groups,
        grad_c.data_ptr<scalar_t>(), grad_scale.data_ptr<scalar_t>(),
        grad_shift.data_ptr<scalar_t>());
  });
  return {grad_c, grad_scale, grad_shift};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prm_det, m) {
  m.def(
      "gate_position_pool_cpu(Tensor c, Tensor scale, Tensor shift, "
      "int groups, bool with_max) -> Tensor[]");
  m.def(
      "gate_position_pool_backward_cpu(Tensor c, Tensor scale, "
      "Tensor grad_mean, Tensor grad_max, Tensor index) -> Tensor[]");
  m.def("gate_moments_cpu(Tensor c, bool with_extrema) -> Tensor[]");
  m.def(
      "gate_tail_forward_cpu(Tensor c, Tensor? identity, Tensor scale, "
      "Tensor shift, Tensor? gate, Tensor? gate_affine, bool relu) "
      "-> Tensor");
  m.def(
      "gate_tail_backward_cpu(Tensor grad_y, Tensor c, Tensor? y, "
      "Tensor scale, Tensor shift, Tensor? gate, Tensor? gate_affine, "
      "bool has_identity) "
      "-> Tensor[]");
}

TORCH_LIBRARY_IMPL(prm_det, CPU, m) {
  m.impl("gate_moments_cpu", &gate_moments_cpu);
  m.impl("gate_tail_forward_cpu", &gate_tail_forward_cpu);
  m.impl("gate_tail_backward_cpu", &gate_tail_backward_cpu);
  m.impl("gate_position_pool_cpu", &gate_position_pool_cpu);
  m.impl("gate_position_pool_backward_cpu", &gate_position_pool_backward_cpu);
}

}  // namespace prm_det
