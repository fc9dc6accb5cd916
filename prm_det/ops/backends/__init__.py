"""PRM's backends and the one place that chooses among them.

- ``cpu``: the compiled C++/OpenMP kernel (:mod:`.cpu`), CPU float32 and
  float64 maps; the default there.
- ``triton``: Triton kernels (:mod:`.triton_backend`), the default on CUDA;
  on CPU tensors it runs through Triton's interpreter (``TRITON_INTERPRET=1``
  set before triton is imported), which is how the tests run it.
- ``torch``: torch ops, any device and dtype (:mod:`.torch_ops`); where
  neither of the others applies.
- ``reference``: not a backend but the readable autograd composition
  (:func:`prm_det.ops.reference.prm_reference`): every similarity mode, and
  the route taken while exporting (ONNX, tracing).

:func:`select` is the only code that picks one, with :func:`stand_in`
beside it for a backend whose kernels fail on this machine: select names
the stand-in for later calls, and :func:`forward` and :func:`backward` run
the call in progress on it when the kernels raise
:class:`~prm_det.ops.contract.KernelsBroken` (the Triton kernels on a GPU
Triton cannot compile or fit them for); no backend switches itself. To
force one (tests,
benchmarks, bug reports): ``with prm_det.ops.use_backend('torch'):`` or the
environment variable ``PRM_DET_BACKEND=torch`` (read once, at the first
PRM call); a layer's ``PRMOptions.backend`` pins that layer.
"""
import contextlib
import os
from typing import Iterator, Optional

import torch
from torch import Tensor

from ...private_apis import torch_export_in_progress
from ..contract import (Forward, Gradients, KernelsBroken, Needs, PRMOptions,
                        Saved)
from . import cpu, torch_ops, triton_backend

ENV_VAR = 'PRM_DET_BACKEND'
BACKENDS = {module.NAME: module for module in (cpu, triton_backend, torch_ops)}
NAMES = tuple(BACKENDS) + ('reference',)

_forced = []  # use_backend's stack, innermost last
_from_env = []  # PRM_DET_BACKEND, read once: [name or None]


def _check_name(name: str, where: str) -> str:
    if name not in NAMES:
        raise ValueError(
            f'{where}: unknown PRM backend {name!r}; choose one of {NAMES}')
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run PRM on backend ``name`` inside the block (whatever the device).

    Example:
        >>> import torch, prm_det.ops as ops
        >>> with ops.use_backend('torch'):
        ...     pass  # every PRM call here runs on torch ops
    """
    _forced.append(_check_name(name, 'use_backend'))
    try:
        yield
    finally:
        _forced.pop()


@torch.compiler.assume_constant_result  # read once per process
def _env_choice() -> Optional[str]:
    if not _from_env:
        value = os.environ.get(ENV_VAR, '').strip().lower() or None
        _from_env.append(value and _check_name(value, ENV_VAR))
    return _from_env[0]


def name_of(backend) -> str:
    """A backend module's name (what the custom ops take). An attribute,
    not a lookup keyed by the module: torch.compile before torch 2.13
    cannot hash a module."""
    return backend.NAME


def exporting() -> bool:
    """Whether the model is being traced for export (ONNX through either
    exporter, ``torch.export``, ``torch.jit.trace``): the readable forms
    run then."""
    return (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
            or torch_export_in_progress())


@torch.compiler.assume_constant_result
def _available(name: str) -> bool:
    """Whether backend ``name`` runs here (the CPU kernel is built on the
    first call). torch.compile runs this once, while it traces, and keeps
    the answer: it holds for the process."""
    return BACKENDS[name].available()


@torch.compiler.assume_constant_result
def _broken(name: str) -> bool:
    """Whether backend ``name``'s kernels failed on this machine (they raise
    :class:`KernelsBroken` from then on). torch.compile keeps the answer it
    traced; a compiled call then reaches the stand-in through
    :func:`forward` and :func:`backward`."""
    reason = getattr(BACKENDS[name], 'broken_reason', None)
    return reason is not None and reason() is not None


def stand_in(backend):
    """The backend that runs a call of ``backend`` whose kernels are broken
    here: the torch ops, which run any device and dtype and keep the state
    the Triton kernels keep (their accumulation dtype: a backward of a
    forward that ran on the kernels continues there)."""
    return torch_ops


def _default(c: Tensor):
    """The fastest backend that takes ``c``, by device and availability."""
    if c.is_cuda and _available('triton'):
        return stand_in(triton_backend) if _broken('triton') else \
            triton_backend
    if cpu.check(c) is None and _available('cpu'):
        return cpu
    return torch_ops


def select(c: Tensor, options: PRMOptions):
    """The backend module that runs PRM on ``c``, or None for the reference
    composition. The order: the layer's own ``options.backend``, then
    :func:`use_backend`, then ``PRM_DET_BACKEND``; otherwise the reference
    for modes other than 'dotproduct' and while exporting, else the fastest
    backend for ``c``'s device and dtype."""
    name = options.backend or (_forced[-1] if _forced else _env_choice())
    if name is None:
        if options.mode != 'dotproduct' or exporting():
            return None
        return _default(c)
    if name == 'reference' or options.mode != 'dotproduct':
        return None  # the backends compute the dot-product mode only
    backend = BACKENDS[name]
    reason = backend.check(c)
    if reason is not None:
        raise RuntimeError(
            f'PRM backend {name!r} (forced by PRMOptions.backend, use_backend'
            f' or {ENV_VAR}) cannot run a {c.device.type} {c.dtype} map: '
            f'{reason}. Force another backend ({", ".join(NAMES)}) or none.')
    if not _available(name):
        raise RuntimeError(
            f'PRM backend {name!r} is not available here: '
            f'{backend.unavailable_reason()}')
    if _broken(name):  # forced, but its kernels failed here (warned)
        return stand_in(backend)
    return backend


def forward(name: str, c: Tensor, *args, **kwargs) -> Forward:
    """Backend ``name``'s forward of ``c``; where its kernels turn out
    broken here (:class:`KernelsBroken`: they warned, and wrote nothing the
    caller keeps), the call runs on its :func:`stand_in`."""
    backend = BACKENDS[name]
    try:
        return backend.forward(c, *args, **kwargs)
    except KernelsBroken:
        return stand_in(backend).forward(c, *args, **kwargs)


def backward(name: str, grad_y: Tensor, saved: Saved,
             needs: Needs) -> Gradients:
    """Backend ``name``'s backward, on its :func:`stand_in` where its
    kernels turn out broken here (the saved state is the same)."""
    backend = BACKENDS[name]
    try:
        return backend.backward(grad_y, saved, needs)
    except KernelsBroken:
        return stand_in(backend).backward(grad_y, saved, needs)
