"""PRM's ``cpu`` backend: the compiled C++/OpenMP kernel (``../csrc``).

The kernel runs PRM's forward and backward one channel group at a time while
the group's block sits in cache: three passes over the map in forward (after
one for BatchNorm's batch statistics in training) and three in backward,
mostly from cache, against the dozens of eager passes torch ops need.
BatchNorm is applied as the passes read the convolution's output, so its
normalized map is never written, and its backward is fused in. It is built
at first use (``make setup`` builds it once) with torch's C++ extension
builder for the instruction set this CPU runs, so one cache may serve
machines of different kinds. Where it cannot be built, :func:`available`
is False (with a one-time warning naming the reason) and PRM runs on the
``torch`` backend.
"""
import contextlib
import glob
import os
import re
import sys
import threading
import warnings
from typing import Optional

import torch
from torch import Tensor

from ..contract import (BatchNorm, Forward, Gradients, Needs, PRMOptions,
                        PRMParams, PRMState, Saved)

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'csrc')
# instruction-set flags for torch's reported CPU capability
_ISA_FLAGS = {
    'AVX512': ['-mavx512f', '-mavx512bw', '-mavx512vl', '-mavx512dq',
               '-mavx2', '-mfma'],
    'AVX2': ['-mavx2', '-mfma'],
}
DTYPES = (torch.float32, torch.float64)  # what the kernel computes in

_lock = threading.Lock()
_state = {'loaded': None, 'error': None, 'warned': False}


def sources() -> list:
    """The kernel's C++ sources (headers are found next to them)."""
    return sorted(glob.glob(os.path.join(_CSRC, '*.cpp')))


def _capability() -> str:
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        cap = 'DEFAULT'
    return cap if cap in _ISA_FLAGS else 'DEFAULT'


def extension_name() -> str:
    """Name of the built library: instruction set and torch version in it,
    so a shared cache never hands a machine code it cannot run."""
    version = re.sub(r'[^0-9a-zA-Z]+', '_', torch.__version__)
    return f'prm_det_cpu_{_capability().lower()}_torch{version}'


@contextlib.contextmanager
def _venv_bin_on_path():
    """ninja installed into the environment (by ``make setup``) is found
    even when the environment is not activated."""
    env_bin = os.path.dirname(sys.executable)
    old = os.environ.get('PATH', '')
    if env_bin not in old.split(os.pathsep):
        os.environ['PATH'] = env_bin + os.pathsep + old
    try:
        yield
    finally:
        os.environ['PATH'] = old


def build(verbose: bool = False) -> None:
    """Compile (or load from torch's extension cache) the kernel; raises on
    failure. ``make setup`` calls this so the first training does not."""
    from torch.utils import cpp_extension
    with _venv_bin_on_path():
        cpp_extension.load(
            name=extension_name(),
            sources=sources(),
            extra_include_paths=[_CSRC],
            # -fno-math-errno: lets loops with a square root vectorize
            # (errno is never read here)
            extra_cflags=['-O3', '-fopenmp', '-fno-math-errno',
                          *_ISA_FLAGS.get(_capability(), [])],
            extra_ldflags=['-fopenmp'],
            is_python_module=False,
            verbose=verbose)


def available() -> bool:
    """Whether the kernel is built and loaded (building it on the first
    call; warns once when it cannot be built)."""
    if _state['loaded'] is None:
        with _lock:
            if _state['loaded'] is None:
                try:
                    build()
                    _state['loaded'] = True
                except Exception as exc:  # no compiler, no ninja, ...
                    _state['loaded'] = False
                    _state['error'] = f'{type(exc).__name__}: {exc}'
    if not _state['loaded'] and not _state['warned']:
        _state['warned'] = True
        warnings.warn(
            'prm_det: the compiled PRM CPU kernel could not be built, so PRM '
            'runs on torch ops (same results, slower). Reason: '
            f'{unavailable_reason()}. Fix: install a C++ compiler and ninja '
            '(make setup does), or set PRM_DET_BACKEND=torch to silence '
            'this.')
    return bool(_state['loaded'])


def unavailable_reason() -> Optional[str]:
    """Why the kernel could not be built, if it could not."""
    return _state['error']


def check(c: Tensor) -> Optional[str]:
    if c.device.type != 'cpu' or c.dtype not in DTYPES:
        return 'the CPU kernel runs CPU float32 and float64 maps'
    return None


def _ops():
    if not _state['loaded'] and not available():
        raise RuntimeError('prm_det: the PRM CPU kernel is not available: '
                           f'{unavailable_reason()}')
    return torch.ops.prm_det


def _opts(options: PRMOptions) -> tuple:
    return (options.groups, options.use_position, options.use_norm,
            options.normalized_positions, options.eps)


def _empty(like: Tensor, t: Optional[Tensor]) -> Tensor:
    # the kernel's schema has no optional statistics: empty stands for none
    return like.new_empty(0) if t is None else t


def _overlaps(a: Tensor, b: Tensor) -> bool:
    return abs(a.data_ptr() - b.data_ptr()) < max(a.nbytes, b.nbytes)


def forward(c: Tensor, norm: Optional[BatchNorm], identity: Optional[Tensor],
            relu: bool, params: PRMParams, options: PRMOptions,
            inplace: bool = False) -> Forward:
    opts = _opts(options)
    if identity is not None:
        identity = identity.contiguous()
    if norm is None:
        y, *state = _ops().prm_forward(c.contiguous(), identity, relu,
                                       *params, *opts)
        return Forward(y, None, None, PRMState(*state))
    bn = (norm.weight, norm.bias, norm.running_mean, norm.running_var)
    if (inplace and not norm.training and c.is_contiguous()
            and (identity is None or not _overlaps(c, identity))):
        # inference: the result written over c (a conv's fresh output)
        _ops().bn_prm_eval_(c, *bn, norm.eps, identity, relu, *params, *opts)
        return Forward(c, None, None, None)
    y, save_mean, save_invstd, *state = _ops().bn_prm_forward(
        c.contiguous(), *bn, norm.training, norm.momentum, norm.eps,
        identity, relu, *params, *opts)
    if not norm.training:
        save_mean = save_invstd = None
    return Forward(y, save_mean, save_invstd, PRMState(*state))


def backward(grad_y: Tensor, saved: Saved, needs: Needs) -> Gradients:
    c, norm = saved.c.contiguous(), saved.norm
    grad_y = grad_y.contiguous()
    y = None if saved.y is None else saved.y.contiguous()
    opts = _opts(saved.options)
    if norm is None:
        grad_c, masked, *grads = _ops().prm_backward(
            grad_y, y, c, *saved.state, *saved.params, *opts)
        grad_bn_weight = grad_bn_bias = None
    else:
        (grad_c, grad_bn_weight, grad_bn_bias, masked,
         *grads) = _ops().bn_prm_backward(
             grad_y, y, c, norm.weight, norm.bias, norm.running_mean,
             norm.running_var, _empty(c, saved.save_mean),
             _empty(c, saved.save_invstd), norm.training, norm.eps,
             *saved.state, *saved.params, *opts, *needs)
        grad_bn_weight = grad_bn_weight if needs.bn_weight else None
        grad_bn_bias = grad_bn_bias if needs.bn_bias else None
    grad_identity = None
    if saved.has_identity:  # the block output's gradient, ReLU-masked
        grad_identity = masked if y is not None else grad_y
    return Gradients(grad_c if needs.c else None, grad_identity,
                     grad_bn_weight, grad_bn_bias, tuple(grads))
