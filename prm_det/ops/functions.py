"""The PRM op: ``relu(prm(bn(c)) + identity)``, BatchNorm, shortcut and ReLU
each optional, on whichever backend :func:`~prm_det.ops.backends.select`
picks.

:func:`prm` is plain PRM (``x * gate(x)``), :func:`prm_block_tail` a
residual block's tail from its last convolution's output. Both go through
one autograd Function, :class:`PRMFunction`, whose forward and backward call
the backend once each and save the same state for every backend
(:class:`~prm_det.ops.contract.PRMState`) through ``save_for_backward``.
Without a gradient to take, the backend's forward runs alone (no autograd
bookkeeping; in inference the result may go over ``c``). Modes other than
'dotproduct', and exporting, take the readable reference.
"""
import contextlib
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends
from .contract import (BatchNorm, Needs, PRMOptions, PRMParams, PRMState,
                       Saved)
from .reference import prm_reference


class _Call(NamedTuple):
    """The op's non-tensor arguments."""
    backend: object
    options: PRMOptions
    norm: Optional[BatchNorm]
    relu: bool


class PRMFunction(torch.autograd.Function):
    """``relu(prm(bn(c)) + identity)`` with a hand-written backward.

    Saves ``c``, the output when the ReLU is fused (its mask), BatchNorm's
    tensors and batch statistics, PRM's parameters and its small state:
    nothing else of the map's size, so a PRM block keeps for backward what
    a plain block keeps.
    """

    @staticmethod
    def forward(ctx, call: _Call, c: Tensor, identity: Optional[Tensor],
                bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                *params: Tensor) -> Tensor:
        params = PRMParams(*params)
        norm = call.norm
        if norm is not None:
            norm = norm._replace(weight=bn_weight, bias=bn_bias)
        out = call.backend.forward(c, norm, identity, call.relu, params,
                                   call.options)
        ctx.call = call
        ctx.has_identity = identity is not None
        # in training the running statistics may change before backward
        # (another forward), which uses the batch statistics only
        keep_running = norm is not None and not norm.training
        ctx.save_for_backward(
            c, out.y if call.relu else None, bn_weight, bn_bias,
            norm.running_mean if keep_running else None,
            norm.running_var if keep_running else None, out.save_mean,
            out.save_invstd, *params, *out.state)
        return out.y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        (c, y, bn_weight, bn_bias, running_mean, running_var, save_mean,
         save_invstd, *rest) = ctx.saved_tensors
        call = ctx.call
        norm = call.norm
        if norm is not None:
            norm = norm._replace(weight=bn_weight, bias=bn_bias,
                                 running_mean=running_mean,
                                 running_var=running_var)
        saved = Saved(c, y, norm, save_mean, save_invstd,
                      PRMParams(*rest[:6]), PRMState(*rest[6:]),
                      call.options, ctx.has_identity)
        needs = ctx.needs_input_grad
        grads = call.backend.backward(
            grad_y, saved,
            Needs(needs[1], bn_weight is not None and needs[3],
                  bn_bias is not None and needs[4]))
        param_grads = list(grads.params)
        if not call.options.use_position:  # theta and sigma take no part
            param_grads[4] = param_grads[5] = None
        return (None, grads.c, grads.identity, grads.bn_weight,
                grads.bn_bias, *param_grads)


def check_batch_statistics(c: Tensor, training: bool) -> None:
    """As nn.BatchNorm2d (F.batch_norm): batch statistics of one value per
    channel are refused (an empty batch is not: it normalizes nothing)."""
    if training and c.numel() == c.shape[1] > 0:
        raise ValueError(
            f'Expected more than 1 value per channel when training, got '
            f'input size {tuple(c.shape)}: use a batch of more than one '
            f'sample or a larger map, or put the norm in eval mode')


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` where the dtype differs (a trace records even a
    conversion to the same dtype)."""
    return t if t.dtype == dtype else t.to(dtype)


def _reference(c, norm, identity, relu, params, options):
    """The op from the readable parts (autograd throughout)."""
    if norm is not None:
        c = F.batch_norm(c, norm.running_mean, norm.running_var, norm.weight,
                         norm.bias, norm.training, norm.momentum, norm.eps)
    in_dtype = c.dtype
    dtype = torch.promote_types(in_dtype, torch.float32)
    # only where autocast is on: torch.export would record the switch as a
    # higher-order op around the whole composition
    no_autocast = (torch.autocast(c.device.type, enabled=False)
                   if torch.is_autocast_enabled(c.device.type) else
                   contextlib.nullcontext())
    with no_autocast:
        y = prm_reference(_as(c, dtype), *(_as(p, dtype) for p in params),
                          groups=options.groups, mode=options.mode,
                          use_position=options.use_position,
                          use_norm=options.use_norm,
                          normalized_positions=options.normalized_positions,
                          eps=options.eps)
    y = _as(y, in_dtype)
    if identity is not None:
        y = y + identity
    return torch.relu(y) if relu else y


def prm_block_tail(c: Tensor,
                   params: PRMParams,
                   options: PRMOptions,
                   identity: Optional[Tensor] = None,
                   norm: Optional[BatchNorm] = None,
                   relu: bool = False,
                   inplace: bool = False) -> Tensor:
    """``relu(prm(norm(c)) + identity)``, each of ``norm``, ``identity`` and
    ``relu`` optional.

    Args:
        c (Tensor): [b, C, h, w], the last convolution's output (or PRM's
            input, without ``norm``).
        params (PRMParams): PRM's parameters.
        options (PRMOptions): PRM's settings.
        identity (Tensor, optional): the shortcut, c's shape.
        norm (BatchNorm, optional): a BatchNorm2d's tensors and settings;
            its running statistics are updated as the module would.
        relu (bool): apply the block's ReLU.
        inplace (bool): ``c`` is scratch (a convolution's fresh output that
            nothing else holds): in inference the result may be written
            over it.
    """
    # (a trace holds sizes as tensors: comparing them would bake the traced
    # sizes into the graph, with a TracerWarning; the add checks them)
    if (identity is not None and not torch.jit.is_tracing()
            and identity.shape != c.shape):
        raise ValueError(f'PRM: the shortcut {tuple(identity.shape)} does '
                         f'not match the map {tuple(c.shape)}')
    if norm is not None:
        check_batch_statistics(c, norm.training)
    backend = backends.select(c, options)
    if backend is None or c.numel() == 0:  # an empty batch: nothing to fuse
        return _reference(c, norm, identity, relu, params, options)
    if identity is not None and identity.dtype != c.dtype:
        identity = identity.to(c.dtype)  # autocast: the map's dtype wins
    bn_weight = bn_bias = None
    if norm is not None:
        bn_weight, bn_bias = norm.weight, norm.bias
    if not _needs_grad(c, identity, bn_weight, bn_bias, *params):
        return backend.forward(c, norm, identity, relu, params, options,
                               inplace).y
    return PRMFunction.apply(_Call(backend, options, norm, relu), c,
                             identity, bn_weight, bn_bias, *params)


def prm(x: Tensor, params: PRMParams, options: PRMOptions) -> Tensor:
    """Plain PRM: ``x * gate(x)``, [b, C, h, w] in and out."""
    return prm_block_tail(x, params, options)
