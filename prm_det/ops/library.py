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

The op itself takes the named structures of :mod:`.contract`:
:func:`block_tail_forward` and :func:`block_tail_backward` (with the
autograd between them, :func:`save_for_backward` and
:func:`input_gradients`). A custom op's schema takes tensors and scalars
only, so the registered ops take the tensors positionally and the settings
as keyword-only scalars; each structure is flattened into them by one
function (:func:`options_to_schema`, :func:`norm_to_schema`) and rebuilt by
one (:func:`options_from_schema`, :func:`norm_from_schema`), here and
nowhere else.

Eager mode runs the structured functions directly, with the same autograd,
in :class:`prm_det.ops.functions.PRMFunction`: a Python custom op costs a
dispatch per call, and with autograd registered ~1 ms more per training
call on CPU (torch rebuilds the 23-argument schema's argument list for
every argument it fills in), 2-3% of a CPU training step of a ResNet-50
(16 calls each way). ``torch.compile`` traces the registered ops.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import backends
from .contract import (BatchNorm, Gradients, Needs, PRMOptions, PRMParams,
                       PRMState, Saved, norm_tensors)

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


def _absent(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """An empty tensor (``like``'s device, ``dtype`` or its dtype): what an
    output not asked for or not defined is (the schema has no optional
    outputs)."""
    return like.new_empty(0, dtype=dtype or like.dtype)


# the one conversion each way between the structures and the ops' scalars


def options_to_schema(options: PRMOptions) -> dict:
    """PRM's options as the ops' keyword arguments. The similarity mode and
    the layer's pinned backend stay behind: the ops compute 'dotproduct' on
    the backend their ``backend`` argument names."""
    return dict(groups=options.groups, use_position=options.use_position,
                use_norm=options.use_norm,
                normalized_positions=options.normalized_positions,
                eps=float(options.eps))


def options_from_schema(groups: int, use_position: bool, use_norm: bool,
                        normalized_positions: bool,
                        eps: float) -> PRMOptions:
    """The ops' option arguments as :class:`PRMOptions` (the inverse of
    :func:`options_to_schema`)."""
    return PRMOptions(groups=groups, use_position=use_position,
                      use_norm=use_norm,
                      normalized_positions=normalized_positions, eps=eps)


def norm_to_schema(norm: Optional[BatchNorm],
                   momentum: bool = True) -> dict:
    """BatchNorm's settings as the ops' keyword arguments (its tensors are
    positional: :func:`~prm_det.ops.contract.norm_tensors`); without
    ``momentum`` for the backward op, which updates no running
    statistics."""
    settings = dict(has_norm=norm is not None,
                    bn_training=norm is not None and norm.training,
                    bn_eps=0.0 if norm is None else float(norm.eps))
    if momentum:
        settings['bn_momentum'] = 0.0 if norm is None else float(
            norm.momentum)
    return settings


def norm_from_schema(tensors: Tuple[Optional[Tensor], ...], has_norm: bool,
                     bn_training: bool, bn_eps: float,
                     bn_momentum: float = 0.0) -> Optional[BatchNorm]:
    """The ops' BatchNorm arguments as :class:`BatchNorm` (the inverse of
    :func:`~prm_det.ops.contract.norm_tensors` and
    :func:`norm_to_schema`)."""
    if not has_norm:
        return None
    return BatchNorm(*tensors, training=bn_training, momentum=bn_momentum,
                     eps=bn_eps)


# the op on named structures: what eager mode runs, and what the registered
# ops run once their arguments are structures again


def _with_running_copies(norm: Optional[BatchNorm]) -> Optional[BatchNorm]:
    """``norm`` with copies of its running statistics where the backend
    updates them (training): the op's inputs stay as they are."""
    if norm is None or not norm.training:
        return norm
    return norm._replace(
        running_mean=_clone(norm.running_mean),
        running_var=_clone(norm.running_var))


def _clone(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.clone()


def block_tail_forward(c: Tensor, identity: Optional[Tensor],
                       norm: Optional[BatchNorm], relu: bool,
                       params: PRMParams, options: PRMOptions,
                       backend: str) -> _ForwardOutputs:
    """``relu(prm(norm(c)) + identity)``; returns [y, save_mean,
    save_invstd, running_mean, running_var, query_index, query, context,
    stats]: the batch statistics and the updated running statistics are
    empty unless BatchNorm normalizes with batch statistics (and keeps
    running ones)."""
    norm = _with_running_copies(norm)
    out = backends.forward(backend, c, norm, identity, relu, params,
                           options)
    acc = accumulation_dtype(c)
    batch_stats = [_absent(c, acc) if t is None else _own(t)
                   for t in (out.save_mean, out.save_invstd)]
    training = norm is not None and norm.training
    running = [t if training and t is not None else _absent(c)
               for t in norm_tensors(norm)[2:]]
    return (_in_format(out.y, c), *batch_stats, *running,
            *(_own(t).contiguous() for t in out.state))


def block_tail_over_c(c: Tensor, identity: Optional[Tensor],
                      norm: Optional[BatchNorm], relu: bool,
                      params: PRMParams, options: PRMOptions,
                      backend: str) -> Tensor:
    """Eager inference's ``y``, written over ``c`` where the backend can
    (a contiguous ``c`` that the identity does not share); no state, and
    the running statistics, if updated, updated in place. Not a custom op:
    under torch.compile the compiler manages memory, and ``block_tail``
    runs."""
    return backends.forward(backend, c, norm, identity, relu, params,
                            options, inplace=True).y


def _param_grad_defined(index: int, use_position: bool) -> bool:
    return use_position or index < 4  # theta and sigma: the position term's


def block_tail_backward(grad_y: Tensor, saved: Saved, needs: Needs,
                        backend: str) -> _BackwardOutputs:
    """[grad_c, grad_identity, grad_bn_weight, grad_bn_bias, and the six
    parameters']; empty where not asked for, where not defined (theta and
    sigma without the position term) and for grad_identity where it is
    ``grad_y`` itself (no fused ReLU: the caller uses ``grad_y``)."""
    c, y = saved.c, saved.y
    grads: Gradients = backends.backward(backend, grad_y, saved, needs)
    grad_c = _absent(c) if grads.c is None else _in_format(
        grads.c.to(c.dtype), c)
    grad_identity = _absent(grad_y)
    if saved.has_identity and y is not None:  # ReLU-masked: a new tensor
        grad_identity = _in_format(grads.identity.to(grad_y.dtype), c)
    bn_weight, bn_bias = norm_tensors(saved.norm)[:2]
    bn_grads = [
        _absent(c) if g is None else _own(g.to(p.dtype))
        for g, p in ((grads.bn_weight, bn_weight), (grads.bn_bias, bn_bias))]
    use_position = saved.options.use_position
    param_grads = [
        _own(g.reshape(p.shape).to(p.dtype))
        if g is not None and _param_grad_defined(i, use_position) else
        _absent(p) for i, (g, p) in enumerate(zip(grads.params,
                                                  saved.params))]
    return (grad_c, grad_identity, *bn_grads, *param_grads)


# autograd of the op, shared by the registered op and eager mode's
# :class:`prm_det.ops.functions.PRMFunction`


def save_for_backward(ctx, c: Tensor, identity: Optional[Tensor],
                      norm: Optional[BatchNorm], relu: bool,
                      params: PRMParams, options: PRMOptions, backend: str,
                      output: _ForwardOutputs) -> None:
    """Saves what backward reads: ``c``, the output when the ReLU is fused
    (its mask), BatchNorm's tensors and batch statistics, PRM's parameters
    and its small state; nothing else of the map's size, so a PRM block
    keeps for backward what a plain block keeps."""
    y, save_mean, save_invstd, _, _, *state = output
    bn_weight, bn_bias, running_mean, running_var = norm_tensors(norm)
    if norm is None or not norm.training:
        save_mean = save_invstd = None  # empty outputs: no batch statistics
    if norm is None or norm.training:
        # in training the running statistics may change before backward
        # (another forward), which uses the batch statistics only
        running_mean = running_var = None
    ctx.save_for_backward(c, y if relu else None, bn_weight, bn_bias,
                          running_mean, running_var, save_mean, save_invstd,
                          *params, *state)
    # the tensors travel through save_for_backward, the settings here
    ctx.norm = None if norm is None else norm._replace(
        weight=None, bias=None, running_mean=None, running_var=None)
    ctx.options, ctx.backend = options, backend
    ctx.has_identity = identity is not None


def input_gradients(ctx, needs: Needs, grad_y: Tensor,
                    run_backward) -> Gradients:
    """The gradients of the op's inputs from the output's, computed by
    ``run_backward(grad_y, saved, needs, backend)`` (the registered backward
    op, or :func:`block_tail_backward`); ``needs``: which of ``c`` and
    BatchNorm's weight and bias take one."""
    (c, y, bn_weight, bn_bias, running_mean, running_var, save_mean,
     save_invstd, *rest) = ctx.saved_tensors
    norm = None if ctx.norm is None else ctx.norm._replace(
        weight=bn_weight, bias=bn_bias, running_mean=running_mean,
        running_var=running_var)
    saved = Saved(c, y, norm, save_mean, save_invstd, PRMParams(*rest[:6]),
                  PRMState(*rest[6:]), ctx.options, ctx.has_identity)
    needs = Needs(needs.c, bn_weight is not None and needs.bn_weight,
                  bn_bias is not None and needs.bn_bias)
    grad_c, grad_identity, grad_bn_weight, grad_bn_bias, *param_grads = \
        run_backward(grad_y, saved, needs, ctx.backend)
    if ctx.has_identity and y is None:
        grad_identity = grad_y  # no ReLU: the block output's gradient
    elif not ctx.has_identity:
        grad_identity = None
    use_position = ctx.options.use_position
    return Gradients(
        grad_c if needs.c else None, grad_identity,
        grad_bn_weight if needs.bn_weight else None,
        grad_bn_bias if needs.bn_bias else None,
        tuple(g if _param_grad_defined(i, use_position) else None
              for i, g in enumerate(param_grads)))


# the registered ops: their arguments into structures, the structured
# functions above, and back


def block_tail_impl(c: Tensor, identity: Optional[Tensor],
                    bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                    running_mean: Optional[Tensor],
                    running_var: Optional[Tensor], weight: Tensor,
                    bias: Tensor, one: Tensor, zero: Tensor, theta: Tensor,
                    scale: Tensor, *, has_norm: bool, bn_training: bool,
                    bn_momentum: float, bn_eps: float, relu: bool,
                    groups: int, use_position: bool, use_norm: bool,
                    normalized_positions: bool, eps: float,
                    backend: str) -> _ForwardOutputs:
    """:func:`block_tail_forward` on the schema's arguments."""
    norm = norm_from_schema((bn_weight, bn_bias, running_mean, running_var),
                            has_norm, bn_training, bn_eps, bn_momentum)
    options = options_from_schema(groups, use_position, use_norm,
                                  normalized_positions, eps)
    return block_tail_forward(
        c, identity, norm, relu,
        PRMParams(weight, bias, one, zero, theta, scale), options, backend)


block_tail = torch.library.custom_op('prm_det::block_tail',
                                     mutates_args=())(block_tail_impl)


def block_tail_kwargs(norm: Optional[BatchNorm], relu: bool,
                      options: PRMOptions, backend: str) -> dict:
    """``block_tail``'s keyword-only arguments (its tensors: ``c``,
    ``identity``, BatchNorm's four and PRM's six)."""
    return dict(**norm_to_schema(norm), relu=relu,
                **options_to_schema(options), backend=backend)


@block_tail.register_fake
def _(c, identity, bn_weight, bn_bias, running_mean, running_var, weight,
      bias, one, zero, theta, scale, *, has_norm, bn_training, bn_momentum,
      bn_eps, relu, groups, use_position, use_norm, normalized_positions,
      eps, backend):
    """Empty tensors shaped as ``block_tail``'s outputs."""
    b, ch = c.shape[:2]
    n, cg = b * groups, ch // groups
    acc = accumulation_dtype(c)
    y = torch.empty_like(c, memory_format=memory_format_of(c))
    training = has_norm and bn_training
    save_mean = c.new_empty(ch if training else 0, dtype=acc)
    save_invstd = c.new_empty(ch if training else 0, dtype=acc)
    running = [torch.empty_like(t) if training and t is not None else
               _absent(c) for t in (running_mean, running_var)]
    state = (c.new_empty(n, dtype=torch.int64), c.new_empty(n, cg, dtype=acc),
             c.new_empty(n, cg, dtype=acc),
             c.new_empty(n, 2, dtype=stats_dtype(c, backend)))
    return (y, save_mean, save_invstd, *running, *state)


def block_tail_backward_impl(
        grad_y: Tensor, c: Tensor, y: Optional[Tensor],
        bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
        running_mean: Optional[Tensor], running_var: Optional[Tensor],
        save_mean: Tensor, save_invstd: Tensor, weight: Tensor,
        bias: Tensor, one: Tensor, zero: Tensor, theta: Tensor,
        scale: Tensor, query_index: Tensor, query: Tensor, context: Tensor,
        stats: Tensor, *, has_norm: bool, bn_training: bool, bn_eps: float,
        has_identity: bool, groups: int, use_position: bool, use_norm: bool,
        normalized_positions: bool, eps: float, backend: str, need_c: bool,
        need_bn_weight: bool, need_bn_bias: bool) -> _BackwardOutputs:
    """:func:`block_tail_backward` on the schema's arguments (the batch
    statistics empty where BatchNorm used none)."""
    norm = norm_from_schema((bn_weight, bn_bias, running_mean, running_var),
                            has_norm, bn_training, bn_eps)
    if not bn_training:
        save_mean = save_invstd = None
    saved = Saved(c, y, norm, save_mean, save_invstd,
                  PRMParams(weight, bias, one, zero, theta, scale),
                  PRMState(query_index, query, context, stats),
                  options_from_schema(groups, use_position, use_norm,
                                      normalized_positions, eps),
                  has_identity)
    return block_tail_backward(grad_y, saved,
                               Needs(need_c, need_bn_weight, need_bn_bias),
                               backend)


block_tail_backward_op = torch.library.custom_op(
    'prm_det::block_tail_backward', mutates_args=())(block_tail_backward_impl)


@block_tail_backward_op.register_fake
def _(grad_y, c, y, bn_weight, bn_bias, running_mean, running_var, save_mean,
      save_invstd, weight, bias, one, zero, theta, scale, query_index, query,
      context, stats, *, has_norm, bn_training, bn_eps, has_identity, groups,
      use_position, use_norm, normalized_positions, eps, backend, need_c,
      need_bn_weight, need_bn_bias):
    fmt = memory_format_of(c)
    grad_c = (torch.empty_like(c, memory_format=fmt) if need_c else
              _absent(c))
    grad_identity = (torch.empty_like(grad_y, memory_format=fmt)
                     if has_identity and y is not None else _absent(grad_y))
    bn_grads = [
        torch.empty_like(p) if (p is not None and need) else _absent(c)
        for p, need in ((bn_weight, need_bn_weight),
                        (bn_bias, need_bn_bias))]
    params = (weight, bias, one, zero, theta, scale)
    param_grads = [
        torch.empty_like(p) if _param_grad_defined(i, use_position) else
        _absent(p) for i, p in enumerate(params)]
    return (grad_c, grad_identity, *bn_grads, *param_grads)


def _run_backward_op(grad_y: Tensor, saved: Saved, needs: Needs,
                     backend: str) -> _BackwardOutputs:
    """``block_tail_backward`` through the dispatcher (what torch.compile
    traces), its arguments from the structures."""
    acc = accumulation_dtype(saved.c)
    batch_stats = [_absent(saved.c, acc) if t is None else t
                   for t in (saved.save_mean, saved.save_invstd)]
    return torch.ops.prm_det.block_tail_backward(
        grad_y, saved.c, saved.y, *norm_tensors(saved.norm), *batch_stats,
        *saved.params, *saved.state,
        **norm_to_schema(saved.norm, momentum=False),
        has_identity=saved.has_identity,
        **options_to_schema(saved.options), backend=backend,
        need_c=needs.c, need_bn_weight=needs.bn_weight,
        need_bn_bias=needs.bn_bias)


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    """:func:`save_for_backward` on ``block_tail``'s arguments."""
    (c, identity, bn_weight, bn_bias, running_mean, running_var,
     *params) = inputs
    kw = keyword_only_inputs
    norm = norm_from_schema((bn_weight, bn_bias, running_mean, running_var),
                            kw['has_norm'], kw['bn_training'], kw['bn_eps'],
                            kw['bn_momentum'])
    options = options_from_schema(kw['groups'], kw['use_position'],
                                  kw['use_norm'], kw['normalized_positions'],
                                  kw['eps'])
    save_for_backward(ctx, c, identity, norm, kw['relu'], PRMParams(*params),
                      options, kw['backend'], output)


def _backward(ctx, grad_y, *unused_grads):
    """The gradients of ``block_tail``'s positional inputs (none for the
    running statistics)."""
    needs = ctx.needs_input_grad
    grads = input_gradients(ctx, Needs(needs[0], needs[2], needs[3]), grad_y,
                            _run_backward_op)
    return (grads.c, grads.identity, grads.bn_weight, grads.bn_bias, None,
            None, *grads.params)


block_tail.register_autograd(_backward, setup_context=_setup_context)
