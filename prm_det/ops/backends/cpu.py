"""PRM's ``cpu`` backend: the compiled C++/OpenMP kernel (``../csrc``).

The kernel runs PRM's forward and backward one channel group at a time while
the group's block sits in cache: three passes over the map in forward (after
one for BatchNorm's batch statistics in training) and two in backward,
mostly from cache, against the dozens of eager passes torch ops need.
BatchNorm is applied as the passes read the convolution's output, so its
normalized map is never written, and its backward is fused in. It is built
at first use (``make setup`` builds it once, saying so) with torch's C++
extension builder for the instruction set this CPU runs, so one cache may
serve machines of different kinds. Where it cannot be built,
:func:`available` is False (with a one-time warning naming the reason) and
PRM runs on the ``torch`` backend.

The build directory is one per source and toolchain (:func:`build_directory`:
the sources' location and contents, the compiler, flags, torch and Python),
so two checkouts or environments on one machine never rebuild each other's
kernel. Builders of one directory take turns on an OS file lock, which the
OS releases when its holder dies: a build killed half way leaves nothing
that blocks the next one (torch's own ``lock`` file, which a kill leaves
behind and every later build would wait on forever, is removed under it).
"""
import contextlib
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from typing import Optional

import torch
from torch import Tensor

from ..contract import (BatchNorm, Forward, Gradients, Needs, PRMOptions,
                        PRMParams, PRMState, Saved, norm_tensors)

try:
    import fcntl
except ImportError:  # not a POSIX system: torch's lock file alone
    fcntl = None

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'csrc')
# instruction-set flags for torch's reported CPU capability
_ISA_FLAGS = {
    'AVX512': ['-mavx512f', '-mavx512bw', '-mavx512vl', '-mavx512dq',
               '-mavx2', '-mfma'],
    'AVX2': ['-mavx2', '-mfma'],
}
NAME = 'cpu'  # what select and the custom ops call this backend
DTYPES = (torch.float32, torch.float64)  # what the kernel computes in
BUILD_TIME = '20-60 s'  # a first build on 2 cores, idle to busy

_lock = threading.Lock()
_state = {'loaded': None, 'error': None, 'warned': False}


def sources(csrc: str = _CSRC) -> list:
    """The kernel's C++ sources (headers are found next to them)."""
    return sorted(glob.glob(os.path.join(csrc, '*.cpp')))


def _capability() -> str:
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        cap = 'DEFAULT'
    return cap if cap in _ISA_FLAGS else 'DEFAULT'


def compile_flags(isa: str) -> list:
    """The kernel's compiler flags for an instruction set ('AVX512',
    'AVX2' or 'DEFAULT'), besides the ``-std=`` torch's builder adds (C++17
    before torch 2.13, C++20 since: the sources are both)."""
    # -fno-math-errno: lets loops with a square root vectorize (errno is
    # never read here)
    return ['-O3', '-fopenmp', '-fno-math-errno', *_ISA_FLAGS.get(isa, [])]


def _cflags() -> list:
    return compile_flags(_capability())


def compiler_identity() -> str:
    """The C++ compiler torch's builder will call (``$CXX`` or ``c++``):
    its resolved path and first line of ``--version``."""
    cxx = os.environ.get('CXX', 'c++')
    path = shutil.which(cxx)
    if path is None:
        return f'{cxx} (not found)'
    try:
        version = subprocess.run(
            [path, '--version'], capture_output=True, text=True,
            timeout=30).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError):
        version = []
    return f'{os.path.realpath(path)} {" ".join(version)}'


def build_key(csrc: str = _CSRC) -> str:
    """A digest of what the built library depends on: where its sources
    are and what they say, the compiler, flags, and the torch and Python it
    is built against (version and location: each environment its own)."""
    digest = hashlib.sha256()
    for part in (os.path.realpath(csrc), compiler_identity(),
                 ' '.join(_cflags()), torch.__version__,
                 str(getattr(torch.version, 'git_version', '')),
                 os.path.realpath(os.path.dirname(torch.__file__)),
                 sys.version, os.path.realpath(sys.prefix)):
        digest.update(part.encode() + b'\0')
    for path in sorted(glob.glob(os.path.join(csrc, '*'))):
        digest.update(os.path.basename(path).encode() + b'\0')
        with open(path, 'rb') as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


def extension_name(csrc: str = _CSRC) -> str:
    """Name of the built library: instruction set and torch version in it,
    so a shared cache never hands a machine code it cannot run, and
    :func:`build_key`, so each source and toolchain has its own."""
    version = re.sub(r'[^0-9a-zA-Z]+', '_', torch.__version__)
    return (f'prm_det_cpu_{_capability().lower()}_torch{version}_'
            f'{build_key(csrc)}')


def extensions_root() -> str:
    """torch's extension cache: ``$TORCH_EXTENSIONS_DIR``, or
    ``~/.cache/torch_extensions/py3X_<accelerator>``."""
    from torch.utils import cpp_extension
    root = os.environ.get('TORCH_EXTENSIONS_DIR')
    if root is None:
        accelerator = ('cu' + torch.version.cuda.replace('.', '')
                       if torch.version.cuda else 'cpu')
        root = os.path.join(
            cpp_extension.get_default_build_root(),
            f'py{sys.version_info.major}{sys.version_info.minor}'
            f'{getattr(sys, "abiflags", "")}_{accelerator}')
    return root


def build_directory(csrc: str = _CSRC) -> str:
    return os.path.join(extensions_root(), extension_name(csrc))


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


def _say(message: str) -> None:
    print(f'prm_det: {message}', file=sys.stderr, flush=True)


@contextlib.contextmanager
def build_lock(directory: str):
    """Hold ``directory``'s build lock: an OS file lock (``flock``) that the
    OS releases when the holder exits or is killed. While it is held, a
    ``lock`` file torch's builder left (a build killed before it could
    remove it) is stale and removed: torch would wait on it forever."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, 'prm_det_build.lock')
    with open(path, 'a+') as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or 'another process'
                _say(f'waiting for {holder}, which is building the PRM CPU '
                     f'kernel in {directory}')
                fcntl.flock(handle, fcntl.LOCK_EX)
            handle.seek(0)
            handle.truncate()
            handle.write(f'process {os.getpid()}')
            handle.flush()
        stale = os.path.join(directory, 'lock')
        if fcntl is not None and os.path.exists(stale):
            os.remove(stale)
        try:
            yield
        finally:
            if fcntl is not None:
                handle.seek(0)
                handle.truncate()
                fcntl.flock(handle, fcntl.LOCK_UN)


def _library(directory: str, name: str) -> str:
    return os.path.join(directory, f'{name}.so')


def build(verbose: bool = False) -> None:
    """Compile (or load from torch's extension cache) the kernel; raises on
    failure. ``make setup`` calls this so the first training does not. A
    first build says so before it starts and when it is done."""
    from torch.utils import cpp_extension
    name = extension_name()
    directory = build_directory()
    with build_lock(directory), _venv_bin_on_path():
        fresh = not os.path.exists(_library(directory, name))
        if fresh:
            _say(f'compiling the PRM CPU kernel for this machine, once '
                 f'({BUILD_TIME}; cached in {directory})')
        start = time.monotonic()
        cpp_extension.load(
            name=name,
            sources=sources(),
            extra_include_paths=[_CSRC],
            extra_cflags=_cflags(),
            extra_ldflags=['-fopenmp'],
            build_directory=directory,
            is_python_module=False,
            verbose=verbose)
        if fresh:
            _say(f'PRM CPU kernel compiled in {time.monotonic() - start:.0f}'
                 f' s')


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


def _kernel_options(options: PRMOptions) -> dict:
    """PRM's options as the kernel ops' keyword arguments (their schemas
    take scalars; the kernel builds its ``Options`` struct from them): the
    one conversion of the options on this backend."""
    return dict(groups=options.groups, use_position=options.use_position,
                use_norm=options.use_norm,
                normalized=options.normalized_positions,
                eps=float(options.eps))


def _or_empty(like: Tensor, t: Optional[Tensor]) -> Tensor:
    # the kernel's schema has no optional statistics: empty stands for none
    return like.new_empty(0) if t is None else t


def _overlaps(a: Tensor, b: Tensor) -> bool:
    return abs(a.data_ptr() - b.data_ptr()) < max(a.nbytes, b.nbytes)


def forward(c: Tensor, norm: Optional[BatchNorm], identity: Optional[Tensor],
            relu: bool, params: PRMParams, options: PRMOptions,
            inplace: bool = False) -> Forward:
    kernel_options = _kernel_options(options)
    if identity is not None:
        identity = identity.contiguous()
    if norm is None:
        y, *state = _ops().prm_forward(c.contiguous(), identity, relu,
                                       *params, **kernel_options)
        return Forward(y, None, None, PRMState(*state))
    bn = norm_tensors(norm)
    if (inplace and not norm.training and c.is_contiguous()
            and (identity is None or not _overlaps(c, identity))):
        # inference: the result written over c (a conv's fresh output)
        _ops().bn_prm_eval_(c, *bn, norm.eps, identity, relu, *params,
                            **kernel_options)
        return Forward(c, None, None, None)
    y, save_mean, save_invstd, *state = _ops().bn_prm_forward(
        c.contiguous(), *bn, norm.training, norm.momentum, norm.eps,
        identity, relu, *params, **kernel_options)
    if not norm.training:
        save_mean = save_invstd = None
    return Forward(y, save_mean, save_invstd, PRMState(*state))


def backward(grad_y: Tensor, saved: Saved, needs: Needs) -> Gradients:
    c, norm = saved.c.contiguous(), saved.norm
    grad_y = grad_y.contiguous()
    y = None if saved.y is None else saved.y.contiguous()
    kernel_options = _kernel_options(saved.options)
    if norm is None:
        grad_c, masked, *grads = _ops().prm_backward(
            grad_y, y, c, *saved.state, *saved.params, **kernel_options)
        grad_bn_weight = grad_bn_bias = None
    else:
        (grad_c, grad_bn_weight, grad_bn_bias, masked,
         *grads) = _ops().bn_prm_backward(
             grad_y, y, c, *norm_tensors(norm), _or_empty(c, saved.save_mean),
             _or_empty(c, saved.save_invstd), norm.training, norm.eps,
             *saved.state, *saved.params, **kernel_options,
             need_c=needs.c, need_bn_weight=needs.bn_weight,
             need_bn_bias=needs.bn_bias)
        grad_bn_weight = grad_bn_weight if needs.bn_weight else None
        grad_bn_bias = grad_bn_bias if needs.bn_bias else None
    grad_identity = None
    if saved.has_identity:  # the block output's gradient, ReLU-masked
        grad_identity = masked if y is not None else grad_y
    return Gradients(grad_c if needs.c else None, grad_identity,
                     grad_bn_weight, grad_bn_bias, tuple(grads))
