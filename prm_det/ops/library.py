"""PRM's block tail as PyTorch custom ops (``torch.library``), so that
``torch.compile`` (``fullgraph=True``, dynamic sizes) and CUDA graphs see
one op with known outputs instead of Python they cannot follow (exporting,
``torch.export`` included, takes the readable reference composition: the
standard ops other runtimes read).

Two ops in the ``prm_det`` namespace (beside the CPU kernel's own):

- ``prm_det::block_tail``: ``relu(prm(bn(c)) + identity)`` and the state
  backward needs. It is functional (torch.library registers autograd only
  for ops that mutate nothing): in training it returns the updated running
  statistics, which :func:`prm_det.ops.prm_block_tail` copies into the
  module's buffers, a mutation the compiler sees. Its autograd is
  registered here and calls
- ``prm_det::block_tail_backward``: every input gradient in one call.

Each takes the backend by name (``cpu``, ``triton``, ``torch``), chosen
before the call by :func:`prm_det.ops.backends.select`, so the op runs what
eager mode runs. A fake implementation of each allocates what the real one
returns: outputs of the map's size in ``c``'s memory format (contiguous or
channels_last; :func:`memory_format_of`), PRM's state and BatchNorm's batch
statistics in the accumulation dtype (float32 for half maps, otherwise the
map's; S's mean and std in double on the CPU kernel), an empty tensor
where a result is not asked for or not defined (the schema has no optional
outputs).

The ops' tensors are positional, their settings keyword-only and named;
:func:`forward_kwargs` builds them from the named structures of
:mod:`.contract`.

Eager mode calls the implementations directly (``*_impl``) with the same
autograd (:func:`setup_context`, :func:`input_gradients`) in
:class:`prm_det.ops.functions.PRMFunction`: a Python custom op costs a
dispatch per call, and with autograd registered ~1 ms more per training
call on CPU (torch rebuilds the 23-argument schema's argument list for
every argument it fills in), 2-3% of a CPU training step of a ResNet-50
(16 calls each way). ``torch.compile`` traces the ops.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import backends
from .contract import (BatchNorm, Gradients, Needs, PRMOptions, PRMParams,
                       PRMState, Saved)

_RUNNING = ('running_mean', 'running_var')
# the ops' outputs: a fixed number of tensors (autograd takes one gradient
# per output)
_ForwardOutputs = Tuple[(Tensor, ) * 9]
_BackwardOutputs = Tuple[(Tensor, ) * 10]


def memory_format_of(c: Tensor) -> torch.memory_format:
    """The layout of the op's map-sized outputs: channels_last for a
    channels_last map, contiguous for anything else."""
    if not c.is_contiguous() and c.is_contiguous(
            memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def accumulation_dtype(c: Tensor) -> torch.dtype:
    """The dtype of PRM's query and context vectors and BatchNorm's batch
    statistics."""
    return torch.promote_types(c.dtype, torch.float32)


def stats_dtype(c: Tensor, backend: str) -> torch.dtype:
    """The dtype of S's mean and std: the CPU kernel sums S in double and
    keeps them so."""
    return torch.float64 if backend == 'cpu' else accumulation_dtype(c)


def _in_format(t: Tensor, c: Tensor) -> Tensor:
    return t.contiguous(memory_format=memory_format_of(c))


def _own(t: Tensor) -> Tensor:
    """``t`` with storage of its own: small outputs a backend returned as
    views of one tensor (outputs may not share memory)."""
    return t if t._base is None else t.clone()


def _none(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return like.new_empty(0, dtype=dtype or like.dtype)


def _options(groups: int, use_position: bool, use_norm: bool,
             normalized_positions: bool, eps: float) -> PRMOptions:
    return PRMOptions(groups=groups, use_position=use_position,
                      use_norm=use_norm,
                      normalized_positions=normalized_positions, eps=eps)


def _norm(has_norm: bool, weight, bias, running_mean, running_var,
          training: bool, momentum: float, eps: float) -> Optional[BatchNorm]:
    if not has_norm:
        return None
    return BatchNorm(weight, bias, running_mean, running_var, training,
                     momentum, eps)


def forward_kwargs(norm: Optional[BatchNorm], relu: bool,
                   options: PRMOptions, backend: str) -> dict:
    """The keyword-only settings of ``block_tail`` (and of
    :func:`block_tail_over_c`)."""
    return dict(
        has_norm=norm is not None,
        bn_training=norm is not None and norm.training,
        bn_momentum=0.0 if norm is None else float(norm.momentum),
        bn_eps=0.0 if norm is None else float(norm.eps), relu=relu,
        **_option_kwargs(options), backend=backend)


def _option_kwargs(options: PRMOptions) -> dict:
    return dict(groups=options.groups, use_position=options.use_position,
                use_norm=options.use_norm,
                normalized_positions=options.normalized_positions,
                eps=float(options.eps))


def _forward_outputs(c: Tensor, norm: Optional[BatchNorm], groups: int,
                     backend: str) -> Tuple[Tensor, ...]:
    """Empty tensors shaped as ``block_tail``'s outputs (the fake)."""
    b, ch = c.shape[:2]
    n, cg = b * groups, ch // groups
    acc = accumulation_dtype(c)
    y = torch.empty_like(c, memory_format=memory_format_of(c))
    training = norm is not None and norm.training
    save_mean = c.new_empty(ch if training else 0, dtype=acc)
    save_invstd = c.new_empty(ch if training else 0, dtype=acc)
    running = [
        torch.empty_like(t) if training and t is not None else _none(c)
        for t in (norm and norm.running_mean, norm and norm.running_var)]
    state = (c.new_empty(n, dtype=torch.int64), c.new_empty(n, cg, dtype=acc),
             c.new_empty(n, cg, dtype=acc),
             c.new_empty(n, 2, dtype=stats_dtype(c, backend)))
    return (y, save_mean, save_invstd, *running, *state)


def _updated_copies(norm: Optional[BatchNorm]) -> Optional[BatchNorm]:
    """In training, ``norm`` with copies of its running statistics for the
    backend to update (the op's inputs stay as they are)."""
    if norm is None or not norm.training:
        return norm
    return norm._replace(**{
        name: getattr(norm, name).clone()
        for name in _RUNNING if getattr(norm, name) is not None})


def block_tail_impl(c: Tensor, identity: Optional[Tensor],
               bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
               running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Tensor, bias: Tensor, one: Tensor, zero: Tensor,
               theta: Tensor, scale: Tensor, *, has_norm: bool,
               bn_training: bool, bn_momentum: float, bn_eps: float,
               relu: bool, groups: int, use_position: bool, use_norm: bool,
               normalized_positions: bool, eps: float,
               backend: str) -> _ForwardOutputs:
    """``relu(prm(bn(c)) + identity)``; returns [y, save_mean, save_invstd,
    running_mean, running_var, query_index, query, context, stats]: the
    batch statistics and the updated running statistics are empty unless
    BatchNorm normalizes with batch statistics (and keeps running ones)."""
    norm = _updated_copies(_norm(has_norm, bn_weight, bn_bias, running_mean,
                                 running_var, bn_training, bn_momentum,
                                 bn_eps))
    out = backends.forward(
        backend, c, norm, identity, relu,
        PRMParams(weight, bias, one, zero, theta, scale),
        _options(groups, use_position, use_norm, normalized_positions, eps))
    acc = accumulation_dtype(c)
    stats = [_none(c, acc) if t is None else _own(t)
             for t in (out.save_mean, out.save_invstd)]
    running = [_none(c) if t is None or not bn_training else t
               for t in (norm and norm.running_mean,
                         norm and norm.running_var)]
    return (_in_format(out.y, c), *stats, *running,
            *(_own(t).contiguous() for t in out.state))


block_tail = torch.library.custom_op('prm_det::block_tail',
                                     mutates_args=())(block_tail_impl)


@block_tail.register_fake
def _(c, identity, bn_weight, bn_bias, running_mean, running_var, weight,
      bias, one, zero, theta, scale, *, has_norm, bn_training, bn_momentum,
      bn_eps, relu, groups, use_position, use_norm, normalized_positions,
      eps, backend):
    norm = _norm(has_norm, bn_weight, bn_bias, running_mean, running_var,
                 bn_training, bn_momentum, bn_eps)
    return _forward_outputs(c, norm, groups, backend)


def block_tail_over_c(c: Tensor, identity: Optional[Tensor],
                      bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                      running_mean: Optional[Tensor],
                      running_var: Optional[Tensor], weight: Tensor,
                      bias: Tensor, one: Tensor, zero: Tensor, theta: Tensor,
                      scale: Tensor, *, has_norm: bool, bn_training: bool,
                      bn_momentum: float, bn_eps: float, relu: bool,
                      groups: int, use_position: bool, use_norm: bool,
                      normalized_positions: bool, eps: float,
                      backend: str) -> Tensor:
    """Eager inference's ``y``, written over ``c`` where the backend can
    (a contiguous ``c`` that the identity does not share); no state. Not a
    custom op: under torch.compile the compiler manages memory, and
    ``block_tail`` runs."""
    norm = _norm(has_norm, bn_weight, bn_bias, running_mean, running_var,
                 bn_training, bn_momentum, bn_eps)
    return backends.forward(
        backend, c, norm, identity, relu,
        PRMParams(weight, bias, one, zero, theta, scale),
        _options(groups, use_position, use_norm, normalized_positions, eps),
        inplace=True).y


def _param_grad_defined(index: int, use_position: bool) -> bool:
    return use_position or index < 4  # theta and sigma: the position term's


def block_tail_backward_impl(
        grad_y: Tensor, c: Tensor, y: Optional[Tensor],
        bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
        running_mean: Optional[Tensor], running_var: Optional[Tensor],
        save_mean: Tensor, save_invstd: Tensor, weight: Tensor, bias: Tensor,
        one: Tensor, zero: Tensor, theta: Tensor, scale: Tensor,
        query_index: Tensor, query: Tensor, context: Tensor, stats: Tensor,
        *, has_norm: bool, bn_training: bool, bn_eps: float,
        has_identity: bool, groups: int, use_position: bool, use_norm: bool,
        normalized_positions: bool, eps: float, backend: str, need_c: bool,
        need_bn_weight: bool, need_bn_bias: bool) -> _BackwardOutputs:
    """[grad_c, grad_identity, grad_bn_weight, grad_bn_bias, and the six
    parameters']; empty where not asked for, where not defined (theta and
    sigma without the position term) and for grad_identity where it is
    ``grad_y`` itself (no fused ReLU: the caller uses ``grad_y``)."""
    norm = _norm(has_norm, bn_weight, bn_bias, running_mean, running_var,
                 bn_training, 0.0, bn_eps)
    params = PRMParams(weight, bias, one, zero, theta, scale)
    saved = Saved(c, y, norm, save_mean if bn_training else None,
                  save_invstd if bn_training else None, params,
                  PRMState(query_index, query, context, stats),
                  _options(groups, use_position, use_norm,
                           normalized_positions, eps), has_identity)
    grads: Gradients = backends.backward(
        backend, grad_y, saved, Needs(need_c, need_bn_weight, need_bn_bias))
    grad_c = _none(c) if grads.c is None else _in_format(
        grads.c.to(c.dtype), c)
    grad_identity = _none(grad_y)
    if has_identity and y is not None:  # ReLU-masked: a new tensor
        grad_identity = _in_format(grads.identity.to(grad_y.dtype), c)
    bn_grads = [
        _none(c) if g is None else _own(g.to(p.dtype))
        for g, p in ((grads.bn_weight, bn_weight), (grads.bn_bias, bn_bias))]
    param_grads = [
        _own(g.reshape(p.shape).to(p.dtype))
        if g is not None and _param_grad_defined(i, use_position) else
        _none(p) for i, (g, p) in enumerate(zip(grads.params, params))]
    return (grad_c, grad_identity, *bn_grads, *param_grads)


block_tail_backward = torch.library.custom_op(
    'prm_det::block_tail_backward', mutates_args=())(block_tail_backward_impl)


@block_tail_backward.register_fake
def _(grad_y, c, y, bn_weight, bn_bias, running_mean, running_var, save_mean,
      save_invstd, weight, bias, one, zero, theta, scale, query_index, query,
      context, stats, *, has_norm, bn_training, bn_eps, has_identity, groups,
      use_position, use_norm, normalized_positions, eps, backend, need_c,
      need_bn_weight, need_bn_bias):
    fmt = memory_format_of(c)
    grad_c = (torch.empty_like(c, memory_format=fmt) if need_c else
              _none(c))
    grad_identity = (torch.empty_like(grad_y, memory_format=fmt)
                     if has_identity and y is not None else _none(grad_y))
    bn_grads = [
        torch.empty_like(p) if (p is not None and need) else _none(c)
        for p, need in ((bn_weight, need_bn_weight),
                        (bn_bias, need_bn_bias))]
    params = (weight, bias, one, zero, theta, scale)
    param_grads = [
        torch.empty_like(p) if _param_grad_defined(i, use_position) else
        _none(p) for i, p in enumerate(params)]
    return (grad_c, grad_identity, *bn_grads, *param_grads)


# autograd of block_tail, shared with eager mode's
# :class:`prm_det.ops.functions.PRMFunction`


def setup_context(ctx, inputs, keyword_only_inputs, output):
    """Saves what backward reads: ``c``, the output when the ReLU is fused
    (its mask), BatchNorm's tensors and batch statistics, PRM's parameters
    and its small state; nothing else of the map's size, so a PRM block
    keeps for backward what a plain block keeps."""
    (c, identity, bn_weight, bn_bias, running_mean, running_var,
     *params) = inputs
    kw = keyword_only_inputs
    y, save_mean, save_invstd, _, _, *state = output
    # in training the running statistics may change before backward
    # (another forward), which uses the batch statistics only
    keep_running = kw['has_norm'] and not kw['bn_training']
    ctx.save_for_backward(
        c, y if kw['relu'] else None, bn_weight, bn_bias,
        running_mean if keep_running else None,
        running_var if keep_running else None, save_mean, save_invstd,
        *params, *state)
    ctx.settings = dict(
        has_norm=kw['has_norm'], bn_training=kw['bn_training'],
        bn_eps=kw['bn_eps'], has_identity=identity is not None,
        **{k: kw[k] for k in ('groups', 'use_position', 'use_norm',
                              'normalized_positions', 'eps', 'backend')})


def input_gradients(ctx, needs, grad_y, run_backward) -> tuple:
    """The gradients of block_tail's positional inputs from the output's,
    computed by ``run_backward`` (the backward op, or its implementation);
    ``needs``: which inputs take one."""
    (c, y, bn_weight, bn_bias, running_mean, running_var, save_mean,
     save_invstd, *rest) = ctx.saved_tensors
    settings = ctx.settings
    grads = run_backward(
        grad_y, c, y, bn_weight, bn_bias, running_mean, running_var,
        save_mean, save_invstd, *rest, **settings, need_c=needs[0],
        need_bn_weight=bn_weight is not None and needs[2],
        need_bn_bias=bn_bias is not None and needs[3])
    grad_c, grad_identity, grad_bn_weight, grad_bn_bias, *param_grads = grads
    if settings['has_identity'] and y is None:
        grad_identity = grad_y  # no ReLU: the block output's gradient
    elif not settings['has_identity']:
        grad_identity = None
    param_grads = [
        g if _param_grad_defined(i, settings['use_position']) else None
        for i, g in enumerate(param_grads)]
    return (grad_c if needs[0] else None, grad_identity,
            grad_bn_weight if needs[2] else None,
            grad_bn_bias if needs[3] else None, None, None, *param_grads)


def _backward(ctx, grad_y, *unused_grads):
    return input_gradients(ctx, ctx.needs_input_grad, grad_y,
                           torch.ops.prm_det.block_tail_backward)


block_tail.register_autograd(_backward, setup_context=setup_context)
