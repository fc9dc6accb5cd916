// The gate block tail's CPU kernels (prm_det/ops/gate_tail.py): a residual
// block's tail y = relu((c * scale + shift) * gate + identity), with
// BatchNorm and any channel gate folded into scale and shift per (sample,
// channel) and an optional gate per (sample, group, position); and the
// moments that feed BatchNorm and the gates. One pass over the map each:
//
//   gate_moments_cpu: per (sample, channel) plane, its mean and sum of
//     squared deviations (two sweeps of a plane while it sits in cache);
//   gate_tail_forward_cpu: the output, one plane at a time;
//   gate_tail_backward_cpu: every gradient: the map's, the shortcut's (the
//     ReLU-masked output gradient), scale's and shift's (sums per plane)
//     and the gate's (sums over a group's channels per position). Tasks are
//     (sample, group, chunk of positions), so that a task owns its part of
//     the gate's gradient; the per-plane sums of the chunks are added in a
//     fixed order after (the same bits every run).
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

template <typename scalar_t>
void moments_kernel(const at::Tensor& c, at::Tensor& mean, at::Tensor& m2,
                    int64_t planes, int64_t P) {
  const scalar_t* x = c.data_ptr<scalar_t>();
  scalar_t* out_mean = mean.data_ptr<scalar_t>();
  scalar_t* out_m2 = m2.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(
                                                 P, 1));
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* __restrict__ row = x + i * P;
      double sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < P; ++k) sum += double(row[k]);
      const double m = P > 0 ? sum / P : 0.0;
      double dev = 0;
#pragma omp simd reduction(+ : dev)
      for (int64_t k = 0; k < P; ++k) {
        const double d = double(row[k]) - m;
        dev += d * d;
      }
      out_mean[i] = scalar_t(m);
      out_m2[i] = scalar_t(dev);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> gate_moments_cpu(const at::Tensor& c) {
  check_c(c);
  const int64_t planes = c.size(0) * c.size(1), P = c.size(2) * c.size(3);
  at::Tensor mean = at::empty({c.size(0), c.size(1)}, c.options());
  at::Tensor m2 = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "gate_moments_cpu", [&] {
    moments_kernel<scalar_t>(c, mean, m2, planes, P);
  });
  return {mean, m2};
}

// the pointers of a tail: c, the shortcut and gate (null when absent),
// scale and shift
template <typename T>
struct TailArgs {
  const T* c;
  const T* identity;
  const T* gate;
  const T* scale;
  const T* shift;
  int64_t B, C, P, groups, cg;  // groups: of the gate (0 without one)
};

template <typename T>
TailArgs<T> tail_args(const at::Tensor& c,
                      const c10::optional<at::Tensor>& identity,
                      const at::Tensor& scale, const at::Tensor& shift,
                      const c10::optional<at::Tensor>& gate, int64_t groups) {
  const int64_t C = c.size(1);
  return {c.data_ptr<T>(),
          identity.has_value() ? identity->data_ptr<T>() : nullptr,
          groups ? gate->data_ptr<T>() : nullptr,
          scale.data_ptr<T>(),
          shift.data_ptr<T>(),
          c.size(0),
          C,
          c.size(2) * c.size(3),
          groups,
          groups ? C / groups : 1};
}

template <typename T>
void tail_forward_kernel(const TailArgs<T>& a, bool relu, T* out) {
  const T lo = relu ? T(0) : -std::numeric_limits<T>::infinity();
  const int64_t P = a.P;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(P, 1));
  at::parallel_for(0, a.B * a.C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T s = a.scale[i], t = a.shift[i];
      const T* __restrict__ row = a.c + i * P;
      T* __restrict__ o = out + i * P;
      const T* __restrict__ gr =
          a.gate ? a.gate + ((i / a.C) * a.groups + (i % a.C) / a.cg) * P
                 : nullptr;
      const T* __restrict__ ir = a.identity ? a.identity + i * P : nullptr;
      if (gr && ir) {
#pragma omp simd
        for (int64_t k = 0; k < P; ++k)
          o[k] = std::max((row[k] * s + t) * gr[k] + ir[k], lo);
      } else if (gr) {
#pragma omp simd
        for (int64_t k = 0; k < P; ++k)
          o[k] = std::max((row[k] * s + t) * gr[k], lo);
      } else if (ir) {
#pragma omp simd
        for (int64_t k = 0; k < P; ++k)
          o[k] = std::max(row[k] * s + t + ir[k], lo);
      } else {
#pragma omp simd
        for (int64_t k = 0; k < P; ++k) o[k] = std::max(row[k] * s + t, lo);
      }
    }
  });
}

at::Tensor gate_tail_forward_cpu(const at::Tensor& c,
                                 const c10::optional<at::Tensor>& identity,
                                 const at::Tensor& scale,
                                 const at::Tensor& shift,
                                 const c10::optional<at::Tensor>& gate,
                                 bool relu) {
  check_c(c);
  const int64_t B = c.size(0), C = c.size(1);
  check_small(scale, c, {B, C}, "scale");
  check_small(shift, c, {B, C}, "shift");
  if (identity.has_value()) check_map(*identity, c, "identity");
  const int64_t groups = gate_groups(gate, c);
  at::Tensor y = at::empty_like(c);
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "gate_tail_forward_cpu", [&] {
    tail_forward_kernel<scalar_t>(
        tail_args<scalar_t>(c, identity, scale, shift, gate, groups), relu,
        y.data_ptr<scalar_t>());
  });
  return y;
}

// positions per backward task: all of a plane when there are enough
// (sample, group) tasks to share the threads, otherwise chunks of at least
// kMinChunk positions
constexpr int64_t kMinChunk = 1024;

int64_t chunk_length(int64_t tasks, int64_t P) {
  const int64_t wanted = 4 * at::get_num_threads();
  if (tasks >= wanted || P <= kMinChunk) return std::max<int64_t>(P, 1);
  const int64_t per_task = (wanted + tasks - 1) / tasks;
  return std::max<int64_t>(kMinChunk, (P + per_task - 1) / per_task);
}

// what backward writes: the map's gradient, the masked output gradient
// (null: not asked for), the gate's (null without a gate) and the per
// (plane, chunk) sums of gx * c and gx, gx = masked gradient * gate
template <typename T>
struct TailGrads {
  T* c;
  T* masked;
  T* gate;
  double* partial;
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
    std::vector<double> gate_acc(a.gate ? static_cast<size_t>(len) : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task % chunks, bg = task / chunks;
      const int64_t k0 = chunk * len, n = std::min(len, P - k0);
      const int64_t b = bg / groups, grp = bg % groups;
      const T* __restrict__ gr = a.gate ? a.gate + bg * P + k0 : nullptr;
      double* __restrict__ acc = gate_acc.data();
      if (gr) std::fill(acc, acc + n, 0.0);
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
      if (out.gate) {
        T* __restrict__ ggr = out.gate + bg * P + k0;
        for (int64_t k = 0; k < n; ++k) ggr[k] = T(acc[k]);
      }
    }
  });
}

std::vector<at::Tensor> gate_tail_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& c,
    const c10::optional<at::Tensor>& y, const at::Tensor& scale,
    const at::Tensor& shift, const c10::optional<at::Tensor>& gate,
    bool has_identity) {
  check_c(c);
  check_map(grad_y, c, "grad_y");
  if (y.has_value()) check_map(*y, c, "y");
  const int64_t B = c.size(0), C = c.size(1), P = c.size(2) * c.size(3);
  check_small(scale, c, {B, C}, "scale");
  check_small(shift, c, {B, C}, "shift");
  const int64_t groups = gate_groups(gate, c);
  const int64_t len = chunk_length(B * (groups ? groups : C), P);
  const int64_t chunks = P > 0 ? (P + len - 1) / len : 1;
  const bool write_masked = has_identity && y.has_value();
  at::Tensor grad_c = at::empty_like(c);
  at::Tensor masked =
      write_masked ? at::empty_like(c) : at::empty({0}, c.options());
  at::Tensor grad_gate =
      groups ? at::empty_like(*gate) : at::empty({0}, c.options());
  // zeros: a task whose chunk is empty (P == 0) writes no sums
  std::vector<double> partial(static_cast<size_t>(B * C * chunks * 2), 0.0);
  at::Tensor grad_scale = at::empty_like(scale);
  at::Tensor grad_shift = at::empty_like(shift);
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "gate_tail_backward_cpu", [&] {
    using T = scalar_t;
    tail_backward_kernel<T>(
        tail_args<T>(c, c10::nullopt, scale, shift, gate, groups),
        grad_y.data_ptr<T>(), y.has_value() ? y->data_ptr<T>() : nullptr,
        {grad_c.data_ptr<T>(), write_masked ? masked.data_ptr<T>() : nullptr,
         groups ? grad_gate.data_ptr<T>() : nullptr, partial.data()},
        len, chunks);
    T* gs = grad_scale.data_ptr<T>();
    T* gt = grad_shift.data_ptr<T>();
    for (int64_t i = 0; i < B * C; ++i) {  // the chunks' sums, in order
      double sum_s = 0, sum_t = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        sum_s += partial[(i * chunks + chunk) * 2];
        sum_t += partial[(i * chunks + chunk) * 2 + 1];
      }
      gs[i] = T(sum_s);
      gt[i] = T(sum_t);
    }
  });
  return {grad_c, masked, grad_scale, grad_shift, grad_gate};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prm_det, m) {
  m.def("gate_moments_cpu(Tensor c) -> (Tensor, Tensor)");
  m.def(
      "gate_tail_forward_cpu(Tensor c, Tensor? identity, Tensor scale, "
      "Tensor shift, Tensor? gate, bool relu) -> Tensor");
  m.def(
      "gate_tail_backward_cpu(Tensor grad_y, Tensor c, Tensor? y, "
      "Tensor scale, Tensor shift, Tensor? gate, bool has_identity) "
      "-> Tensor[]");
}

TORCH_LIBRARY_IMPL(prm_det, CPU, m) {
  m.impl("gate_moments_cpu", &gate_moments_cpu);
  m.impl("gate_tail_forward_cpu", &gate_tail_forward_cpu);
  m.impl("gate_tail_backward_cpu", &gate_tail_backward_cpu);
}

}  // namespace prm_det
