"""Position-aware Recalibration Module (PRM): the tensor math, torch only.

Ma & Fu, "Position-Aware Recalibration Module: Learning From Feature Semantics
and Feature Position", IJCAI 2020. https://www.ijcai.org/proceedings/2020/111

For a feature map ``x`` of shape [b, c, h, w] split into ``groups`` contiguous
channel blocks, each group computes

    S = alpha * phi(x_p, q) * D_p + beta * phi(x_p, z)
    gate = sigmoid(lambda * N(S) + xi),  y = x * gate

where ``q`` is the group's feature vector at the argmax of its channel sum,
``z`` its spatial mean, ``D`` the mean of two 1-D Gaussians of the row and
column distance to the query position, and ``N`` the normalization over the
positions with the unbiased standard deviation. With default options this is
exactly what the official code computes (see ../shared/docs/PRM_SPEC.md), minus
its faults: no device sync, no ``nonzero``, no distribution objects per call,
no full-size copy of the gate, and a defined result for 1x1 maps.

Two implementations live here:

* :func:`prm_reference`: the straightforward autograd composition, written to
  be read. Every mode and option. Tests check the fast path against it.
* the fast path for the 'dotproduct' similarity (the paper's default and what
  every config uses): :func:`_gate_forward` / :func:`_gate_backward` with the
  backward written by hand, wrapped in two autograd Functions:
  :class:`_PRMDotProduct` (``x`` in; optionally also the residual add and
  ReLU) and :class:`_BatchNormPRM` (a residual block's whole tail from the
  last conv's output, recomputing the normalized map in backward instead of
  keeping it). Only [b*g, h*w]-sized state is kept besides ``x`` or ``c``.

:func:`prm` picks between them; :func:`batchnorm_prm_residual` is the block
tail. Nothing in this file imports mmcv or mmdet.
"""
import math
from types import SimpleNamespace
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from prm_det.ops import cpu_kernel

from prm_det.ops.reference import (  # noqa: F401
    _INV_SQRT_2PI, _TINY_VAR, COSINE_EPS, MODES, NORM_EPS, axis_distances,
    gaussian, position_weight, prm_reference)


def _per_instance(param: Tensor, batch: int, groups: int) -> Tensor:
    """A per-group parameter as one value per (sample, group): [b*g, 1]."""
    return param.reshape(1, groups).expand(batch, groups).reshape(-1, 1)


def _sum_over_batch(grad: Tensor, batch: int, like: Tensor) -> Tensor:
    """Gradient per (sample, group) [b*g, 1] -> the parameter's shape."""
    return grad.reshape(batch, -1).sum(0).view_as(like)


def _gate_forward(x, weight, bias, one, zero, theta, scale, groups,
                  use_position, use_norm, normalized_positions, eps):
    """PRM's gate for dot-product similarity, [b*g, h*w], and what its
    backward needs (small tensors only: nothing of the feature map's size).

    The same function as :func:`prm_reference`, arranged for few passes:
    alpha and beta scale the two keys (q, z) before one batched matmul, so
    ``s = D * (alpha q . x_p) + (beta z . x_p)`` is one fused op; the
    normalization and the affine become one per-instance gain on the centred
    ``s``; the Gaussian position weight is built from [n, h] and [n, w]
    tables. Passes over x: channel sum, spatial mean, one matmul.
    """
    b, c, h, w = x.shape
    n, cg, num_positions = b * groups, c // groups, h * w
    xg = x.view(n, cg, num_positions)  # [n, cg, P]
    query_index = xg.sum(1).argmax(1)  # [n]
    query = xg.gather(2, query_index.view(n, 1, 1).expand(n, cg, 1))
    context = xg.mean(2, keepdim=True)  # [n, cg, 1]
    st = SimpleNamespace(
        shape=(b, c, h, w), groups=groups, use_position=use_position,
        use_norm=use_norm, query_index=query_index, query=query,
        context=context, theta=theta, scale=scale,
        alpha=_per_instance(zero, b, groups),  # [n, 1]
        beta=_per_instance(one, b, groups),
        lam=_per_instance(weight, b, groups))
    xi = _per_instance(bias, b, groups)
    st.keys = torch.cat([query * st.alpha[:, :, None],
                         context * st.beta[:, :, None]], 2)  # [n, cg, 2]
    sims = torch.bmm(st.keys.transpose(1, 2), xg)  # [n, 2, P]
    sim_query, sim_context = sims[:, 0], sims[:, 1]  # alpha q.x, beta z.x
    st.sim_query = sim_query

    if use_position:
        theta2 = theta.reshape(2)
        st.d_row, st.d_col = axis_distances(query_index, h, w,
                                            normalized_positions, x.dtype)
        st.t_row, st.t_col = theta2[0] * st.d_row, theta2[1] * st.d_col
        # the mean of the two Gaussians: the 1/2 goes into each table
        st.half_row = 0.5 * gaussian(st.t_row, scale)  # [n, h]
        st.half_col = 0.5 * gaussian(st.t_col, scale)  # [n, w]
        st.dist = (st.half_row[:, :, None] + st.half_col[:, None, :]).view(
            n, num_positions)  # [n, P]
        s = torch.addcmul(sim_context, sim_query, st.dist)  # [n, P]
    else:
        s = sim_query + sim_context

    if use_norm:
        # two passes (mean, then centred sum of squares) rather than
        # torch.var_mean, which is several times slower on CPU here
        centered = s - s.mean(1, keepdim=True)
        var = torch.linalg.vecdot(centered, centered, dim=1)[:, None] / max(
            num_positions - 1, 1)  # unbiased; 0 for one position
        st.std = var.clamp_min(_TINY_VAR).sqrt()  # [n, 1]
        st.inv = 1.0 / (st.std + eps)
        gain = st.lam * st.inv
    else:
        gain, centered = st.lam, s
    st.centered = centered
    gate = torch.addcmul(xi, centered, gain).sigmoid_()  # [n, P]
    return gate, st


def _apply_gate(x, gate, identity, relu, groups):
    """``x * gate`` (+ identity, then ReLU): one pass, into a fresh tensor
    (not a view: a residual block may add to it in place)."""
    b, c, h, w = x.shape
    n, cg, num_positions = b * groups, c // groups, h * w
    y = torch.empty_like(x)
    y_groups = y.view(n, cg, num_positions)
    xg = x.view(n, cg, num_positions)
    if identity is None:
        torch.mul(xg, gate[:, None, :], out=y_groups)
    else:
        torch.addcmul(identity.reshape(n, cg, num_positions), xg,
                      gate[:, None, :], out=y_groups)
    if relu:
        y.relu_()
    return y


def _gate_backward(x, gy, gate, st):
    """Gradients of ``y = x * gate(x)`` given ``gy`` = dL/dy: grad_x and the
    PRM parameters' (weight, bias, one, zero, theta, scale).

    Two reductions give the gradients of lambda, xi and the normalization,
    one matmul the key gradients, and grad_x is
    ``gy * gate + keys @ coefficients`` plus one scatter at the query
    position. Passes over the map: 3 reads for the gate and key gradients,
    1 read + 1 write for ``gy * gate``, 1 read + 1 write for the matmul add.
    """
    b, c, h, w = st.shape
    groups = st.groups
    n, cg, num_positions = b * groups, c // groups, h * w
    xg = x.view(n, cg, num_positions)
    gy = gy.reshape(n, cg, num_positions)
    lam, centered = st.lam, st.centered

    # y = x * gate: the gate's gradient sums over the group's channels
    grad_gate = torch.linalg.vecdot(gy, xg, dim=1)  # [n, P]
    grad_pre = torch.ops.aten.sigmoid_backward(grad_gate, gate)
    sum_grad = grad_pre.sum(1, keepdim=True)  # [n, 1]
    if st.use_norm:
        # sum_p grad_pre * normalized_p
        grad_lam = st.inv * torch.linalg.vecdot(grad_pre, centered,
                                                dim=1)[:, None]
        # d/ds of lambda * (s - mean) / (std + eps):
        #   lambda*inv*(g - mean(g)) + dstd * (s - mean) / ((P-1) std)
        # with dstd = -lambda * inv * grad_lam
        gain = lam * st.inv
        std_term = torch.where(
            st.std > math.sqrt(_TINY_VAR),
            -gain * grad_lam / (max(num_positions - 1, 1) * st.std),
            torch.zeros_like(st.std))  # [n, 1]
        grad_s = torch.addcmul(-gain * sum_grad / num_positions, grad_pre,
                               gain)
        grad_s.addcmul_(centered, std_term)
        if num_positions == 1:  # the normalized value is constant 0
            grad_s.zero_()
    else:
        grad_lam = torch.linalg.vecdot(grad_pre, centered, dim=1)[:, None]
        grad_s = grad_pre * lam
    grad_weight = _sum_over_batch(grad_lam, b, lam.new_empty(1, groups, 1, 1))
    grad_bias = _sum_over_batch(sum_grad, b, grad_weight)

    # s = dist * sim_query + sim_context; the third coefficient row (ones)
    # carries the spatial mean's gradient into grad_x in the same matmul
    coeffs = grad_s.new_empty(n, 3, num_positions)
    grad_theta = grad_scale = None
    if st.use_position:
        torch.mul(grad_s, st.dist, out=coeffs[:, 0])
        grad_dist = (grad_s * st.sim_query).view(n, h, w)
        grad_half_row = grad_dist.sum(2)  # [n, h]
        grad_half_col = grad_dist.sum(1)  # [n, w]
        scale = st.scale
        inv_var = 1.0 / (scale * scale)
        # G(t) = exp(-t^2 / 2 sigma^2) / (sigma sqrt(2 pi)):
        # dG/dt = -t / sigma^2 G,  dG/dsigma = G (t^2 / sigma^2 - 1) / sigma
        grad_t_row = -grad_half_row * st.half_row * st.t_row * inv_var
        grad_t_col = -grad_half_col * st.half_col * st.t_col * inv_var
        grad_theta = torch.stack([(grad_t_row * st.d_row).sum(),
                                  (grad_t_col * st.d_col).sum()
                                  ]).view_as(st.theta)
        grad_scale = ((grad_half_row * st.half_row *
                       (st.t_row * st.t_row * inv_var - 1)).sum() +
                      (grad_half_col * st.half_col *
                       (st.t_col * st.t_col * inv_var - 1)).sum()) / scale
        grad_scale = grad_scale.view_as(scale)
    else:
        coeffs[:, 0] = grad_s
    coeffs[:, 1] = grad_s
    coeffs[:, 2] = 1.0

    grad_keys = torch.bmm(xg, coeffs[:, :2].transpose(1, 2))  # [n, cg, 2]
    grad_key_query, grad_key_context = grad_keys.split(1, 2)  # [n, cg, 1]
    grad_alpha = (st.query * grad_key_query).sum(1)  # [n, 1]
    grad_beta = (st.context * grad_key_context).sum(1)
    grad_zero = _sum_over_batch(grad_alpha, b,
                                lam.new_empty(1, groups, 1))
    grad_one = _sum_over_batch(grad_beta, b, grad_zero)
    grad_query = grad_key_query * st.alpha[:, :, None]  # [n, cg, 1]
    grad_context = grad_key_context * st.beta[:, :, None]

    all_keys = torch.cat([st.keys, grad_context / num_positions], 2)
    grad_x = gy * gate[:, None, :]
    grad_x.baddbmm_(all_keys, coeffs)
    grad_x.scatter_add_(
        2, st.query_index.view(n, 1, 1).expand(n, cg, 1), grad_query)
    return (grad_x.view(b, c, h, w), grad_weight, grad_bias, grad_one,
            grad_zero, grad_theta, grad_scale)


def _no_position_grads(grads, use_position):
    """Without the position term theta and sigma take no part: no gradient
    (None, as autograd gives the reference)."""
    if not use_position:
        grads[4] = grads[5] = None
    return grads


class _PRMDotProduct(torch.autograd.Function):
    """PRM with dot-product similarity, forward and backward by hand:
    ``y = x * gate`` (+ identity, + ReLU: a residual block's tail in the same
    pass). Saves x, the output when it applies the ReLU, and the gate's small
    state; no full-size intermediates.

    On CPU it runs the compiled kernel (:mod:`prm_det.ops.cpu_kernel`: one
    op each way, keeping per (sample, group) only the query index, query and
    context vectors and S's mean and std), elsewhere (or where the kernel
    cannot be built) torch ops.
    """

    @staticmethod
    def forward(ctx, x, identity, weight, bias, one, zero, theta, scale,
                groups, use_position, use_norm, normalized_positions, eps,
                relu):
        params = (weight, bias, one, zero, theta, scale)
        ctx.options = (groups, use_position, use_norm, normalized_positions,
                       eps)
        ctx.has_identity, ctx.relu = identity is not None, relu
        ctx.use_kernel = cpu_kernel.use_kernel(x)
        if ctx.use_kernel:
            y, *prm_saved = cpu_kernel.ops().prm_forward(
                x, identity, relu, *params, *ctx.options)
        else:
            gate, ctx.state = _gate_forward(x, *params, *ctx.options)
            y = _apply_gate(x, gate, identity, relu, groups)
            prm_saved = [gate]
        ctx.save_for_backward(x, y if relu else None, *params, *prm_saved)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        with torch.autocast(grad_y.device.type, enabled=False):
            x, y, *rest = ctx.saved_tensors
            params, prm_saved = rest[:6], rest[6:]
            if ctx.use_kernel:
                grad_x, masked, *grads = cpu_kernel.ops().prm_backward(
                    grad_y.contiguous(), y, x, *prm_saved, *params,
                    *ctx.options)
                grad_y = masked if ctx.relu else grad_y
            else:
                if ctx.relu:  # the block's ReLU, fused: y is its output
                    grad_y = torch.ops.aten.threshold_backward(grad_y, y, 0)
                grad_x, *grads = _gate_backward(x, grad_y, prm_saved[0],
                                                ctx.state)
            # the shortcut's gradient is the block output's, unchanged
            grad_identity = grad_y if ctx.has_identity else None
            grads = _no_position_grads(grads, ctx.options[1])
            return (grad_x, grad_identity, *grads, None, None, None, None,
                    None, None)


class _BatchNormPRM(torch.autograd.Function):
    """``relu(PRM(BatchNorm(c)) + identity)``: a residual block's tail from
    the last convolution's output ``c``, without keeping the normalized map.

    A plain block keeps ``c`` for BatchNorm's backward; PRM would also keep
    the normalized ``x`` (its input) for its own. Here ``x`` is recomputed
    from ``c`` in backward (one per-channel affine), so the block keeps what
    a plain ResNet block keeps, plus PRM's small state.

    On CPU the compiled kernel does the whole tail each way: forward takes
    the batch statistics (and updates the running ones as
    ``native_batch_norm`` does), then applies BatchNorm as PRM's passes read
    ``c``, so the normalized map is never written; backward fuses
    BatchNorm's backward (its per-channel sums of PRM's dL/dx are taken as
    the rows are made, so that map is never stored). Elsewhere: torch's
    ``native_batch_norm``, torch ops and ``native_batch_norm_backward``.
    """

    @staticmethod
    def forward(ctx, c, bn_weight, bn_bias, running_mean, running_var,
                bn_training, bn_momentum, bn_eps, identity, weight, bias, one,
                zero, theta, scale, groups, use_position, use_norm,
                normalized_positions, eps, relu):
        params = (weight, bias, one, zero, theta, scale)
        ctx.options = (groups, use_position, use_norm, normalized_positions,
                       eps)
        ctx.bn = (bn_training, bn_eps)
        ctx.has_identity, ctx.relu = identity is not None, relu
        ctx.use_kernel = cpu_kernel.use_kernel(c)
        if ctx.use_kernel:
            y, save_mean, save_invstd, *prm_saved = \
                cpu_kernel.ops().bn_prm_forward(
                    c, bn_weight, bn_bias, running_mean, running_var,
                    bn_training, bn_momentum, bn_eps, identity, relu,
                    *params, *ctx.options)
        else:
            x, save_mean, save_invstd = torch.native_batch_norm(
                c, bn_weight, bn_bias, running_mean, running_var,
                bn_training, bn_momentum, bn_eps)
            gate, ctx.state = _gate_forward(x, *params, *ctx.options)
            y = _apply_gate(x, gate, identity, relu, groups)
            prm_saved = [gate]
        # training: backward uses the batch statistics only, and the running
        # ones may be updated again before it runs (another forward)
        keep = not bn_training
        ctx.save_for_backward(c, bn_weight, bn_bias,
                              running_mean if keep else None,
                              running_var if keep else None, save_mean,
                              save_invstd, y if relu else None, *params,
                              *prm_saved)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        with torch.autocast(grad_y.device.type, enabled=False):
            (c, bn_weight, bn_bias, running_mean, running_var, save_mean,
             save_invstd, y, *rest) = ctx.saved_tensors
            params, prm_saved = rest[:6], rest[6:]
            bn_training, bn_eps = ctx.bn
            mask = [ctx.needs_input_grad[0],
                    bn_weight is not None and ctx.needs_input_grad[1],
                    bn_bias is not None and ctx.needs_input_grad[2]]
            if ctx.use_kernel:
                (grad_c, grad_bn_weight, grad_bn_bias, masked,
                 *grads) = cpu_kernel.ops().bn_prm_backward(
                     grad_y.contiguous(), y, c, bn_weight, bn_bias,
                     running_mean, running_var, save_mean, save_invstd,
                     bn_training, bn_eps, *prm_saved, *params, *ctx.options,
                     *mask)
                grad_c, grad_bn_weight, grad_bn_bias = (
                    g if m else None
                    for g, m in zip((grad_c, grad_bn_weight, grad_bn_bias),
                                    mask))
                grad_y = masked if ctx.relu else grad_y
            else:
                # x = c * a + b per channel, with the statistics forward used
                if bn_training:
                    mean, invstd = save_mean, save_invstd
                else:
                    mean = running_mean
                    invstd = torch.rsqrt(running_var + bn_eps)
                a = invstd if bn_weight is None else invstd * bn_weight
                shift = -mean * a
                if bn_bias is not None:
                    shift = shift + bn_bias
                x = torch.addcmul(shift.view(1, -1, 1, 1), c,
                                  a.view(1, -1, 1, 1))
                if ctx.relu:
                    grad_y = torch.ops.aten.threshold_backward(grad_y, y, 0)
                grad_x, *grads = _gate_backward(x, grad_y, prm_saved[0],
                                                ctx.state)
                del x
                grad_c, grad_bn_weight, grad_bn_bias = \
                    torch.ops.aten.native_batch_norm_backward(
                        grad_x, c, bn_weight, running_mean, running_var,
                        save_mean, save_invstd, bn_training, bn_eps, mask)
            grad_identity = grad_y if ctx.has_identity else None
            grads = _no_position_grads(grads, ctx.options[1])
            return (grad_c, grad_bn_weight, grad_bn_bias, None, None, None,
                    None, None, grad_identity, *grads, None, None, None,
                    None, None, None)


def batchnorm_prm_residual(c: Tensor, norm: torch.nn.Module,
                           identity: Tensor, weight: Tensor, bias: Tensor,
                           one: Tensor, zero: Tensor, theta: Tensor,
                           scale: Tensor, groups: int,
                           use_position: bool = True, use_norm: bool = True,
                           normalized_positions: bool = False,
                           eps: float = NORM_EPS,
                           reuse_c: bool = False) -> Tensor:
    """``relu(prm(norm(c)) + identity)`` for an ``nn.BatchNorm2d`` ``norm``,
    keeping no normalized copy of ``c`` for backward (see
    :class:`_BatchNormPRM`). Updates ``norm``'s running statistics exactly
    as ``norm(c)`` would.

    ``reuse_c`` says that ``c`` is scratch: a convolution's fresh output
    that nothing else holds. Inference on the CPU kernel (no gradient,
    BatchNorm in eval) then writes the result over ``c`` instead of a new
    map, as mmdet's own blocks add the shortcut over their norm's output."""
    use_batch_stats = norm.training or norm.running_mean is None
    if use_batch_stats and c.numel() <= c.shape[1]:
        # as nn.BatchNorm2d (F.batch_norm) refuses it
        raise ValueError(
            f'Expected more than 1 value per channel when training, got '
            f'input size {tuple(c.shape)}: use a batch of more than one '
            f'sample or a larger map, or put the norm in eval mode')
    # the bookkeeping of torch's _BatchNorm.forward
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and \
            norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:
            factor = 1.0 / float(norm.num_batches_tracked)
    keep_running = not norm.training or norm.track_running_stats
    args = (c.contiguous(), norm.weight, norm.bias,
            norm.running_mean if keep_running else None,
            norm.running_var if keep_running else None, use_batch_stats,
            factor, norm.eps, identity.contiguous(), weight, bias, one, zero,
            theta, scale, groups, use_position, use_norm,
            normalized_positions, eps, True)
    params, options = args[9:15], args[15:20]
    if not _needs_grad(c, identity, norm.weight, norm.bias, *params) and \
            cpu_kernel.use_kernel(c):
        # inference: the kernel's op alone, no autograd bookkeeping
        if not use_batch_stats:
            # args[0] is c or a contiguous copy of it: scratch either way
            y = batchnorm_prm_eval(args[0], norm, args[8], params, options,
                                   reuse_c or args[0] is not c)
            if y is not None:
                return y
        return cpu_kernel.ops().bn_prm_forward(*args[:9], True, *params,
                                               *options)[0]
    return _BatchNormPRM.apply(*args)


def batchnorm_prm_eval(c: Tensor, norm: torch.nn.Module, identity: Tensor,
                       params: tuple, options: tuple,
                       reuse_c: bool = False) -> Optional[Tensor]:
    """Inference on the CPU kernel: ``relu(prm(norm(c)) + identity)`` with
    the ``nn.BatchNorm2d`` ``norm`` in eval mode, or None where the kernel
    does not take it (BatchNorm in training or without running statistics,
    maps that are not contiguous CPU float32/float64 ones of one shape and
    dtype, no kernel); the caller then takes the general path. No gradient
    may be needed (the caller checks).

    ``params`` are PRM's six parameters and ``options`` (groups,
    use_position, use_norm, normalized_positions, eps), in the order of
    :func:`prm`. With ``reuse_c`` the result is written over ``c`` (a
    convolution's fresh output) unless ``identity`` overlaps it.

    A residual block calls this once per forward, right after a convolution
    has swept the caches, where every Python step and op argument costs
    microseconds (measured in a ResNet-50 forward: about 115 us of checks
    and lookups per block, against ~15 us in a loop of the same calls): so
    this reads the norm's tensors from its ``_parameters`` and ``_buffers``
    (not through nn.Module's attribute lookup) and checks only what the
    kernel needs.
    """
    if norm.training:
        return None
    buffers = norm._buffers
    running_mean, running_var = buffers['running_mean'], buffers['running_var']
    if running_mean is None or running_var is None:
        return None  # track_running_stats=False: batch statistics
    dtype = c.dtype
    if not (c.is_cpu and dtype in cpu_kernel.DTYPES and identity.dtype == dtype
            and identity.is_cpu and identity.shape == c.shape
            and c.is_contiguous() and identity.is_contiguous()
            and cpu_kernel.available()):
        return None
    norm_params = norm._parameters
    weight, bias = norm_params['weight'], norm_params['bias']
    if reuse_c and abs(c.data_ptr() - identity.data_ptr()) >= c.nbytes:
        return cpu_kernel.ops().bn_prm_eval_(c, weight, bias, running_mean,
                                             running_var, norm.eps, identity,
                                             True, *params, *options)
    return cpu_kernel.ops().bn_prm_forward(c, weight, bias, running_mean,
                                           running_var, False, 0.0, norm.eps,
                                           identity, True, *params,
                                           *options)[0]


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)


def prm(x: Tensor,
        weight: Tensor,
        bias: Tensor,
        one: Tensor,
        zero: Tensor,
        theta: Tensor,
        scale: Tensor,
        groups: int,
        mode: str = 'dotproduct',
        use_position: bool = True,
        use_norm: bool = True,
        normalized_positions: bool = False,
        eps: float = NORM_EPS,
        reference: bool = False,
        identity: Optional[Tensor] = None,
        relu: bool = False) -> Tensor:
    """PRM forward: the fast path for 'dotproduct', the reference otherwise
    (or when ``reference`` is set: for comparisons and benchmarks).

    With ``identity`` (and ``relu``) it returns ``relu(prm(x) + identity)``,
    a residual block's output: the fast path does the add and the ReLU in
    the gating pass.

    Half-precision inputs (autocast) are computed in float32 and returned in
    their own dtype: dot products of realistic activations overflow float16.
    """
    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    in_dtype = x.dtype
    compute_dtype = torch.promote_types(in_dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        x = x.to(compute_dtype)
        params = [
            p.to(compute_dtype)
            for p in (weight, bias, one, zero, theta, scale)
        ]
        if identity is not None:
            identity = identity.to(compute_dtype)
        if mode == 'dotproduct' and not reference:
            x = x.contiguous()
            if identity is not None:
                identity = identity.contiguous()
            options = (groups, use_position, use_norm, normalized_positions,
                       eps)
            if not _needs_grad(x, identity, *params) and \
                    cpu_kernel.use_kernel(x):
                y = cpu_kernel.ops().prm_forward(x, identity, relu, *params,
                                                 *options)[0]
            else:
                y = _PRMDotProduct.apply(x, identity, *params, *options,
                                         relu)
        else:
            y = prm_reference(x, *params, groups, mode, use_position,
                              use_norm, normalized_positions, eps)
            if identity is not None:
                y = y + identity
            if relu:
                y = torch.relu(y)
    return y.to(in_dtype)
