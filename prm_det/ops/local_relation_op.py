"""``prm_det::local_relation``: the local relation aggregation as a custom
op (the math: :mod:`.local_relation`).

Forward returns the output and the log-sum-exp of each window; autograd
saves the inputs and that log-sum-exp (1/m of the value's size), and the
backward op recomputes each offset's weight from them, and the output on
the way (it returns it: :mod:`.local_relation_layer` gives it to the
layer's final 1x1 conv, so that no one keeps the output for backward).
Nothing of k * k times the map's size is made or kept on any backend:

- ``cpu``: the C++ kernels (``csrc/local_relation_cpu.cpp``), float32 and
  float64 CPU maps;
- ``triton``: :mod:`.backends.local_relation_triton`, CUDA maps of any
  float dtype (CPU maps through Triton's interpreter);
- ``torch``: :mod:`.backends.local_relation_torch`, torch ops one window
  offset at a time, any device and dtype.

The backend is PRM's choice for the map's device (``use_backend``,
``PRM_DET_BACKEND``); ``reference`` and exporting run
:func:`~.local_relation.local_relation_reference` (standard ops, unfold).
Eager mode calls the implementations through an ``autograd.Function``;
``torch.compile`` sees the custom ops whole (fake implementations,
registered autograd, a backward op).
"""
import contextlib
import importlib
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import backends
from .contract import KernelsBroken, PRMOptions
from .functions import _needs_grad
from .local_relation import (check_inputs, local_relation_reference,
                             output_size)

CPU, TRITON, TORCH = 'cpu', 'triton', 'torch'
_ANY = PRMOptions(groups=1)  # the backend choice is PRM's, by device
_MODULES = {CPU: 'local_relation_cpu', TRITON: 'local_relation_triton',
            TORCH: 'local_relation_torch'}


def relation_backend(value: Tensor) -> Optional[str]:
    """The backend the op runs on for ``value``: 'cpu' (float32/float64
    CPU maps where the C++ kernels are built), 'triton' (CUDA maps), 'torch'
    (anything else), or None for the readable reference (the 'reference'
    backend, exporting)."""
    backend = backends.select(value, _ANY)
    if backend is None:
        return None
    name = backends.name_of(backend)
    if name == CPU and value.dtype in backends.cpu.DTYPES:
        return CPU
    return TRITON if name == TRITON else TORCH


def _backend_module(name: str):
    return importlib.import_module(f'.backends.{_MODULES[name]}',
                                   __package__)


def _forward_impl(query: Tensor, key: Tensor, value: Tensor, prior: Tensor,
                  kernel_size: int, stride: int, method: str,
                  backend: str) -> Tuple[Tensor, Tensor]:
    if backend == TRITON:
        try:
            return _backend_module(TRITON).forward(
                query, key, value, prior, kernel_size, stride, method)
        except KernelsBroken:  # warned: torch ops from now on
            backend = TORCH
    return _backend_module(backend).forward(query, key, value, prior,
                                            kernel_size, stride, method)


_local_relation = torch.library.custom_op(
    'prm_det::local_relation', mutates_args=())(_forward_impl)


@_local_relation.register_fake
def _(query, key, value, prior, kernel_size, stride, method, backend):
    b, channels, h, w = value.shape
    size = (output_size(h, stride), output_size(w, stride))
    acc = torch.promote_types(value.dtype, torch.float32)
    return (value.new_empty(b, channels, *size),
            value.new_empty(b, key.shape[1], *size, dtype=acc))


def _backward_impl(grad_out: Tensor, query: Tensor, key: Tensor,
                   value: Tensor, prior: Tensor, lse: Tensor,
                   kernel_size: int, stride: int, method: str, backend: str
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad query, grad key, grad value, grad prior, the output
    recomputed)."""
    args = (grad_out.contiguous(), query, key, value, prior, lse,
            kernel_size, stride, method)
    if backend == TRITON:
        try:
            return _backend_module(TRITON).backward(*args)
        except KernelsBroken:  # warned: torch ops from now on
            backend = TORCH
    return _backend_module(backend).backward(*args)


_local_relation_backward = torch.library.custom_op(
    'prm_det::local_relation_backward', mutates_args=())(_backward_impl)


@_local_relation_backward.register_fake
def _(grad_out, query, key, value, prior, lse, kernel_size, stride, method,
      backend):
    return (*(torch.empty_like(t) for t in (query, key, value, prior)),
            torch.empty_like(grad_out, dtype=value.dtype))


def _setup(ctx, inputs, output):
    query, key, value, prior, kernel_size, stride, method, backend = inputs
    _out, lse = output
    ctx.save_for_backward(query, key, value, prior, lse)
    ctx.settings = (kernel_size, stride, method, backend)


def _backward(ctx, grad_out, _grad_lse, run_backward=_local_relation_backward):
    query, key, value, prior, lse = ctx.saved_tensors
    *grads, _out = run_backward(grad_out, query, key, value, prior, lse,
                                *ctx.settings)
    return (*grads, None, None, None, None)


_local_relation.register_autograd(_backward, setup_context=_setup)


class _RelationFunction(torch.autograd.Function):
    """Eager mode's route: the implementations and the op's autograd
    without the dispatcher (see ``gate_tail._MomentsFunction``)."""

    @staticmethod
    def forward(ctx, query, key, value, prior, kernel_size, stride, method,
                backend):
        inputs = (query, key, value, prior, kernel_size, stride, method,
                  backend)
        output = _forward_impl(*inputs)
        _setup(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        return _backward(ctx, grad_out, grad_lse, _backward_impl)


def prepared(query: Tensor, key: Tensor, value: Tensor, prior: Tensor,
             kernel_size: int, stride: int, method: str, backend: str
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The op's inputs checked and as the backends take them: query, key
    and prior in the value's dtype (autocast can leave them apart),
    contiguous for the C++ kernels."""
    check_inputs(query, key, value, prior, kernel_size, stride, method)
    query, key, prior = (t if t.dtype == value.dtype else t.to(value.dtype)
                         for t in (query, key, prior))
    if backend == CPU:
        query, key, value, prior = (t.contiguous()
                                    for t in (query, key, value, prior))
    return query, key, value, prior


def without_autocast(device_type: str):
    """The kernels compute in float32 at least whatever autocast says."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def local_relation(query: Tensor, key: Tensor, value: Tensor, prior: Tensor,
                   kernel_size: int, stride: int = 1,
                   method: str = 'squared_difference') -> Tensor:
    """The local relation aggregation (:mod:`.local_relation`) on the
    chosen backend: ``query`` [b, G, Ho, Wo], ``key`` [b, G, H, W],
    ``value`` [b, C, H, W], ``prior`` [G, k, k]; returns [b, C, Ho, Wo] in
    the value's dtype. Query, key and prior are cast to the value's dtype
    (autocast can leave them apart)."""
    backend = relation_backend(value)
    if backend is None:
        return local_relation_reference(query, key, value, prior,
                                        kernel_size, stride, method)
    args = (*prepared(query, key, value, prior, kernel_size, stride, method,
                      backend), kernel_size, stride, method, backend)
    with without_autocast(value.device.type):
        if torch.compiler.is_compiling():
            return _local_relation(*args)[0]
        if _needs_grad(*args[:4]):
            return _RelationFunction.apply(*args)[0]
        return _forward_impl(*args)[0]
