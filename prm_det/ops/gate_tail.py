"""The gate block tail: any attention that sits between a residual block's
last norm and its add, run in the passes its math needs.

Every attention of the backbones (SE, GE, GC, SGE, CBAM, and PRM, which has
its own op, :mod:`.functions`) does the same thing to the normalized map
``x = bn(c)``: small reductions of it, a small computation on them (the
module's own layers), and one elementwise pass that gates ``x`` and adds the
shortcut. Written as modules, that pass sequence is BatchNorm (read c, write
x), the reductions (read x), the gate (read x, write x * g), the add and the
ReLU (two more passes), and backward keeps ``x`` and ``x * g`` besides the
conv's output. Here it is a few ops around the module's small layers:

1. :func:`channel_moments` (``prm_det::gate_moments``): one read of ``c``
   giving, per (sample, channel), its mean and the sum of squared
   deviations from it (and, asked, its max and min). BatchNorm's batch
   statistics follow from them (:func:`normalize`, small tensors, Chan's
   combination), and so do the channel mean and max of ``x``, affine
   functions of ``c``'s.
2. the module's layers on those [b, C] tensors; for the gates per
   position, :func:`position_pool` (``prm_det::gate_position_pool``): the
   mean (and max) over a group's channels of the channel-gated map
   ``c * scale + shift`` per position, from one read of ``c`` that never
   writes the gated map (CBAM's spatial pooling, SGE's similarities, GC's
   attention logits);
3. :func:`gate_tail` (``prm_det::gate_tail``): one pass
   ``y = relu((c * scale + shift) * gate + identity)``, where BatchNorm and
   the channel gate are folded into ``scale`` and ``shift`` per (sample,
   channel) and ``gate`` is an optional gate per (sample, group, position).
   Backward is one pass (every gradient, the per-channel sums among them);
   it saves ``c``, ``y`` (the ReLU's mask) and the small tensors: what a
   plain block keeps.

BatchNorm's dependence on the batch statistics and the gate's on the
reductions reach ``c`` through autograd of the small tensors and the
moments op's backward (one affine pass, ``grad_mean / hw + 2 grad_m2 (c -
mean)``).

A gate plugs in as its small layers between :func:`normalize` and
:meth:`NormalizedMap.finish` (see ``SE.gate_tail`` and the others in
:mod:`prm_det.models.layers`); no kernel is written per gate.

Backends, chosen by :func:`prm_det.ops.backends.select` as for PRM: ``cpu``
(the C++ kernels, ``csrc/gate_tail_cpu.cpp``: float32/float64, contiguous
maps), ``triton`` (:mod:`.backends.gate_triton`: CUDA maps of any float
dtype, contiguous or channels_last; CPU maps through Triton's interpreter)
and ``torch`` (torch ops, any device, dtype and layout). ``reference`` and
exporting take the modules' readable forward (the caller's
:func:`tail_backend` returns None).
"""
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import backends
from .functions import _needs_grad
from .library import accumulation_dtype, memory_format_of
from .backends import gate_triton
from .contract import BatchNorm, KernelsBroken, PRMOptions

# the names the ops take for their backends
CPU, TRITON, TORCH = 'cpu', 'triton', 'torch'
_ANY = PRMOptions(groups=1)  # the backend choice is PRM's, by device


def _cpu_ops():
    """The C++ kernels' ops (built and loaded at the first call)."""
    return backends.cpu._ops()


def _cpu_kernel_takes(c: Tensor, *others: Optional[Tensor]) -> bool:
    return (backends.cpu.check(c) is None and c.is_contiguous() and all(
        t is None or (t.is_contiguous() and t.dtype == c.dtype)
        for t in others))


def tail_backend(c: Tensor, identity: Optional[Tensor] = None) -> Optional[str]:
    """The backend the gate tail runs on for ``c``: 'cpu' (the C++ kernels:
    a contiguous float32/float64 CPU map), 'triton' (where PRM's choice is
    Triton: CUDA maps), 'torch' (anything else: half precision or
    channels_last on CPU), or None where the modules run as they
    are (the 'reference' backend, exporting, an empty batch)."""
    if c.numel() == 0:
        return None
    backend = backends.select(c, _ANY)
    if backend is None:
        return None
    name = backends.name_of(backend)
    if name == CPU and _cpu_kernel_takes(c, identity):
        return CPU
    return TRITON if name == TRITON else TORCH


# --- prm_det::gate_moments -------------------------------------------------


class Moments(NamedTuple):
    """Per (sample, channel) of a map, [b, C] each: the mean and the sum of
    squared deviations from it; with extrema, the max and min over the
    positions (empty [0, C] otherwise)."""
    mean: Tensor
    m2: Tensor
    best: Tensor
    lowest: Tensor


def _moments_impl(c: Tensor, with_extrema: bool, backend: str
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:class:`Moments` of ``c`` [b, C, h, w] in the accumulation dtype,
    then the flat positions of the max and min (int64, empty without
    extrema): one read of ``c`` on the cpu kernel."""
    if backend == CPU:
        return tuple(_cpu_ops().gate_moments_cpu(c, with_extrema))
    acc = accumulation_dtype(c)
    mean = None
    if backend == TRITON:
        try:
            mean, m2 = gate_triton.moments(c)
        except KernelsBroken:  # warned: torch ops from now on
            pass
    flat = c.flatten(2).to(acc)
    if mean is None:
        var, mean = torch.var_mean(flat, dim=-1, correction=0)
        m2 = var * flat.shape[-1]
    if not with_extrema:
        none = mean.new_empty(0, c.shape[1])
        index = none.to(torch.int64)
        return mean, m2, none, none.clone(), index, index.clone()
    best, arg_best = flat.max(-1)
    lowest, arg_lowest = flat.min(-1)
    return mean, m2, best, lowest, arg_best, arg_lowest


def _moments_grad(c: Tensor, mean: Tensor, arg_best: Tensor,
                  arg_lowest: Tensor, grad_mean: Optional[Tensor],
                  grad_m2: Optional[Tensor], grad_best: Optional[Tensor],
                  grad_lowest: Optional[Tensor]) -> Tensor:
    """dL/dc = grad_mean / hw + 2 grad_m2 (c - mean) (one affine pass),
    plus the extrema's gradients at their positions."""
    hw = c.shape[2] * c.shape[3]
    slope = 2 * grad_m2 if grad_m2 is not None else torch.zeros_like(mean)
    offset = -slope * mean
    if grad_mean is not None:
        offset = offset + grad_mean / hw
    grad = torch.addcmul(offset[..., None, None], c,
                         slope[..., None, None]).to(c.dtype)
    flat = grad.flatten(2)  # a view: contiguous and channels_last alike
    for index, g in ((arg_best, grad_best), (arg_lowest, grad_lowest)):
        if g is not None and index.numel():
            flat.scatter_add_(2, index[..., None], g[..., None].to(c.dtype))
    return grad


_gate_moments = torch.library.custom_op(
    'prm_det::gate_moments', mutates_args=())(_moments_impl)


@_gate_moments.register_fake
def _(c, with_extrema, backend):
    acc = accumulation_dtype(c)
    rows = c.shape[0] if with_extrema else 0
    shape, kept = c.shape[:2], (rows, c.shape[1])
    return (c.new_empty(shape, dtype=acc), c.new_empty(shape, dtype=acc),
            c.new_empty(kept, dtype=acc), c.new_empty(kept, dtype=acc),
            c.new_empty(kept, dtype=torch.int64),
            c.new_empty(kept, dtype=torch.int64))


def _moments_setup(ctx, inputs, output):
    mean, _, _, _, arg_best, arg_lowest = output
    ctx.save_for_backward(inputs[0], mean, arg_best, arg_lowest)
    ctx.mark_non_differentiable(arg_best, arg_lowest)


def _moments_backward(ctx, grad_mean, grad_m2, grad_best, grad_lowest,
                      *unused):
    c, mean, arg_best, arg_lowest = ctx.saved_tensors
    return _moments_grad(c, mean, arg_best, arg_lowest, grad_mean, grad_m2,
                         grad_best, grad_lowest), None, None


_gate_moments.register_autograd(_moments_backward, setup_context=_moments_setup)


class _MomentsFunction(torch.autograd.Function):
    """Eager mode's route through ``prm_det::gate_moments``: its
    implementation and autograd without the dispatcher. A Python custom op
    with autograd costs a dispatch and an argument rebuild per call; eager
    training of a gate ResNet-50 makes 64 such calls a step (measured: the
    fused SE-ResNet-50 took 1.13x ResNet-50's training step through the
    ops, against 1.10x as modules). torch.compile traces the ops."""

    @staticmethod
    def forward(ctx, c, with_extrema, backend):
        output = _moments_impl(c, with_extrema, backend)
        _moments_setup(ctx, (c, with_extrema, backend), output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _moments_backward(ctx, *grads)


def channel_moments(c: Tensor, backend: str,
                    with_extrema: bool = False) -> Moments:
    """``c``'s :class:`Moments` per (sample, channel), from one read of
    ``c``: the custom op under torch.compile, its implementation and
    autograd directly in eager mode. The extrema's gradients go to the
    first position holding each (a NaN wins, as in torch)."""
    if torch.compiler.is_compiling():
        output = _gate_moments(c, with_extrema, backend)
    elif _needs_grad(c):
        output = _MomentsFunction.apply(c, with_extrema, backend)
    else:
        output = _moments_impl(c, with_extrema, backend)
    return Moments(*output[:4])


# --- prm_det::gate_position_pool -----------------------------------------


def _pool_impl(c: Tensor, scale: Tensor, shift: Tensor, groups: int,
               with_max: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Per (sample, group of C / groups channels, position) of ``c * scale
    + shift`` ([b, C, h, w] with [b, C] scale and shift; never written on
    the cpu kernel): the mean over the group's channels [b, groups, h * w]
    and, ``with_max``, the max and the channel holding it within the group
    (int64; both empty otherwise)."""
    if backend == CPU:
        mean, best, index = _cpu_ops().gate_position_pool_cpu(
            c, scale.contiguous(), shift.contiguous(), groups, with_max)
        return mean, best, index
    b, ch = c.shape[:2]
    gated = torch.addcmul(shift[..., None], c.flatten(2).to(scale.dtype),
                          scale[..., None]).view(b, groups, ch // groups, -1)
    if not with_max:
        return (gated.mean(2), scale.new_empty(0, groups, gated.shape[-1]),
                c.new_empty(0, groups, gated.shape[-1], dtype=torch.int64))
    best, index = gated.max(2)
    return gated.mean(2), best, index


def _pool_grads(c: Tensor, scale: Tensor, grad_mean: Tensor,
                grad_max: Tensor, index: Tensor,
                backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(dL/dc, dL/dscale, dL/dshift) of :func:`_pool_impl`."""
    if backend == CPU:
        grad_c, grad_scale, grad_shift = \
            _cpu_ops().gate_position_pool_backward_cpu(
                c, scale.contiguous(), grad_mean.contiguous(),
                grad_max.contiguous(), index)
        return grad_c, grad_scale, grad_shift
    b, ch = c.shape[:2]
    groups = grad_mean.shape[1]
    weight = (grad_mean / (ch // groups))[:, :, None].expand(
        -1, -1, ch // groups, -1).clone()             # [b, G, C / G, hw]
    if index.numel():
        weight.scatter_add_(2, index[:, :, None], grad_max[:, :, None])
    weight = weight.view(b, ch, -1)
    grad_c = (weight * scale[..., None]).view(c.shape).to(c.dtype)
    grad_scale = (weight * c.flatten(2).to(scale.dtype)).sum(-1)
    return (grad_c.contiguous(memory_format=memory_format_of(c)), grad_scale,
            weight.sum(-1))


_gate_position_pool_backward = torch.library.custom_op(
    'prm_det::gate_position_pool_backward', mutates_args=())(_pool_grads)


@_gate_position_pool_backward.register_fake
def _(c, scale, grad_mean, grad_max, index, backend):
    return (torch.empty_like(c, memory_format=memory_format_of(c)),
            torch.empty_like(scale), torch.empty_like(scale))


_gate_position_pool = torch.library.custom_op(
    'prm_det::gate_position_pool', mutates_args=())(_pool_impl)


@_gate_position_pool.register_fake
def _(c, scale, shift, groups, with_max, backend):
    shape = (c.shape[0], groups, c.shape[2] * c.shape[3])
    kept = shape if with_max else (0, *shape[1:])
    return (c.new_empty(shape, dtype=scale.dtype),
            c.new_empty(kept, dtype=scale.dtype),
            c.new_empty(kept, dtype=torch.int64))


def _pool_setup(ctx, inputs, output):
    c, scale, _, _, _, backend = inputs
    ctx.save_for_backward(c, scale, output[2])
    ctx.backend, ctx.groups = backend, inputs[3]
    ctx.mark_non_differentiable(output[2])


def _pool_backward(ctx, grad_mean, grad_max, _,
                   run_backward=_gate_position_pool_backward):
    """The inputs' gradients from ``run_backward`` (the backward op, what
    torch.compile traces, or its implementation in eager mode)."""
    c, scale, index = ctx.saved_tensors
    if grad_mean is None:
        grad_mean = scale.new_zeros(c.shape[0], ctx.groups,
                                    c.shape[2] * c.shape[3])
    if grad_max is None or not index.numel():
        grad_max = torch.zeros_like(index, dtype=scale.dtype)
    grad_c, grad_scale, grad_shift = run_backward(
        c, scale, grad_mean, grad_max, index, ctx.backend)
    return grad_c, grad_scale, grad_shift, None, None, None


_gate_position_pool.register_autograd(_pool_backward,
                                      setup_context=_pool_setup)


class _PoolFunction(torch.autograd.Function):
    """Eager mode's route through ``prm_det::gate_position_pool`` (see
    :class:`_MomentsFunction`)."""

    @staticmethod
    def forward(ctx, c, scale, shift, groups, with_max, backend):
        inputs = (c, scale, shift, groups, with_max, backend)
        output = _pool_impl(*inputs)
        _pool_setup(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_mean, grad_max, grad_index):
        return _pool_backward(ctx, grad_mean, grad_max, grad_index,
                              _pool_grads)


def position_pool(c: Tensor, scale: Tensor, shift: Tensor, backend: str,
                  groups: int = 1, with_max: bool = False
                  ) -> Tuple[Tensor, Optional[Tensor]]:
    """The mean (and ``with_max`` the max, else None) over each group's
    channels of ``c * scale + shift`` per position, [b, groups, h * w]
    each, from one read of ``c`` (CBAM's spatial pooling of its
    channel-gated map, SGE's similarities, GC's attention logits). The
    max's gradient goes to the first channel holding it (its index, int64,
    is kept for backward: only with the max). The Triton backend runs it
    on torch ops."""
    args = (c, scale, shift, groups, with_max,
            CPU if backend == CPU else TORCH)
    if torch.compiler.is_compiling():
        mean, best, _ = _gate_position_pool(*args)
    elif _needs_grad(c, scale, shift):
        mean, best, _ = _PoolFunction.apply(*args)
    else:
        mean, best, _ = _pool_impl(*args)
    return mean, best if with_max else None


# --- prm_det::gate_tail ----------------------------------------------------


def _grouped(t: Tensor, groups: int) -> Tensor:
    """[b, C, h, w] as [b, groups, C / groups, h, w] (a view)."""
    b, ch, h, w = t.shape
    return t.view(b, groups, ch // groups, h, w) if t.is_contiguous() else \
        t.reshape(b, groups, ch // groups, h, w)


def _gate_values(gate, gate_affine):
    """The gate [b, G, h, w]: ``gate`` itself, or with ``gate_affine``
    [b, G, 2], ``sigmoid(gate * affine[..., 0] + affine[..., 1])``."""
    if gate_affine is None:
        return gate
    return torch.sigmoid(torch.addcmul(gate_affine[..., 1, None, None], gate,
                                       gate_affine[..., 0, None, None]))


def _tail_torch(c, identity, scale, shift, gate, gate_affine, relu):
    x = torch.addcmul(shift[..., None, None], c, scale[..., None, None])
    if gate is not None:
        values = _gate_values(gate, gate_affine)
        x = (_grouped(x, gate.shape[1]) * values[:, :, None]).flatten(1, 2)
    if identity is not None:
        x = x.add_(identity)
    if relu:
        x = x.relu_()
    return x.to(c.dtype)


def _tail_backward_torch(grad_y, c, y, scale, shift, gate, gate_affine,
                         has_identity):
    acc = scale.dtype
    masked = grad_y if y is None else torch.ops.aten.threshold_backward(
        grad_y, y, 0)
    grad_identity = masked if has_identity else None
    gy = masked.to(acc)
    grad_gate = grad_affine = None
    if gate is None:
        gx = gy
    else:
        groups = gate.shape[1]
        values = _gate_values(gate, gate_affine)
        x = torch.addcmul(shift[..., None, None], c, scale[..., None, None])
        grad_gate = (_grouped(gy, groups) * _grouped(x, groups)).sum(2)
        gx = (_grouped(gy, groups) * values[:, :, None]).flatten(1, 2)
        if gate_affine is not None:  # through the sigmoid and the affine
            dz = grad_gate * values * (1 - values)
            grad_gate = dz * gate_affine[..., 0, None, None]
            grad_affine = torch.stack(((dz * gate).sum((2, 3)),
                                       dz.sum((2, 3))), -1)
    grad_shift = gx.sum((2, 3))
    grad_scale = torch.einsum('bchw,bchw->bc', gx, c.to(acc))
    grad_c = (gx * scale[..., None, None]).to(c.dtype)
    return (grad_c, grad_identity, grad_scale, grad_shift, grad_gate,
            grad_affine)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _tail_impl(c: Tensor, identity: Optional[Tensor], scale: Tensor,
               shift: Tensor, gate: Optional[Tensor],
               gate_affine: Optional[Tensor], relu: bool,
               backend: str) -> Tensor:
    """``act((c * scale + shift) * gate + identity)``: ``scale``, ``shift``
    [b, C]; ``gate`` [b, G, h, w] (G divides C), or its logits with
    ``gate_affine`` [b, G, 2] (the gate ``sigmoid(gate * gate_affine[...,
    0] + gate_affine[..., 1])``)."""
    if backend == CPU:
        return _cpu_ops().gate_tail_forward_cpu(
            c, identity, scale.contiguous(), shift.contiguous(),
            _contiguous(gate), _contiguous(gate_affine), relu)
    if backend == TRITON:
        try:
            return gate_triton.tail_forward(
                c, identity, scale, shift, gate, gate_affine,
                relu).contiguous(memory_format=memory_format_of(c))
        except KernelsBroken:  # warned: torch ops from now on
            pass
    return _tail_torch(c, identity, scale, shift, gate, gate_affine,
                       relu).contiguous(memory_format=memory_format_of(c))


_gate_tail = torch.library.custom_op('prm_det::gate_tail',
                                     mutates_args=())(_tail_impl)


@_gate_tail.register_fake
def _(c, identity, scale, shift, gate, gate_affine, relu, backend):
    return torch.empty_like(c, memory_format=memory_format_of(c))


def _tail_backward_impl(grad_y: Tensor, c: Tensor, y: Optional[Tensor],
                        scale: Tensor, shift: Tensor, gate: Optional[Tensor],
                        gate_affine: Optional[Tensor], has_identity: bool,
                        backend: str) -> Tuple[Tensor, Tensor, Tensor,
                                               Tensor, Tensor, Tensor]:
    """Every gradient of :func:`gate_tail` in one call: c, identity (empty
    where it is ``grad_y`` itself: no ReLU, or no identity), scale, shift,
    gate and gate_affine (empty without them). ``y`` is the output where
    the ReLU was fused (its mask), else None."""
    if backend == CPU:
        grads = _cpu_ops().gate_tail_backward_cpu(
            grad_y.contiguous(), c, y, scale.contiguous(),
            shift.contiguous(), _contiguous(gate), _contiguous(gate_affine),
            has_identity)
    else:
        grads = None
        if backend == TRITON:
            try:
                grads = gate_triton.tail_backward(
                    grad_y, c, y, scale, shift, gate, gate_affine,
                    has_identity)
            except KernelsBroken:  # warned: torch ops from now on
                pass
        if grads is None:
            grads = _tail_backward_torch(grad_y, c, y, scale, shift, gate,
                                         gate_affine, has_identity)
    (grad_c, grad_identity, grad_scale, grad_shift, grad_gate,
     grad_affine) = grads
    if grad_identity is None or y is None or not has_identity:
        grad_identity = _empty(grad_y)
    elif grad_identity is grad_y:  # outputs may not alias inputs
        grad_identity = grad_identity.clone()
    return (grad_c.contiguous(memory_format=memory_format_of(c)), grad_identity,
            grad_scale, grad_shift,
            _empty(scale) if gate is None else grad_gate,
            _empty(scale) if gate_affine is None else grad_affine)


_gate_tail_backward = torch.library.custom_op(
    'prm_det::gate_tail_backward', mutates_args=())(_tail_backward_impl)


@_gate_tail_backward.register_fake
def _(grad_y, c, y, scale, shift, gate, gate_affine, has_identity, backend):
    fmt = memory_format_of(c)
    return (torch.empty_like(c, memory_format=fmt),
            torch.empty_like(grad_y, memory_format=fmt)
            if has_identity and y is not None else _empty(grad_y),
            torch.empty_like(scale), torch.empty_like(shift),
            _empty(scale) if gate is None else torch.empty_like(gate),
            _empty(scale) if gate_affine is None else
            torch.empty_like(gate_affine))


def _tail_setup(ctx, inputs, output):
    c, identity, scale, shift, gate, gate_affine, relu, backend = inputs
    ctx.save_for_backward(c, output if relu else None, scale, shift, gate,
                          gate_affine)
    ctx.has_identity = identity is not None
    ctx.backend = backend


def _tail_backward(ctx, grad_y, run_backward=_gate_tail_backward):
    """The inputs' gradients from ``run_backward`` (the backward op, what
    torch.compile traces, or its implementation in eager mode)."""
    c, y, scale, shift, gate, gate_affine = ctx.saved_tensors
    (grad_c, grad_identity, grad_scale, grad_shift, grad_gate,
     grad_affine) = run_backward(grad_y, c, y, scale, shift, gate,
                                 gate_affine, ctx.has_identity, ctx.backend)
    if not ctx.has_identity:
        grad_identity = None
    elif y is None:
        grad_identity = grad_y
    return (grad_c, grad_identity, grad_scale, grad_shift,
            None if gate is None else grad_gate,
            None if gate_affine is None else grad_affine, None, None)


_gate_tail.register_autograd(_tail_backward, setup_context=_tail_setup)


class _TailFunction(torch.autograd.Function):
    """Eager mode's route through ``prm_det::gate_tail``: its
    implementation and autograd without the dispatcher (see
    :class:`_MomentsFunction`)."""

    @staticmethod
    def forward(ctx, c, identity, scale, shift, gate, gate_affine, relu,
                backend):
        inputs = (c, identity, scale, shift, gate, gate_affine, relu,
                  backend)
        output = _tail_impl(*inputs)
        _tail_setup(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_y):
        return _tail_backward(ctx, grad_y, _tail_backward_impl)


class GateLogits(NamedTuple):
    """A gate per (sample, group, position) given by its logits: the gate is
    ``sigmoid(values * scale + shift)``, ``values`` [b, G, h, w], ``scale``
    and ``shift`` [b, G] (SGE's and PRM's form: a normalization and the
    group's weight and bias). The op keeps ``values`` for backward, not the
    gate."""
    values: Tensor
    scale: Tensor
    shift: Tensor


def gate_tail(c: Tensor, scale: Tensor, shift: Tensor, backend: str,
              identity: Optional[Tensor] = None,
              gate: Optional[Tensor] = None,
              gate_logits: Optional[GateLogits] = None,
              relu: bool = True) -> Tensor:
    """``relu((c * scale + shift) * gate + identity)`` in one pass each way
    (the custom op ``prm_det::gate_tail``).

    Args:
        c (Tensor): [b, C, h, w], the block's last conv output.
        scale, shift (Tensor): [b, C], accumulation dtype (float32 for
            half maps): BatchNorm and any channel gate folded together.
        backend (str): 'cpu' or 'torch' (:func:`tail_backend`).
        identity (Tensor, optional): the shortcut, ``c``'s shape.
        gate (Tensor, optional): [b, G, h, w] in the accumulation dtype, one
            value per (sample, group of C / G channels, position).
        gate_logits (GateLogits, optional): the gate as logits (instead of
            ``gate``).
        relu (bool): apply the block's ReLU. Defaults to True.
    """
    if identity is not None and identity.dtype != c.dtype:
        identity = identity.to(c.dtype)  # autocast: the map's dtype wins
    gate_affine = None
    if gate_logits is not None:
        if gate is not None:
            raise ValueError('gate_tail: give gate or gate_logits, not both')
        gate = gate_logits.values
        gate_affine = torch.stack((gate_logits.scale, gate_logits.shift), -1)
    args = (c, identity, scale, shift, gate, gate_affine, relu, backend)
    if torch.compiler.is_compiling():
        return _gate_tail(*args)
    if _needs_grad(c, identity, scale, shift, gate, gate_affine):
        return _TailFunction.apply(*args)
    return _tail_impl(*args)


# --- BatchNorm from the moments, and the map it normalizes -----------------


class NormalizedMap(NamedTuple):
    """``x = bn(c)`` without ``x``: ``c``, BatchNorm as a per-channel affine
    (``x = c * alpha + beta``, [C] each) and ``c``'s mean per (sample,
    channel) [b, C]; what a gate's small layers read, and
    :meth:`finish` applies."""
    c: Tensor
    alpha: Tensor
    beta: Tensor
    moments: Moments
    backend: str

    def channel_mean(self) -> Tensor:
        """The mean of ``x`` over the positions, [b, C]."""
        return self.moments.mean * self.alpha + self.beta

    def channel_max(self) -> Tensor:
        """The max of ``x`` over the positions, [b, C]: c's max or min by
        the sign of the norm's scale (``normalize(with_extrema=True)``)."""
        if not self.moments.best.numel() and self.c.shape[0]:
            raise RuntimeError('channel_max: normalize the map with '
                               'with_extrema=True')
        extreme = torch.where(self.alpha >= 0, self.moments.best,
                              self.moments.lowest)
        return extreme * self.alpha + self.beta

    def channel_affine(self, channel_scale: Optional[Tensor] = None
                       ) -> Tuple[Tensor, Tensor]:
        """(scale, shift) [b, C] with ``c * scale + shift = x * channel_scale``
        (the channel-gated map)."""
        b = self.c.shape[0]
        scale = self.alpha.expand(b, -1)
        shift = self.beta.expand(b, -1)
        if channel_scale is not None:
            scale, shift = scale * channel_scale, shift * channel_scale
        return scale, shift

    def finish(self, identity: Optional[Tensor],
               channel_scale: Optional[Tensor] = None,
               channel_shift: Optional[Tensor] = None,
               gate: Optional[Tensor] = None,
               gate_logits: Optional[GateLogits] = None,
               relu: bool = True) -> Tensor:
        """``relu((x * channel_scale + channel_shift) * gate + identity)``:
        the block's output. ``channel_scale``/``channel_shift`` [b, C],
        ``gate`` [b, G, h, w] (or ``gate_logits``); each optional."""
        acc = self.alpha.dtype
        scale, shift = self.channel_affine(
            None if channel_scale is None else channel_scale.to(acc))
        if channel_shift is not None:
            shift = shift + channel_shift.to(acc)
        return gate_tail(self.c, scale.contiguous(), shift.contiguous(),
                         self.backend, identity=identity,
                         gate=None if gate is None else gate.to(acc),
                         gate_logits=None if gate_logits is None else
                         GateLogits(*(t.to(acc) for t in gate_logits)),
                         relu=relu)


def normalize(c: Tensor, norm: BatchNorm, backend: str,
              with_extrema: bool = False) -> NormalizedMap:
    """BatchNorm of ``c`` as :class:`NormalizedMap`, from one read of ``c``
    (which also gives the extrema per channel when asked); in training the
    running statistics are updated as ``F.batch_norm`` does (unbiased
    variance, ``norm.momentum``)."""
    moments = channel_moments(c, backend, with_extrema)
    sample_mean, m2 = moments.mean, moments.m2
    acc = sample_mean.dtype
    if norm.training:
        b, hw = c.shape[0], c.shape[2] * c.shape[3]
        mean = sample_mean.mean(0)
        # Chan et al.: the batch's sum of squared deviations from the
        # per-sample ones, without cancellation
        total_m2 = m2.sum(0) + hw * (sample_mean - mean).square().sum(0)
        count = b * hw
        var = total_m2 / count
        if norm.running_mean is not None:
            with torch.no_grad():
                norm.running_mean.mul_(1 - norm.momentum).add_(
                    mean.to(norm.running_mean.dtype), alpha=norm.momentum)
                norm.running_var.mul_(1 - norm.momentum).add_(
                    (total_m2 / max(count - 1, 1)).to(
                        norm.running_var.dtype), alpha=norm.momentum)
    else:
        mean, var = norm.running_mean.to(acc), norm.running_var.to(acc)
    alpha = torch.rsqrt(var + norm.eps)
    if norm.weight is not None:
        alpha = alpha * norm.weight.to(acc)
    beta = -mean * alpha
    if norm.bias is not None:
        beta = beta + norm.bias.to(acc)
    return NormalizedMap(c, alpha, beta, moments, backend)
