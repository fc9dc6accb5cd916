"""The local relation aggregation on torch ops (any device and dtype), one
window offset at a time: nothing of k * k times the map's size is made.

Forward is two sweeps over the k * k offsets. The first takes each output
position's largest logit (maps of [b, G, Ho, Wo], 1/m of the value's
size); the second adds exp(logit - max) and exp(logit - max) * value into
the output, then divides. For offset d only the output positions whose
input position (i, j) * stride + d lies inside the map take part: a
rectangle of strided views, no padding and no mask. Saved for backward:
the inputs and the log-sum-exp per (sample, group, position).

Backward recomputes each offset's weight exp(logit - lse), and with them
the output (returned: the local relation layer's final 1x1 conv needs it
for its weight's gradient, so nothing keeps it from forward), and uses the
identity sum_d w_d dw_d = sum_{c in g} grad_out_c * out_c (as flash
attention does) for the softmax's gradient:

    dlogit_d = w_d * (sum_{c in g} grad_out_c * value_c(d) - D)
    grad value_c(d) += w_d * grad_out_c
    grad query += dlogit_d * dphi/dq,  grad key(d) += dlogit_d * dphi/dk
    grad prior[g, d] = sum over samples and positions of dlogit_d
"""
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from ..local_relation import output_size, similarity, similarity_grads

NAME = 'torch'


def _rows(offset: int, size: int, out_size: int,
          stride: int) -> Optional[Tuple[slice, slice]]:
    """(output slice, input slice) of one axis for a window offset: the
    outputs o with 0 <= o * stride + offset < size, and their inputs."""
    first = (max(0, -offset) + stride - 1) // stride
    last = min(out_size - 1, (size - 1 - offset) // stride)
    if last < first:
        return None
    start = first * stride + offset
    return (slice(first, last + 1),
            slice(start, start + (last - first) * stride + 1, stride))


def taps(kernel_size: int, stride: int, h: int,
         w: int) -> Iterator[Tuple[int, Tuple[slice, slice], Tuple[slice,
                                                                   slice]]]:
    """Every window offset that reaches inside the map: (tap index
    di * k + dj, output (rows, cols), input (rows, cols))."""
    radius = kernel_size // 2
    ho, wo = output_size(h, stride), output_size(w, stride)
    for di in range(kernel_size):
        rows = _rows(di - radius, h, ho, stride)
        if rows is None:
            continue
        for dj in range(kernel_size):
            cols = _rows(dj - radius, w, wo, stride)
            if cols is None:
                continue
            yield (di * kernel_size + dj, (rows[0], cols[0]),
                   (rows[1], cols[1]))


def _grouped(t: Tensor, groups: int) -> Tensor:
    """[b, C, h, w] -> [b, G, C/G, h, w] (a view)."""
    b, c, h, w = t.shape
    return t.view(b, groups, c // groups, h, w)


def _prepare(query, key, value, prior):
    dtype = torch.promote_types(value.dtype, torch.float32)
    return [t.to(dtype) for t in (query, key, value, prior)]


def forward(query: Tensor, key: Tensor, value: Tensor, prior: Tensor,
            kernel_size: int, stride: int,
            method: str) -> Tuple[Tensor, Tensor]:
    """(out [b, C, Ho, Wo] in the value's dtype, lse [b, G, Ho, Wo] in the
    compute dtype)."""
    out_dtype = value.dtype
    query, key, value, prior = _prepare(query, key, value, prior)
    b, channels, h, w = value.shape
    groups = key.shape[1]
    prior = prior.reshape(groups, kernel_size * kernel_size, 1, 1)
    window = list(taps(kernel_size, stride, h, w))
    peak = torch.full_like(query, float('-inf'))
    for tap, (o_rows, o_cols), (i_rows, i_cols) in window:
        logit = similarity(query[:, :, o_rows, o_cols],
                           key[:, :, i_rows, i_cols], method) + prior[:, tap]
        region = peak[:, :, o_rows, o_cols]
        torch.maximum(region, logit, out=region)
    total = torch.zeros_like(query)
    acc = _grouped(value.new_zeros(b, channels, *query.shape[2:]), groups)
    grouped_value = _grouped(value, groups)
    for tap, (o_rows, o_cols), (i_rows, i_cols) in window:
        weight = (similarity(query[:, :, o_rows, o_cols],
                             key[:, :, i_rows, i_cols], method) +
                  prior[:, tap] - peak[:, :, o_rows, o_cols]).exp_()
        total[:, :, o_rows, o_cols] += weight
        acc[:, :, :, o_rows, o_cols] += (
            weight[:, :, None] * grouped_value[:, :, :, i_rows, i_cols])
    out = (acc / total[:, :, None]).view(b, channels, *query.shape[2:])
    return out.to(out_dtype), peak + total.log()


def backward(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor,
             prior: Tensor, lse: Tensor, kernel_size: int, stride: int,
             method: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad query, grad key, grad value, grad prior, out): the gradients
    in their inputs' dtypes and the output recomputed, in the value's."""
    dtypes = [t.dtype for t in (query, key, value, prior)]
    query, key, value, prior = _prepare(query, key, value, prior)
    grad_out = grad_out.to(value.dtype)
    b, channels, h, w = value.shape
    groups = key.shape[1]
    taps_count = kernel_size * kernel_size
    prior = prior.reshape(groups, taps_count, 1, 1)
    grad_o = _grouped(grad_out, groups)
    grouped_value = _grouped(value, groups)
    window = list(taps(kernel_size, stride, h, w))

    def weights():
        for tap, (o_rows, o_cols), (i_rows, i_cols) in window:
            q = query[:, :, o_rows, o_cols]
            k = key[:, :, i_rows, i_cols]
            weight = (similarity(q, k, method) + prior[:, tap] -
                      lse[:, :, o_rows, o_cols]).exp_()
            yield tap, (o_rows, o_cols), (i_rows, i_cols), q, k, weight

    out = _grouped(value.new_zeros(b, channels, *query.shape[2:]), groups)
    for _, (o_rows, o_cols), (i_rows, i_cols), _, _, weight in weights():
        out[:, :, :, o_rows, o_cols] += (
            weight[:, :, None] * grouped_value[:, :, :, i_rows, i_cols])
    # sum_d w_d * dw_d, per (sample, group, position)
    d_total = (grad_o * out).sum(2)
    grad_q = torch.zeros_like(query)
    grad_k = torch.zeros_like(key)
    grad_v = torch.zeros_like(value)
    grouped_grad_v = _grouped(grad_v, groups)
    grad_prior = torch.zeros(groups, taps_count, dtype=value.dtype,
                             device=value.device)
    for tap, (o_rows, o_cols), (i_rows, i_cols), q, k, weight in weights():
        g_out = grad_o[:, :, :, o_rows, o_cols]
        d_weight = (g_out * grouped_value[:, :, :, i_rows, i_cols]).sum(2)
        d_logit = weight * (d_weight - d_total[:, :, o_rows, o_cols])
        grouped_grad_v[:, :, :, i_rows, i_cols] += weight[:, :, None] * g_out
        dq, dk = similarity_grads(q, k, method)
        grad_q[:, :, o_rows, o_cols] += d_logit * dq
        grad_k[:, :, i_rows, i_cols] += d_logit * dk
        grad_prior[:, tap] = d_logit.sum((0, 2, 3))
    grad_prior = grad_prior.view(groups, kernel_size, kernel_size)
    grads = tuple(g.to(dtype) for g, dtype in zip(
        (grad_q, grad_k, grad_v, grad_prior), dtypes))
    return (*grads, out.view(b, channels, *query.shape[2:]).to(dtypes[2]))
