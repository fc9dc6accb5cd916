"""The local relation layer's computation (LR-Net) as one autograd node,
on tensors: the 1x1 query and key embeddings, the aggregation
``prm_det::local_relation`` (:mod:`.local_relation_op`) and the final 1x1
conv.

Written as modules one after another, autograd would keep for backward the
input (the embeddings' and the value), the query and the key, the
aggregated map (the final conv's input: as big as the input) and the
op's log-sum-exp: 2.4 maps where the 3x3 conv the layer replaces keeps
one. Here backward keeps the input, the weights and the log-sum-exp (1/m of
the map) and recomputes the rest: the query and the key (1x1 convs to one
channel per group, 1/m of the map each, a few percent of the layer's
work), and the aggregated map, which the op's backward makes anyway on its
way (it recomputes each window's weights) and returns for the final conv's
weight gradient. So the layer keeps 1 + 1/m maps (1.125 at m = 8) for
backward, and costs no second forward of the aggregation.

The three 1x1 convs run as matmuls (:func:`project`). Autocast: each
computes in the dtype it did in forward (recorded), the aggregation in
the value's dtype (at least float32), as the modules would. The readable
route (the 'reference' backend, exporting, tracing) and a forward without
gradients run the same sequence with autograd through each step.
"""
from typing import Optional

import torch
from torch import Tensor

from .functions import _needs_grad
from .local_relation_op import (_backward_impl, _forward_impl,
                                _local_relation, _local_relation_backward,
                                local_relation, prepared, relation_backend,
                                without_autocast)


def _aggregation(*args):
    """``prm_det::local_relation``: the op under torch.compile (which sees
    it whole), its implementation in eager mode (no dispatcher: 30-40 us a
    call)."""
    if torch.compiler.is_compiling():
        return _local_relation(*args)
    return _forward_impl(*args)


def _aggregation_backward(*args):
    """``prm_det::local_relation_backward``, as :func:`_aggregation`."""
    if torch.compiler.is_compiling():
        return _local_relation_backward(*args)
    return _backward_impl(*args)


def _strided(x: Tensor, stride: int) -> Tensor:
    """The input at the output's positions (the query's input)."""
    return x if stride == 1 else x[:, :, ::stride, ::stride]


def _batched(matrix: Tensor, b: int) -> Tensor:
    """``matrix`` for each of b samples: bmm's operand (torch.matmul of a
    matrix and a batch folds the batch into the rows: two copies of the
    map)."""
    return matrix.expand(b, *matrix.shape)


def project(x: Tensor, weight: Tensor,
            bias: Optional[Tensor] = None) -> Tensor:
    """A 1x1 conv (``weight`` [C_out, C, 1, 1]) of ``x`` [b, C, H, W] as a
    matmul over the flattened positions: 2-4x faster than mkldnn's
    convolution on CPU at the layer's sizes, whose NCHW maps it reorders
    (benchmarks/results/local_relation_cpu_2core.md); the same under
    autocast (matmul and conv are both lower-precision ops)."""
    b, channels, h, w = x.shape
    out = torch.bmm(_batched(weight.reshape(weight.shape[0], channels), b),
                    x.reshape(b, channels, h * w))
    if bias is not None:
        out = out + bias.to(out.dtype)[:, None]
    return out.view(b, weight.shape[0], h, w)  # (b may be 0)


def project_weight_grad(x: Tensor, weight: Tensor, grad: Tensor,
                        dtype: torch.dtype) -> Tensor:
    """The gradient of :func:`project`'s weight for the output gradient
    ``grad``, computed in ``dtype`` (forward's), in the weight's dtype."""
    b, channels, h, w = x.shape
    grad = grad.to(dtype).reshape(b, weight.shape[0], h * w)
    grad_weight = torch.bmm(
        grad, x.to(dtype).reshape(b, channels, h * w).transpose(1, 2)).sum(0)
    return grad_weight.view(weight.shape).to(weight.dtype)


def project_grads(x: Tensor, weight: Tensor, grad: Tensor,
                  dtype: torch.dtype, grad_x: Tensor) -> Tensor:
    """:func:`project_weight_grad`, and the input's gradient added into
    ``grad_x`` (of x's shape and dtype; in the matmul where the dtypes
    agree and it is contiguous: one pass over the map less)."""
    b, channels, h, w = x.shape
    weight_t = _batched(
        weight.reshape(weight.shape[0], channels).to(dtype).t(), b)
    flat = grad.to(dtype).reshape(b, weight.shape[0], h * w)
    if grad_x.dtype == dtype and grad_x.is_contiguous():
        grad_x.view(b, channels, h * w).baddbmm_(weight_t, flat)
    else:  # autocast (a lower precision), or a strided map
        grad_x.add_(torch.bmm(weight_t, flat).view(x.shape))
    return project_weight_grad(x, weight, grad, dtype)


def _query_and_key(x: Tensor, query_weight: Tensor, key_weight: Tensor,
                   stride: int):
    """The query (at the output's positions) and the key (at every input
    position). At stride 1 both see the same positions: one 1x1
    projection of x to both (2G channels, one pass over x). Strided, the
    query projects the input's strided positions only (what the layer
    computes, and what get_flops counts)."""
    if stride > 1:
        return (project(_strided(x, stride), query_weight),
                project(x, key_weight))
    groups = query_weight.shape[0]
    both = project(x, torch.cat([query_weight, key_weight]))
    return both[:, :groups], both[:, groups:]


def _at_input_positions(grad_query: Tensor, size, stride: int) -> Tensor:
    """The query's gradient on the input's grid (zero where no output
    sits): backward takes the query's and the key's weight and input
    gradients in one matmul each over x, and no strided copy of x's C
    channels."""
    if stride == 1:
        return grad_query
    full = grad_query.new_zeros(*grad_query.shape[:2], *size)
    _strided(full, stride).copy_(grad_query)
    return full


class _LayerFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, query_weight, key_weight, prior, out_weight, out_bias,
                kernel_size, stride, method, backend):
        query, key = _query_and_key(x, query_weight, key_weight, stride)
        args = prepared(query, key, x, prior, kernel_size, stride, method,
                        backend)
        with without_autocast(x.device.type):
            aggregated, lse = _aggregation(*args, kernel_size, stride, method,
                                           backend)
        out = project(aggregated, out_weight, out_bias)
        ctx.save_for_backward(x, query_weight, key_weight, prior,
                              out_weight, lse)
        ctx.settings = (kernel_size, stride, method, backend)
        # the dtypes the projections computed in (autocast's choice)
        ctx.dtypes = (key.dtype, out.dtype)
        ctx.bias_dtype = None if out_bias is None else out_bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, query_weight, key_weight, prior, out_weight, lse = \
            ctx.saved_tensors
        kernel_size, stride, method, backend = ctx.settings
        embed_dtype, out_dtype = ctx.dtypes
        with without_autocast(x.device.type):
            query, key = _query_and_key(x.to(embed_dtype),
                                        query_weight.to(embed_dtype),
                                        key_weight.to(embed_dtype), stride)
            # the final projection's input gradient needs its weight only
            grad_out = grad_out.to(out_dtype)
            b, _, ho, wo = grad_out.shape
            out_2d = out_weight.reshape(out_weight.shape[:2])
            grad_aggregated = torch.bmm(
                _batched(out_2d.to(out_dtype).t(), b),
                grad_out.reshape(b, out_2d.shape[0], ho * wo))
            args = prepared(query, key, x, prior, kernel_size, stride,
                            method, backend)
            grad_query, grad_key, grad_x, grad_prior, aggregated = \
                _aggregation_backward(
                    grad_aggregated.view(b, x.shape[1], ho, wo).to(x.dtype),
                    *args, lse, kernel_size, stride, method, backend)
            grad_out_weight = project_weight_grad(aggregated, out_weight,
                                                  grad_out, out_dtype)
            grad_bias = (None if ctx.bias_dtype is None else
                         grad_out.sum((0, 2, 3)).to(ctx.bias_dtype))
            grad_both = torch.cat([
                _at_input_positions(grad_query, x.shape[2:], stride),
                grad_key], 1)
            grad_query_weight, grad_key_weight = project_grads(
                x, torch.cat([query_weight, key_weight]), grad_both,
                embed_dtype, grad_x).split(query_weight.shape[0])
        return (grad_x, grad_query_weight, grad_key_weight,
                grad_prior.to(prior.dtype), grad_out_weight, grad_bias,
                None, None, None, None)


def local_relation_layer(x: Tensor, query_weight: Tensor, key_weight: Tensor,
                         prior: Tensor, out_weight: Tensor,
                         out_bias: Optional[Tensor], kernel_size: int,
                         stride: int = 1,
                         method: str = 'squared_difference') -> Tensor:
    """A local relation layer on ``x`` [b, C, H, W]: ``query_weight`` and
    ``key_weight`` [G, C, 1, 1], ``prior`` [G, k, k] (the geometric prior's
    logits), ``out_weight`` [C_out, C, 1, 1] and ``out_bias`` (or None);
    returns [b, C_out, Ho, Wo]. Backward keeps x, the weights and the
    log-sum-exp only (module docstring)."""
    backend = relation_backend(x)
    if (backend is None or torch.jit.is_tracing() or not _needs_grad(
            x, query_weight, key_weight, prior, out_weight, out_bias)):
        query, key = _query_and_key(x, query_weight, key_weight, stride)
        aggregated = local_relation(query, key, x, prior, kernel_size,
                                    stride, method)
        return project(aggregated, out_weight, out_bias)
    return _LayerFunction.apply(x, query_weight, key_weight, prior,
                                out_weight, out_bias, kernel_size, stride,
                                method, backend)
