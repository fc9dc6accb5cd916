"""PRM's ``torch`` backend: torch ops, any device and dtype.

Half-precision maps are computed in float32 (dot products of realistic
activations overflow float16) and returned in their own dtype. The math is
:func:`prm_det.ops.reference.prm_reference`'s, arranged for few passes:
alpha and beta scale the two keys (q, z) so that both similarities are one
batched matmul; the normalization and lambda become one gain per (sample,
group) on the centred S; the Gaussian position weight comes from [n, h] and
[n, w] tables. Backward recomputes the gate from the saved
:class:`~prm_det.ops.contract.PRMState` (one matmul) and BatchNorm's output
from its input (one per-channel affine), so nothing of the map's size is
kept besides the op's inputs.
"""
import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..contract import (BatchNorm, Forward, Gradients, Needs, PRMOptions,
                        PRMParams, PRMState, Saved)
from ..reference import _TINY_VAR, axis_distances, gaussian

NAME = 'torch'  # what select and the custom ops call this backend


def check(c: Tensor) -> Optional[str]:
    return None  # any device, any floating dtype


def available() -> bool:
    return True


def unavailable_reason() -> str:
    return ''


class _Scores(NamedTuple):
    """S of every position and what its gradient needs, [n, ...]."""
    s: Tensor  # [n, P]
    sim_query: Tensor  # alpha q . x_p, [n, P]
    keys: Tensor  # [n, cg, 2]: alpha q and beta z
    dist: Optional[Tensor]  # D, [n, P]
    d_row: Optional[Tensor]  # |row - row_q|, [n, h]
    d_col: Optional[Tensor]
    half_row: Optional[Tensor]  # G(theta_row d_row) / 2, [n, h]
    half_col: Optional[Tensor]


def _per_instance(param: Tensor, batch: int, groups: int) -> Tensor:
    """A per-group parameter as one value per (sample, group): [b*g, 1]."""
    return param.reshape(1, groups).expand(batch, groups).reshape(-1, 1)


def _sum_over_batch(grad: Tensor, batch: int, like: Tensor) -> Tensor:
    """Gradient per (sample, group) [b*g, 1] -> the parameter's shape."""
    return grad.reshape(batch, -1).sum(0).view_as(like)


def _scores(xg: Tensor, h: int, w: int, query_index: Tensor, query: Tensor,
            context: Tensor, params: PRMParams,
            options: PRMOptions) -> _Scores:
    """S = alpha (q . x_p) D_p + beta (z . x_p) for every position."""
    n = xg.shape[0]
    batch = n // options.groups
    alpha = _per_instance(params.zero, batch, options.groups)  # [n, 1]
    beta = _per_instance(params.one, batch, options.groups)
    keys = torch.stack([query * alpha, context * beta], 2)  # [n, cg, 2]
    sims = torch.bmm(keys.transpose(1, 2), xg)  # [n, 2, P]
    sim_query, sim_context = sims[:, 0], sims[:, 1]
    if not options.use_position:
        return _Scores(sim_query + sim_context, sim_query, keys, None, None,
                       None, None, None)
    theta = params.theta.reshape(2)
    d_row, d_col = axis_distances(query_index, h, w,
                                  options.normalized_positions, xg.dtype)
    # the mean of the two Gaussians: the 1/2 goes into each table
    half_row = 0.5 * gaussian(theta[0] * d_row, params.scale)  # [n, h]
    half_col = 0.5 * gaussian(theta[1] * d_col, params.scale)  # [n, w]
    dist = (half_row[:, :, None] + half_col[:, None, :]).view(n, h * w)
    s = torch.addcmul(sim_context, sim_query, dist)  # [n, P]
    return _Scores(s, sim_query, keys, dist, d_row, d_col, half_row,
                   half_col)


def _gain(params: PRMParams, stats: Tensor, options: PRMOptions,
          batch: int) -> Tuple[Tensor, Tensor]:
    """lambda / (std + eps) per (sample, group), and 1 / (std + eps)."""
    lam = _per_instance(params.weight, batch, options.groups)
    if not options.use_norm:
        return lam, torch.ones_like(lam)
    inv = 1.0 / (stats[:, 1:] + options.eps)
    return lam * inv, inv


def _centered(s: Tensor, stats: Tensor, options: PRMOptions) -> Tensor:
    """S less its mean over the positions (the mean is 0 without the
    normalization). With the normalization and one position it is exactly
    0, as forward computes it (s - s): backward recomputes S from the
    normalized input, whose last bits can differ from forward's, and the
    gain 1 / (std + eps) (1e5 there) would magnify them into the gate and
    the gradients."""
    if options.use_norm and s.shape[1] == 1:
        return torch.zeros_like(s)
    return s - stats[:, :1]


def _gate(centered: Tensor, stats: Tensor, params: PRMParams,
          options: PRMOptions, batch: int) -> Tensor:
    gain, _ = _gain(params, stats, options, batch)
    xi = _per_instance(params.bias, batch, options.groups)
    return torch.addcmul(xi, centered, gain).sigmoid_()  # [n, P]


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _normalized_input(c: Tensor, norm: BatchNorm, save_mean, save_invstd):
    """BatchNorm's output recomputed from its input and the statistics its
    forward used (one per-channel affine)."""
    if norm.training:
        mean, invstd = save_mean, save_invstd
    else:
        mean = norm.running_mean
        invstd = torch.rsqrt(norm.running_var + norm.eps)
    a = invstd if norm.weight is None else invstd * norm.weight
    shift = -mean * a
    if norm.bias is not None:
        shift = shift + norm.bias
    return torch.addcmul(shift.view(1, -1, 1, 1), c, a.view(1, -1, 1, 1))


def forward(c: Tensor, norm: Optional[BatchNorm], identity: Optional[Tensor],
            relu: bool, params: PRMParams, options: PRMOptions,
            inplace: bool = False) -> Forward:
    dtype = _compute_dtype(c)
    with torch.autocast(c.device.type, enabled=False):
        params = PRMParams(*(p.to(dtype) for p in params))
        x, save_mean, save_invstd = c.to(dtype), None, None
        if norm is not None:
            x, save_mean, save_invstd = torch.native_batch_norm(
                x, _cast(norm.weight, dtype), _cast(norm.bias, dtype),
                norm.running_mean, norm.running_var, norm.training,
                norm.momentum, norm.eps)
            if not norm.training:
                save_mean = save_invstd = None
        b, ch, h, w = x.shape
        n, cg, num_positions = b * options.groups, ch // options.groups, h * w
        xg = x.reshape(n, cg, num_positions)  # [n, cg, P]
        query_index = xg.sum(1).argmax(1)  # [n], first maximum
        query = xg.gather(2, query_index.view(n, 1, 1).expand(n, cg, 1))[
            :, :, 0]  # [n, cg]
        context = xg.mean(2)  # [n, cg]
        sc = _scores(xg, h, w, query_index, query, context, params, options)
        if options.use_norm:
            # two passes (mean, then centred sum of squares): torch.var_mean
            # is several times slower on CPU
            mean = sc.s.mean(1, keepdim=True)
            centered = sc.s - mean
            var = torch.linalg.vecdot(centered, centered, dim=1)[:, None] / max(
                num_positions - 1, 1)  # unbiased; 0 for one position
            std = var.clamp_min(_TINY_VAR).sqrt()
            stats = torch.cat([mean, std], 1)  # [n, 2]
        else:
            stats = sc.s.new_zeros(n, 2)
            stats[:, 1] = 1.0
        gate = _gate(_centered(sc.s, stats, options), stats, params, options,
                     b)
        y = torch.empty(xg.shape, dtype=dtype, device=c.device)
        if identity is None:
            torch.mul(xg, gate[:, None, :], out=y)
        else:
            torch.addcmul(identity.to(dtype).reshape(n, cg, num_positions),
                          xg, gate[:, None, :], out=y)
        if relu:
            y.relu_()
        y = y.view(b, ch, h, w).to(c.dtype)
    return Forward(y, save_mean, save_invstd,
                   PRMState(query_index, query, context, stats))


def backward(grad_y: Tensor, saved: Saved, needs: Needs) -> Gradients:
    c, norm, options = saved.c, saved.norm, saved.options
    dtype = _compute_dtype(c)
    with torch.autocast(c.device.type, enabled=False):
        params = PRMParams(*(p.to(dtype) for p in saved.params))
        c_ = c.to(dtype)
        if norm is not None:
            norm = norm._replace(weight=_cast(norm.weight, dtype),
                                 bias=_cast(norm.bias, dtype))
            x = _normalized_input(c_, norm, saved.save_mean,
                                  saved.save_invstd)
        else:
            x = c_
        if saved.y is not None:  # the fused ReLU: y is its output
            grad_y = torch.ops.aten.threshold_backward(grad_y, saved.y, 0)
        grad_identity = grad_y if saved.has_identity else None
        grad_x, grad_params = _gate_backward(x, grad_y.to(dtype), saved.state,
                                             params, options)
        grad_bn_weight = grad_bn_bias = None
        if norm is not None:
            grad_x, grad_bn_weight, grad_bn_bias = \
                torch.ops.aten.native_batch_norm_backward(
                    grad_x, c_, norm.weight, norm.running_mean,
                    norm.running_var, saved.save_mean, saved.save_invstd,
                    norm.training, norm.eps, list(needs))
        grad_params = tuple(
            None if g is None else g.to(p.dtype)
            for g, p in zip(grad_params, saved.params))
    return Gradients(grad_x.to(c.dtype) if needs.c else None, grad_identity,
                     grad_bn_weight, grad_bn_bias, grad_params)


def _gate_backward(x: Tensor, gy: Tensor, state: PRMState, params: PRMParams,
                   options: PRMOptions):
    """Gradients of ``y = x * gate(x)`` given ``gy`` = dL/dy: grad_x and the
    six parameters' (None for theta and sigma without the position term).

    Two reductions give the gradients of lambda, xi and the normalization,
    one matmul the key gradients, and grad_x is
    ``gy * gate + keys @ coefficients`` plus one scatter at the query
    position.
    """
    b, c, h, w = x.shape
    groups = options.groups
    n, cg, num_positions = b * groups, c // groups, h * w
    xg = x.reshape(n, cg, num_positions)
    gy = gy.reshape(n, cg, num_positions)
    query, context = state.query.to(x.dtype), state.context.to(x.dtype)
    stats = state.stats.to(x.dtype)
    sc = _scores(xg, h, w, state.query_index, query, context, params,
                 options)
    centered = _centered(sc.s, stats, options)
    gate = _gate(centered, stats, params, options, b)
    gain, inv = _gain(params, stats, options, b)
    std = stats[:, 1:]

    # y = x * gate: the gate's gradient sums over the group's channels
    grad_gate = torch.linalg.vecdot(gy, xg, dim=1)  # [n, P]
    grad_pre = torch.ops.aten.sigmoid_backward(grad_gate, gate)
    sum_grad = grad_pre.sum(1, keepdim=True)  # [n, 1]
    # sum_p grad_pre * normalized_p
    grad_lam = inv * torch.linalg.vecdot(grad_pre, centered, dim=1)[:, None]
    if options.use_norm:
        # d/ds of lambda * (s - mean) / (std + eps):
        #   gain (g - mean(g)) + dstd (s - mean) / ((P-1) std)
        # with dstd = -gain * grad_lam
        std_term = torch.where(
            std > math.sqrt(_TINY_VAR),
            -gain * grad_lam / (max(num_positions - 1, 1) * std),
            torch.zeros_like(std))  # [n, 1]
        grad_s = torch.addcmul(-gain * sum_grad / num_positions, grad_pre,
                               gain)
        grad_s.addcmul_(centered, std_term)
        if num_positions == 1:  # the normalized value is constant 0
            grad_s.zero_()
    else:
        grad_s = grad_pre * gain
    grad_weight = _sum_over_batch(grad_lam, b, params.weight)
    grad_bias = _sum_over_batch(sum_grad, b, params.bias)

    # s = dist * sim_query + sim_context; the third coefficient row (ones)
    # carries the spatial mean's gradient into grad_x in the same matmul
    coeffs = grad_s.new_empty(n, 3, num_positions)
    grad_theta = grad_scale = None
    if options.use_position:
        torch.mul(grad_s, sc.dist, out=coeffs[:, 0])
        grad_dist = (grad_s * sc.sim_query).view(n, h, w)
        grad_half_row = grad_dist.sum(2)  # [n, h]
        grad_half_col = grad_dist.sum(1)  # [n, w]
        scale = params.scale
        theta = params.theta.reshape(2)
        t_row, t_col = theta[0] * sc.d_row, theta[1] * sc.d_col
        inv_var = 1.0 / (scale * scale)
        # G(t) = exp(-t^2 / 2 sigma^2) / (sigma sqrt(2 pi)):
        # dG/dt = -t / sigma^2 G,  dG/dsigma = G (t^2 / sigma^2 - 1) / sigma
        grad_t_row = -grad_half_row * sc.half_row * t_row * inv_var
        grad_t_col = -grad_half_col * sc.half_col * t_col * inv_var
        grad_theta = torch.stack([(grad_t_row * sc.d_row).sum(),
                                  (grad_t_col * sc.d_col).sum()
                                  ]).view_as(params.theta)
        grad_scale = ((grad_half_row * sc.half_row *
                       (t_row * t_row * inv_var - 1)).sum() +
                      (grad_half_col * sc.half_col *
                       (t_col * t_col * inv_var - 1)).sum()) / scale
        grad_scale = grad_scale.view_as(scale)
    else:
        coeffs[:, 0] = grad_s
    coeffs[:, 1] = grad_s
    coeffs[:, 2] = 1.0

    grad_keys = torch.bmm(xg, coeffs[:, :2].transpose(1, 2))  # [n, cg, 2]
    grad_key_query, grad_key_context = grad_keys.unbind(2)  # [n, cg]
    grad_alpha = (query * grad_key_query).sum(1, keepdim=True)  # [n, 1]
    grad_beta = (context * grad_key_context).sum(1, keepdim=True)
    grad_zero = _sum_over_batch(grad_alpha, b, params.zero)
    grad_one = _sum_over_batch(grad_beta, b, params.one)
    alpha = _per_instance(params.zero, b, groups)
    beta = _per_instance(params.one, b, groups)
    grad_query = grad_key_query * alpha  # [n, cg]
    grad_context = grad_key_context * beta

    all_keys = torch.cat([sc.keys, grad_context[:, :, None] / num_positions],
                         2)  # [n, cg, 3]
    grad_x = gy * gate[:, None, :]
    grad_x.baddbmm_(all_keys, coeffs)
    grad_x.scatter_add_(
        2, state.query_index.view(n, 1, 1).expand(n, cg, 1),
        grad_query[:, :, None])
    return grad_x.view(b, c, h, w), (grad_weight, grad_bias, grad_one,
                                     grad_zero, grad_theta, grad_scale)
