// relu(W x + b) over the positions of a map with few input channels: the
// folded 1x1 conv + BatchNorm + ReLU of LR-Net's stem
// (prm_det/ops/pointwise_norm.py has the math and the same steps on torch
// ops: baddbmm, relu_, and autograd's threshold_backward, bmm and sum).
//
//   pointwise_relu_forward_cpu(x [B, Ci, P], weight [Co, Ci], bias [Co])
//     -> out [B, Co, P]. Tasks are (sample, output channel) planes, a
//     chunk of positions at a time in a buffer that stays in L1: the bias,
//     each input channel's weighted row added, the ReLU, one store. The
//     output is written once (torch ops: written by the matmul, then read
//     and written by the ReLU).
//   pointwise_relu_backward_cpu(grad_out, out, x, weight, input_grad)
//     -> (grad_x or an empty tensor, grad_weight [Co, Ci], grad_bias [Co]).
//     The ReLU's mask is out > 0. Weight and bias: tasks are output
//     channels, each summing grad_out * mask (times each input channel's
//     row) over samples and positions: one read of grad_out and out, no
//     masked copy of the map (autograd: threshold_backward writes one,
//     then the matmul and the sum read it). The input's gradient (only
//     when asked: the stem's input is the image) by (sample, chunk) tasks
//     over the output channels.
//
// Contiguous float32 / float64 CPU tensors of one dtype; a chunk's sums in
// the dtype, the chunks' sums in double, added in a fixed order: the same
// bits every run, at any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace prm_det {
namespace {

constexpr int64_t kChunk = 1024;  // positions a task's buffer holds
constexpr int64_t kLanes = 32;    // partial sums: vector registers' worth

// sum over p < len of a[p] * b[p] (b null: of a[p]) in kLanes partial
// sums, which the compiler keeps in vector registers (a single running sum
// would be a scalar chain: floating-point adds are not reassociated), then
// added in order.
template <typename T>
T dot(const T* a, const T* b, int64_t len) {
  T acc[kLanes] = {};
  int64_t p = 0;
  if (b == nullptr) {
    for (; p + kLanes <= len; p += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) acc[l] += a[p + l];
  } else {
    for (; p + kLanes <= len; p += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) acc[l] += a[p + l] * b[p + l];
  }
  T total = 0;
  for (; p < len; ++p) total += b == nullptr ? a[p] : a[p] * b[p];
  for (int64_t l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 3 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "prm_det: pointwise_relu expects x [B, Ci, P] and weight "
              "[Co, Ci], got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == weight.scalar_type() &&
                  (x.scalar_type() == at::kFloat ||
                   x.scalar_type() == at::kDouble),
              "prm_det: pointwise_relu takes float32 or float64 CPU tensors "
              "of one dtype, got ", x.scalar_type(), " and ",
              weight.scalar_type());
}

template <typename T>
void forward_kernel(const T* x, const T* w, const T* b, T* out, int64_t B,
                    int64_t Ci, int64_t Co, int64_t P) {
  at::parallel_for(0, B * Co, 1, [&](int64_t begin, int64_t end) {
    T buf[kChunk];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / Co, c = task % Co;
      const T* xn = x + n * Ci * P;
      T* o = out + task * P;
      for (int64_t p0 = 0; p0 < P; p0 += kChunk) {
        const int64_t len = std::min(kChunk, P - p0);
        for (int64_t p = 0; p < len; ++p) buf[p] = b[c];
        for (int64_t i = 0; i < Ci; ++i) {
          const T wi = w[c * Ci + i];
          const T* row = xn + i * P + p0;
          for (int64_t p = 0; p < len; ++p) buf[p] += wi * row[p];
        }
        for (int64_t p = 0; p < len; ++p)
          o[p0 + p] = buf[p] > T(0) ? buf[p] : T(0);
      }
    }
  });
}

// grad_weight and grad_bias: task c sums over samples and positions.
template <typename T>
void weight_grads(const T* g, const T* out, const T* x, T* gw, T* gb,
                  int64_t B, int64_t Ci, int64_t Co, int64_t P) {
  at::parallel_for(0, Co, 1, [&](int64_t begin, int64_t end) {
    T masked[kChunk];
    std::vector<double> sums(static_cast<size_t>(Ci + 1));
    for (int64_t c = begin; c < end; ++c) {
      std::fill(sums.begin(), sums.end(), 0.0);
      for (int64_t n = 0; n < B; ++n) {
        const T* gc = g + (n * Co + c) * P;
        const T* oc = out + (n * Co + c) * P;
        const T* xn = x + n * Ci * P;
        for (int64_t p0 = 0; p0 < P; p0 += kChunk) {
          const int64_t len = std::min(kChunk, P - p0);
          for (int64_t p = 0; p < len; ++p)
            masked[p] = oc[p0 + p] > T(0) ? gc[p0 + p] : T(0);
          sums[Ci] += dot<T>(masked, nullptr, len);
          for (int64_t i = 0; i < Ci; ++i)
            sums[i] += dot<T>(masked, xn + i * P + p0, len);
        }
      }
      for (int64_t i = 0; i < Ci; ++i) gw[c * Ci + i] = T(sums[i]);
      gb[c] = T(sums[Ci]);
    }
  });
}

// grad_x[n, i, p] = sum_c w[c, i] * grad_out[n, c, p] * (out[n, c, p] > 0)
template <typename T>
void input_grad(const T* g, const T* out, const T* w, T* gx, int64_t B,
                int64_t Ci, int64_t Co, int64_t P) {
  const int64_t chunks = (P + kChunk - 1) / kChunk;
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks, p0 = (task % chunks) * kChunk;
      const int64_t len = std::min(kChunk, P - p0);
      for (int64_t i = 0; i < Ci; ++i)
        std::fill_n(gx + (n * Ci + i) * P + p0, len, T(0));
      for (int64_t c = 0; c < Co; ++c) {
        const T* gc = g + (n * Co + c) * P + p0;
        const T* oc = out + (n * Co + c) * P + p0;
        for (int64_t i = 0; i < Ci; ++i) {
          const T wi = w[c * Ci + i];
          T* row = gx + (n * Ci + i) * P + p0;
          for (int64_t p = 0; p < len; ++p)
            row[p] += oc[p] > T(0) ? wi * gc[p] : T(0);
        }
      }
    }
  });
}

at::Tensor pointwise_relu_forward_cpu(const at::Tensor& x_in,
                                      const at::Tensor& weight_in,
                                      const at::Tensor& bias_in) {
  check_inputs(x_in, weight_in);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(),
                   bias = bias_in.contiguous();
  TORCH_CHECK(bias.numel() == weight.size(0) &&
                  bias.scalar_type() == x.scalar_type(),
              "prm_det: pointwise_relu's bias must have one value per output "
              "channel in x's dtype");
  const int64_t B = x.size(0), Ci = x.size(1), P = x.size(2),
                Co = weight.size(0);
  at::Tensor out = at::empty({B, Co, P}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pointwise_relu_forward", [&] {
    forward_kernel<scalar_t>(x.data_ptr<scalar_t>(),
                             weight.data_ptr<scalar_t>(),
                             bias.data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>(), B, Ci, Co, P);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pointwise_relu_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& out_in,
    const at::Tensor& x_in, const at::Tensor& weight_in, bool input_grad_too) {
  check_inputs(x_in, weight_in);
  const at::Tensor g = grad_in.contiguous(), out = out_in.contiguous(),
                   x = x_in.contiguous(), weight = weight_in.contiguous();
  const int64_t B = x.size(0), Ci = x.size(1), P = x.size(2),
                Co = weight.size(0);
  TORCH_CHECK(g.sizes() == out.sizes() && out.dim() == 3 &&
                  out.size(0) == B && out.size(1) == Co && out.size(2) == P &&
                  g.scalar_type() == x.scalar_type() &&
                  out.scalar_type() == x.scalar_type(),
              "prm_det: pointwise_relu_backward expects grad_out and out "
              "[B, Co, P] in x's dtype, got ", g.sizes(), " and ",
              out.sizes());
  at::Tensor gw = at::empty_like(weight), gb = at::empty({Co}, x.options());
  at::Tensor gx = input_grad_too ? at::empty_like(x) : at::empty({0},
                                                                x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pointwise_relu_backward", [&] {
    using T = scalar_t;
    weight_grads<T>(g.data_ptr<T>(), out.data_ptr<T>(), x.data_ptr<T>(),
                    gw.data_ptr<T>(), gb.data_ptr<T>(), B, Ci, Co, P);
    if (input_grad_too)
      input_grad<T>(g.data_ptr<T>(), out.data_ptr<T>(), weight.data_ptr<T>(),
                    gx.data_ptr<T>(), B, Ci, Co, P);
  });
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(prm_det, m) {
  m.def(
      "pointwise_relu_forward_cpu(Tensor x, Tensor weight, Tensor bias) "
      "-> Tensor");
  m.def(
      "pointwise_relu_backward_cpu(Tensor grad_out, Tensor out, Tensor x, "
      "Tensor weight, bool input_grad) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(prm_det, CPU, m) {
  m.impl("pointwise_relu_forward_cpu", &pointwise_relu_forward_cpu);
  m.impl("pointwise_relu_backward_cpu", &pointwise_relu_backward_cpu);
}

}  // namespace prm_det
