"""The PRM op: ``relu(prm(bn(c)) + identity)``, BatchNorm, shortcut and ReLU
each optional, on whichever backend :func:`~prm_det.ops.backends.select`
picks.

:func:`prm` is plain PRM (``x * gate(x)``), :func:`prm_block_tail` a
residual block's tail from its last convolution's output. Both run one
custom op, ``prm_det::block_tail`` (:mod:`.library`), whose autograd calls
``block_tail_backward``: the backend runs once each way and the same state
is saved for every backend (:class:`~prm_det.ops.contract.PRMState`).
``torch.compile`` traces the op; eager mode runs its implementation and
autograd on the named structures of :mod:`.contract` (the op's schema
takes scalars) through :class:`PRMFunction`; eager inference may write the
result over ``c``. Modes other than 'dotproduct', and exporting, take the
readable reference.
"""
import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends, library
from .contract import BatchNorm, Needs, PRMOptions, PRMParams, norm_tensors
from .reference import prm_reference_of


class PRMFunction(torch.autograd.Function):
    """Eager mode's route through the op: the registered op's
    implementation and autograd on the named structures
    (:func:`~prm_det.ops.library.block_tail_forward`,
    :func:`~prm_det.ops.library.save_for_backward`,
    :func:`~prm_det.ops.library.input_gradients`), without the dispatcher
    or the schema's scalars (see :mod:`.library` for the measured reason).
    Returns the op's outputs.

    Arguments: ``norm``, ``relu``, ``options``, ``backend``, then the
    tensors that take gradients, which autograd must see as arguments:
    ``c``, ``identity``, ``norm``'s weight and bias (the same tensors as in
    ``norm``) and PRM's six parameters.
    """

    @staticmethod
    def forward(ctx, norm: Optional[BatchNorm], relu: bool,
                options: PRMOptions, backend: str, c: Tensor,
                identity: Optional[Tensor], bn_weight: Optional[Tensor],
                bn_bias: Optional[Tensor], *params: Tensor):
        params = PRMParams(*params)
        output = library.block_tail_forward(c, identity, norm, relu, params,
                                            options, backend)
        library.save_for_backward(ctx, c, identity, norm, relu, params,
                                  options, backend, output)
        ctx.mark_non_differentiable(*output[1:])
        return output

    @staticmethod
    def backward(ctx, grad_y: Tensor, *unused_grads):
        needs = ctx.needs_input_grad
        grads = library.input_gradients(
            ctx, Needs(c=needs[4], bn_weight=needs[6], bn_bias=needs[7]),
            grad_y, library.block_tail_backward)
        return (None, None, None, None, grads.c, grads.identity,
                grads.bn_weight, grads.bn_bias, *grads.params)


def _run_block_tail(c: Tensor, identity: Optional[Tensor],
                    norm: Optional[BatchNorm], relu: bool, params: PRMParams,
                    options: PRMOptions, backend: str) -> tuple:
    """The op's outputs: traced as the custom op by torch.compile (the
    structures become the schema's scalars there), run on the structures
    through :class:`PRMFunction` in eager mode (its forward alone when no
    gradient is needed)."""
    bn_weight, bn_bias, running_mean, running_var = norm_tensors(norm)
    if torch.compiler.is_compiling():
        return torch.ops.prm_det.block_tail(
            c, identity, bn_weight, bn_bias, running_mean, running_var,
            *params, **library.block_tail_kwargs(norm, relu, options,
                                                 backend))
    if _needs_grad(c, identity, bn_weight, bn_bias, *params):
        return PRMFunction.apply(norm, relu, options, backend, c, identity,
                                 bn_weight, bn_bias, *params)
    return library.block_tail_forward(c, identity, norm, relu, params,
                                      options, backend)


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
        y = prm_reference_of(_as(c, dtype),
                             [_as(p, dtype) for p in params], options)
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
    name = backends.name_of(backend)
    if (inplace and not torch.compiler.is_compiling() and not _needs_grad(
            c, identity, *norm_tensors(norm), *params)):
        return library.block_tail_over_c(c, identity, norm, relu, params,
                                         options, name)
    y, _, _, running_mean, running_var, *_ = _run_block_tail(
        c, identity, norm, relu, params, options, name)
    if norm is not None and norm.training:  # as native_batch_norm would
        for buffer, updated in ((norm.running_mean, running_mean),
                                (norm.running_var, running_var)):
            if buffer is not None:
                buffer.copy_(updated.detach())
    return y


def prm(x: Tensor, params: PRMParams, options: PRMOptions) -> Tensor:
    """Plain PRM: ``x * gate(x)``, [b, C, h, w] in and out."""
    return prm_block_tail(x, params, options)
