"""PRM's compiled CPU kernel (csrc/prm_cpu.cpp): built at first use, cached.

The kernel runs PRM's forward and backward one channel group at a time while
the group's block sits in cache: three passes over the map in forward (after
one for BatchNorm's batch statistics in training) and three in backward,
mostly from cache, against the dozens of eager passes torch ops need. It is
compiled with torch's C++ extension builder (a C++ compiler and ninja;
``make setup`` builds it once) for the instruction set this CPU runs
(torch's own CPU capability), so one cache may serve machines of different
kinds.

Where it cannot be built, PRM runs its torch-ops path with the same results
and a one-time warning naming the reason. ``PRM_DET_CPU_KERNEL=0`` turns the
kernel off (read once, when PRM first asks for the kernel);
:func:`kernel_disabled` does so within a ``with`` block (tests and benchmarks
compare both paths).
"""
import contextlib
import os
import re
import sys
import threading
import warnings
from typing import Optional

import torch

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc',
                       'prm_cpu.cpp')
# instruction-set flags for torch's reported CPU capability
_ISA_FLAGS = {
    'AVX512': ['-mavx512f', '-mavx512bw', '-mavx512vl', '-mavx512dq',
               '-mavx2', '-mfma'],
    'AVX2': ['-mavx2', '-mfma'],
}
ENV_SWITCH = 'PRM_DET_CPU_KERNEL'
DTYPES = (torch.float32, torch.float64)  # what the kernel computes in

_lock = threading.Lock()
# enabled: PRM_DET_CPU_KERNEL, read once, when the kernel is first asked for
# (PRM asks on every block's forward, where an environment lookup costs more
# than it should)
_state = {'enabled': None, 'loaded': None, 'error': None, 'warned': False,
          'disabled': 0}


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
            sources=[_SOURCE],
            # -fno-math-errno: lets loops with a square root vectorize
            # (errno is never read here)
            extra_cflags=['-O3', '-fopenmp', '-fno-math-errno',
                          *_ISA_FLAGS.get(_capability(), [])],
            extra_ldflags=['-fopenmp'],
            is_python_module=False,
            verbose=verbose)


def _enabled_by_env() -> bool:
    return os.environ.get(ENV_SWITCH, '1').strip().lower() not in (
        '0', 'false', 'no', 'off')


def available() -> bool:
    """Whether PRM on CPU runs the compiled kernel (building it on the first
    call). False when turned off or when it cannot be built (warns once)."""
    if _state['disabled']:
        return False
    if _state['enabled'] is None:
        _state['enabled'] = _enabled_by_env()
    if not _state['enabled']:
        return False
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
            f'{error()}. Fix: install a C++ compiler and ninja (make setup '
            f'does), or set {ENV_SWITCH}=0 to silence this.')
    return bool(_state['loaded'])


def error() -> Optional[str]:
    """Why the kernel could not be built, if it could not."""
    return _state['error']


@contextlib.contextmanager
def kernel_disabled():
    """Run PRM on torch ops inside the block (for comparisons)."""
    _state['disabled'] += 1
    try:
        yield
    finally:
        _state['disabled'] -= 1


def use_kernel(x: torch.Tensor) -> bool:
    """Whether PRM on ``x`` should take the compiled kernel."""
    return (x.device.type == 'cpu'
            and x.dtype in DTYPES and available())


def ops():
    """The kernel's operators: ``prm_forward`` and ``prm_backward``,
    ``bn_prm_forward`` and ``bn_prm_backward`` (BatchNorm fused in), and
    ``bn_prm_eval_`` (inference, the result written over its input)."""
    return torch.ops.prm_det
