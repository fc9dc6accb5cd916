"""A 1x1 convolution, BatchNorm and ReLU, as one matmul:
``relu(bn(conv1x1(x)))`` for an input of few channels (LR-Net's stem:
3 -> 64 at the image's full resolution).

A 1x1 convolution is linear in its input, so the batch statistics of its
output channel c are those of the input seen through the weight's row w_c:
mean w_c . mu and (biased) variance w_c^T Sigma w_c, with mu and Sigma the
input's mean and covariance over batch and positions (C_in numbers and a
C_in x C_in matrix, float64). BatchNorm's affine map then folds into the
convolution's weight and a bias, and the layer is one matmul and an in-place
ReLU: the C_out-channel map is written once, where the modules write it
three times (conv, norm, ReLU) and read it four times more for the
statistics and backward; backward is ReLU's and the matmul's (the
statistics' gradients reach the weights through the small tensors).

The matmul and ReLU run on the C++ kernels (``csrc/pointwise_relu_cpu.cpp``)
for float32/float64 CPU maps in eager mode where PRM's CPU backend is
chosen: forward writes the map once, backward reads the output gradient
and the output once for the weight's and bias's gradients (no masked copy).
Elsewhere (CUDA, autocast, torch.compile, tracing, the torch backends)
torch ops: ``baddbmm``, ``relu_``. Measured on 2 CPU cores
(``benchmarks/results/cpu_2core_lr_resnet.md``), 2x3x224x224 -> 64
channels, forward and backward with the batch's statistics: 26 ms as
modules, 10.6 ms on torch ops, 5.8 ms on the kernels.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .backends import cpu
from .local_relation_op import CPU, relation_backend


def pointwise_batch_moments(x: Tensor, weight: Tensor) -> Tuple[Tensor,
                                                                 Tensor]:
    """Mean and biased variance over (batch, positions) of each output
    channel of the 1x1 convolution ``weight`` [C_out, C_in, 1, 1] on ``x``
    [b, C_in, H, W], from the input's mean and covariance (float64,
    differentiable in x and the weight)."""
    b, channels, h, w = x.shape
    with torch.autocast(x.device.type, enabled=False):
        flat = x.double().transpose(0, 1).reshape(channels, b * h * w)
        mu = flat.mean(1)
        centred = flat - mu[:, None]
        sigma = centred @ centred.t() / flat.shape[1]
        rows = weight.double().reshape(weight.shape[0], channels)
        return rows @ mu, ((rows @ sigma) * rows).sum(1)


def pointwise_norm_relu(x: Tensor, weight: Tensor,
                        norm_weight: Optional[Tensor],
                        norm_bias: Optional[Tensor], mean: Tensor,
                        var: Tensor, eps: float) -> Tensor:
    """``relu(batch_norm(conv2d(x, weight), mean, var, norm_weight,
    norm_bias, eps))`` for a 1x1 ``weight`` [C_out, C_in, 1, 1] as one
    matmul with BatchNorm folded into the weight and a bias (None affine
    tensors: 1 and 0, as BatchNorm without ``affine``)."""
    b, channels, h, w = x.shape
    out_channels = weight.shape[0]
    scale = (var + eps).rsqrt()
    if norm_weight is not None:
        scale = scale * norm_weight
    shift = -mean * scale
    if norm_bias is not None:
        shift = shift + norm_bias
    folded = weight.reshape(out_channels, channels) * scale[:, None]
    folded = folded.to(weight.dtype)
    shift = shift.to(weight.dtype)
    flat = x.reshape(b, channels, h * w)
    if _on_the_kernel(flat, folded):
        out = _PointwiseReLU.apply(flat, folded, shift)
    else:
        out = torch.baddbmm(shift[:, None],
                            folded.expand(b, out_channels, channels),
                            flat).relu_()
    return out.view(b, out_channels, h, w)


def _on_the_kernel(x: Tensor, weight: Tensor) -> bool:
    return (not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not torch.is_autocast_enabled(x.device.type)
            and x.dtype == weight.dtype and relation_backend(x) == CPU)


class _PointwiseReLU(torch.autograd.Function):
    """``relu(weight @ x + bias[:, None])`` for x [b, C_in, P] on the C++
    kernels; backward keeps x and the output (the next layer's input,
    kept by it anyway)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        out = cpu._ops().pointwise_relu_forward_cpu(x, weight, bias)
        ctx.save_for_backward(x, weight, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, out = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = \
            cpu._ops().pointwise_relu_backward_cpu(
                grad_out.contiguous(), out, x, weight,
                ctx.needs_input_grad[0])
        return (grad_x if ctx.needs_input_grad[0] else None, grad_weight,
                grad_bias)
