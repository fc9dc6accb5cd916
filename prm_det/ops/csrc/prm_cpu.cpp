// PRM with dot-product similarity on CPU: forward and backward, one group
// (a [cg, P] block of one sample's contiguous channels) at a time, groups in
// parallel: the ``cpu`` backend of prm_det/ops/backends/cpu.py, which
// compiles it at first use. This file holds the op entry points and their
// registration; the parts live beside it: prm_types.h (settings, per-group
// parameters and state), vec_math.h (exp, the float gates' sigmoid),
// prm_passes.h (the per-group passes), tensor_args.h (arguments read and
// checked), batch_norm.h (BatchNorm folded in).
//
// The math is the torch backend's (prm_det/ops/backends/torch_ops.py),
// arranged so that a group's block is read a few times while it sits in
// cache, instead of once per eager op:
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
// With BatchNorm fused in (bn_prm_*: the op's ``norm``) the passes
// read the block's pre-BatchNorm map c and apply the per-channel affine on
// the fly, so the normalized map is never written: forward first takes the
// batch statistics (training), and backward runs one task per channel group
// over the whole batch (BatchNorm's sums over the batch, then dL/dc, while
// the group's rows are in cache).
// The passes that accumulate over channels take four channel rows per sweep
// (their per-position accumulators are loaded and stored a quarter as
// often), and bn_prm_eval_ (inference) writes y over the map it reads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "batch_norm.h"
#include "prm_passes.h"
#include "prm_types.h"
#include "tensor_args.h"
#include "vec_math.h"

namespace prm_det {
namespace {

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
