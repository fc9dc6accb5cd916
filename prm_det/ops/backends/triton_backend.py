"""PRM's ``triton`` backend: launchers for :mod:`.triton_kernels`.

The default on CUDA. It reads float16, bfloat16, float32 and float64 maps
as they are (float32 accumulation, float64 for float64 maps), contiguous or
channels_last, and keeps nothing but :class:`PRMState` between forward and
backward. Besides the outputs, a call allocates only per-(sample, group)
and per-channel values (each split's partial sums: see
:mod:`.triton_plan`). Every reduction is two-level in a fixed order, so a
call is deterministic: the same input gives the same bits.

Triton is imported at the first call, so ``import prm_det`` does not need
it; on a CPU tensor the kernels run through Triton's interpreter when
``TRITON_INTERPRET=1`` was set before triton was imported (the tests do
this).

Where Triton cannot compile a kernel or launch it on the user's GPU
(Triton's ``CompilationError``, ``OutOfResources`` or ``PTXASError``), the
backend warns once, naming the error, the GPU and ``PRM_DET_BACKEND=torch``,
marks its kernels broken here and raises :class:`KernelsBroken` (this call
and every later one); :mod:`prm_det.ops.backends` then runs the call on
its :func:`~prm_det.ops.backends.stand_in` and ``select`` names that for
later calls (the ``torch`` backend, which keeps the same state: a backward
whose forward ran here included). Any other error is raised as it is.
"""
import os
import warnings
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..contract import (BatchNorm, Forward, Gradients, KernelsBroken, Needs,
                        PRMOptions, PRMParams, PRMState, Saved)
from . import triton_plan

NAME = 'triton'  # what select and the custom ops call this backend
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# kernels: the module once imported (False: failed); error: why not;
# broken: why the kernels failed on this machine (then torch ops run)
_state = {'kernels': None, 'error': None, 'broken': None}
_sm_counts = {}


def _kernels():
    if _state['kernels'] is None:
        try:
            from . import triton_kernels
            _state['kernels'] = triton_kernels
        except Exception as exc:  # triton not installed, or broken
            _state['kernels'] = False
            _state['error'] = f'{type(exc).__name__}: {exc}'
    return _state['kernels'] or None


def available() -> bool:
    return _kernels() is not None


def unavailable_reason() -> Optional[str]:
    return _state['error']


def check(c: Tensor) -> Optional[str]:
    if c.dtype not in DTYPES:
        return ('the Triton kernels read float16, bfloat16, float32 and '
                'float64 maps')
    if c.is_cuda or (c.device.type == 'cpu'
                     and os.environ.get('TRITON_INTERPRET') == '1'):
        return None
    return ('Triton runs CUDA tensors, and CPU tensors only through its '
            'interpreter (TRITON_INTERPRET=1, set before triton is imported)')


# -- launching ---------------------------------------------------------------

def _launch(kernel, grid: Tuple[int, ...], num_warps: int, **args) -> None:
    """``kernel[grid](**args)``: the arguments are the kernel's own, each
    named by its launcher (Triton refuses a missing or unknown one).
    ``benchmarks/triton_launches.py`` replaces this function to record the
    launches instead of running them."""
    kernel[tuple(grid)](**args, num_warps=num_warps)


def sm_count(device: torch.device) -> int:
    """The GPU's SM count; :data:`triton_plan.SMS_ON_CPU` for CPU tensors."""
    if device.type != 'cuda':
        return triton_plan.SMS_ON_CPU
    index = device.index if device.index is not None else \
        torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(
            index).multi_processor_count
    return _sm_counts[index]


# -- the safe fallback -------------------------------------------------------

def _launch_errors() -> tuple:
    """Triton's errors of compiling a kernel or fitting it on the GPU: what
    the torch backend can stand in for. Anything else (a launcher's bug, an
    interpreter error, out of memory, a driver error) is raised."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources, PTXASError
    return (CompilationError, OutOfResources, PTXASError)


def _device_name(c: Tensor) -> str:
    if c.is_cuda:
        major, minor = torch.cuda.get_device_capability(c.device)
        return (f'{torch.cuda.get_device_name(c.device)} '
                f'(sm_{major}{minor})')
    return f'{c.device.type} (Triton interpreter)'


def _give_up(exc: Exception, c: Tensor) -> KernelsBroken:
    """Mark the kernels broken here and warn, once; the error to raise."""
    if _state['broken'] is None:
        _state['broken'] = f'{type(exc).__name__}: {exc}'
        warnings.warn(
            f'PRM: the Triton kernels cannot run on {_device_name(c)}: '
            f'{_state["broken"]}. PRM runs on the torch backend from now on '
            f'(same results, slower). To choose it from the start and '
            f'silence this: PRM_DET_BACKEND=torch.', RuntimeWarning,
            stacklevel=4)
    return KernelsBroken(NAME, _state['broken'])


def broken_reason() -> Optional[str]:
    """Why the kernels failed on this machine (None while they run)."""
    return _state['broken']


# -- the op -------------------------------------------------------------------

def _acc(c: Tensor) -> torch.dtype:
    return torch.float64 if c.dtype == torch.float64 else torch.float32


def _tl_acc(c: Tensor):
    import triton.language as tl
    return tl.float64 if c.dtype == torch.float64 else tl.float32


def _flat(t: Tensor) -> Tuple[Tensor, Tuple[int, int, int]]:
    """``t`` [b, C, h, w] with its positions at one stride (contiguous and
    channels_last maps are; anything else is copied), and its (sample,
    channel, position) strides."""
    _, _, h, w = t.shape
    if w == 1:
        return t, (t.stride(0), t.stride(1), t.stride(2))
    if h == 1 or t.stride(2) == w * t.stride(3):
        return t, (t.stride(0), t.stride(1), t.stride(3))
    t = t.contiguous()
    return t, (t.stride(0), t.stride(1), t.stride(3))


def _strides(prefix: str, strides: Tuple[int, int, int]) -> dict:
    return dict(zip((prefix + '_b', prefix + '_c', prefix + '_p'), strides))


class _Sizes(NamedTuple):
    """The kernels' size arguments of a map and its options."""
    groups: int
    cg: int
    C: int
    P: int
    W: int
    inv_p: float
    inv_pm1: float
    inv_hm1: float
    inv_wm1: float


def _sizes(c: Tensor, options: PRMOptions) -> _Sizes:
    _, ch, h, w = c.shape
    num_positions = h * w
    return _Sizes(options.groups, ch // options.groups, ch, num_positions, w,
                  1.0 / num_positions, 1.0 / max(num_positions - 1, 1),
                  1.0 / max(h - 1, 1), 1.0 / max(w - 1, 1))


def _prm_launch(c: Tensor, options: PRMOptions, kind: str):
    """The plan of the PRM kernels' launch, and its block sizes and
    accumulation type (the constexprs every PRM kernel takes)."""
    launch = triton_plan.prm_launch(tuple(c.shape), options.groups, kind,
                                    _acc(c).itemsize, sm_count(c.device))
    blocks = dict(G_BLOCK=launch.g_block, BLOCK_C=launch.block_c,
                  BLOCK_P=launch.block_p, ACC=_tl_acc(c))
    return launch, blocks


def _affine(norm: BatchNorm, mean: Tensor,
            invstd: Tensor) -> Tuple[Tensor, Tensor]:
    """BatchNorm as x = c * a + shift per channel."""
    a = invstd if norm.weight is None else invstd * norm.weight.to(invstd)
    shift = -mean * a
    if norm.bias is not None:
        shift = shift + norm.bias.to(invstd)
    return a, shift


def _batch_statistics_partials(c: Tensor, strides) -> dict:
    """BatchNorm's batch statistics, first level: each split's mean and M2
    per channel. The forward kernels merge them (second level) for their
    own channels; these are the arguments that tell them how."""
    k = _kernels()
    b, ch, h, w = c.shape
    acc = _acc(c)
    plan = triton_plan.channel_launch(tuple(c.shape), acc.itemsize,
                                      sm_count(c.device))
    partial = torch.empty(plan.splits, 2, ch, dtype=acc, device=c.device)
    sizes = dict(C=ch, B=b, P=h * w, psplits=plan.psplits,
                 samples=plan.samples)
    _launch(k.channel_partial_kernel, plan.grid, plan.num_warps, c_ptr=c,
            part_ptr=partial, chunk=plan.chunk, **_strides('s', strides),
            BLOCK_CH=plan.block_ch, BLOCK_P=plan.block_p, ACC=_tl_acc(c),
            **sizes)
    return dict(bn_part_ptr=partial, bn_chunk=plan.chunk,
                bn_splits=plan.splits, B=b, psplits=plan.psplits,
                samples=plan.samples,
                BN_SPLIT_BLOCK=triton_plan.next_power_of_2(plan.splits))


def _update_running(norm: BatchNorm, mean: Tensor, var: Tensor,
                    count: int) -> None:
    """The running statistics, as ``native_batch_norm`` updates them."""
    with torch.no_grad():
        momentum = norm.momentum
        if norm.running_mean is not None:
            norm.running_mean.mul_(1 - momentum).add_(
                mean.to(norm.running_mean.dtype), alpha=momentum)
        if norm.running_var is not None:
            unbiased = var * (count / max(count - 1, 1))
            norm.running_var.mul_(1 - momentum).add_(
                unbiased.to(norm.running_var.dtype), alpha=momentum)


def _norm_statistics(norm: BatchNorm, acc: torch.dtype, save_mean,
                     save_invstd) -> Tuple[Tensor, Tensor]:
    if norm.training:
        return save_mean, save_invstd
    return (norm.running_mean.to(acc),
            torch.rsqrt(norm.running_var.to(acc) + norm.eps))


def _check_not_broken() -> None:
    if _state['broken'] is not None:
        raise KernelsBroken(NAME, _state['broken'])


def forward(c: Tensor, norm: Optional[BatchNorm], identity: Optional[Tensor],
            relu: bool, params: PRMParams, options: PRMOptions,
            inplace: bool = False) -> Forward:
    """The op's forward on the kernels; :class:`KernelsBroken` where they
    cannot compile or launch here (nothing written to ``norm`` then)."""
    _check_not_broken()
    try:
        return _forward(c, norm, identity, relu, params, options, inplace)
    except _launch_errors() as exc:
        raise _give_up(exc, c) from exc


def backward(grad_y: Tensor, saved: Saved, needs: Needs) -> Gradients:
    """The op's backward on the kernels; :class:`KernelsBroken` where they
    cannot compile or launch here."""
    _check_not_broken()
    try:
        return _backward(grad_y, saved, needs)
    except _launch_errors() as exc:
        raise _give_up(exc, saved.c) from exc


def _forward(c: Tensor, norm: Optional[BatchNorm],
             identity: Optional[Tensor], relu: bool, params: PRMParams,
             options: PRMOptions, inplace: bool) -> Forward:
    k = _kernels()
    b, ch, h, w = c.shape
    n, cg = b * options.groups, ch // options.groups
    acc = _acc(c)
    c, strides = _flat(c)
    save_mean = save_invstd = a = shift = batch_var = None
    bn_args = dict(bn_part_ptr=c, B=b, bn_chunk=1, psplits=1, samples=1,
                   bn_splits=0, BN_SPLIT_BLOCK=1)  # unused without BN_TRAIN
    bn_train = norm is not None and norm.training
    if bn_train:
        bn_args = _batch_statistics_partials(c, strides)
        save_mean, batch_var, save_invstd = (
            torch.empty(ch, dtype=acc, device=c.device) for _ in range(3))
    elif norm is not None:
        a, shift = _affine(norm, *_norm_statistics(norm, acc, None, None))
    weight = bias = c  # unused without BN_TRAIN
    if bn_train:
        weight = norm.weight if norm.weight is not None else torch.ones(
            ch, dtype=acc, device=c.device)
        bias = norm.bias if norm.bias is not None else torch.zeros(
            ch, dtype=acc, device=c.device)
    if identity is not None:
        identity, id_strides = _flat(identity)
    # inference may write over c: each value is read before it is written
    over_c = inplace and (identity is None or abs(
        identity.data_ptr() - c.data_ptr()) >= max(c.nbytes,
                                                   identity.nbytes))
    y = c if over_c else torch.empty_like(c)
    y, y_strides = _flat(y)
    state = None
    if not over_c:
        state = PRMState(
            torch.empty(n, dtype=torch.int64, device=c.device),
            torch.empty(n, cg, dtype=acc, device=c.device),
            torch.empty(n, cg, dtype=acc, device=c.device),
            torch.empty(n, 2, dtype=acc, device=c.device))
    if n > 0:
        launch, blocks = _prm_launch(c, options, 'forward')
        grid, warps, splits = launch.grid, launch.num_warps, launch.splits
        z = _sizes(c, options)
        sum_ptr = torch.empty(n, splits, cg, dtype=acc, device=c.device)
        best_ptr = torch.empty(n, splits, dtype=acc, device=c.device)
        idx_ptr = torch.empty(n, splits, dtype=torch.int32, device=c.device)
        s_ptr = torch.empty(n, splits, 2, dtype=acc, device=c.device)
        a_ptr = c if a is None else a
        shift_ptr = c if shift is None else shift
        sx = _strides('sx', strides)
        # BatchNorm's batch statistics, merged by each kernel for its
        # channels (the partials' layout, the affine, eps)
        bn = dict(bn_args, C=ch, bn_weight_ptr=weight, bn_bias_ptr=bias,
                  bn_eps=norm.eps if norm is not None else 0.0)
        split_block = triton_plan.next_power_of_2(splits)
        _launch(k.fwd_sums_kernel, grid, warps, x_ptr=c, a_ptr=a_ptr,
                shift_ptr=shift_ptr, sum_ptr=sum_ptr, best_ptr=best_ptr,
                idx_ptr=idx_ptr, **bn,
                save_mean_ptr=save_mean if bn_train else c,
                save_var_ptr=batch_var if bn_train else c,
                save_invstd_ptr=save_invstd if bn_train else c, n=n,
                groups=z.groups, cg=z.cg, P=z.P, chunk=launch.chunk,
                splits=splits, **sx, HAS_NORM=norm is not None,
                BN_TRAIN=bn_train, SPLIT_BLOCK=split_block, **blocks)
        if options.use_norm:
            _launch(k.fwd_stats_kernel, grid, warps, x_ptr=c, a_ptr=a_ptr,
                    shift_ptr=shift_ptr, alpha_ptr=params.zero,
                    beta_ptr=params.one, theta_ptr=params.theta,
                    sigma_ptr=params.scale, sum_ptr=sum_ptr,
                    best_ptr=best_ptr, idx_ptr=idx_ptr, s_ptr=s_ptr, **bn,
                    n=n, groups=z.groups, cg=z.cg, P=z.P, W=z.W,
                    chunk=launch.chunk, splits=splits, inv_p=z.inv_p,
                    inv_hm1=z.inv_hm1, inv_wm1=z.inv_wm1, **sx,
                    HAS_NORM=norm is not None, BN_TRAIN=bn_train,
                    USE_POS=options.use_position,
                    NORMALIZED=options.normalized_positions,
                    SPLIT_BLOCK=split_block, **blocks)
        qi_ptr, q_ptr, z_ptr, stats_ptr = (
            state if state is not None else (y, ) * 4)  # unused: no state
        _launch(k.fwd_out_kernel, grid, warps, x_ptr=c,
                id_ptr=c if identity is None else identity, y_ptr=y,
                a_ptr=a_ptr, shift_ptr=shift_ptr, lam_ptr=params.weight,
                xi_ptr=params.bias, beta_ptr=params.one,
                alpha_ptr=params.zero, theta_ptr=params.theta,
                sigma_ptr=params.scale, sum_ptr=sum_ptr, best_ptr=best_ptr,
                idx_ptr=idx_ptr, s_ptr=s_ptr, qi_ptr=qi_ptr, q_ptr=q_ptr,
                z_ptr=z_ptr, stats_ptr=stats_ptr, **bn, n=n,
                groups=z.groups, cg=z.cg, P=z.P, W=z.W, chunk=launch.chunk,
                splits=splits, inv_p=z.inv_p, inv_pm1=z.inv_pm1,
                inv_hm1=z.inv_hm1, inv_wm1=z.inv_wm1, eps=options.eps, **sx,
                **_strides('si', strides if identity is None else id_strides),
                **_strides('sy', y_strides), HAS_NORM=norm is not None,
                BN_TRAIN=bn_train, HAS_ID=identity is not None, RELU=relu,
                USE_POS=options.use_position, USE_NORM=options.use_norm,
                NORMALIZED=options.normalized_positions,
                KEEP_STATE=state is not None, SPLIT_BLOCK=split_block,
                **blocks)
    if batch_var is not None:  # once every kernel is launched
        _update_running(norm, save_mean, batch_var, b * h * w)
    return Forward(y, save_mean, save_invstd, state)


def _backward(grad_y: Tensor, saved: Saved, needs: Needs) -> Gradients:
    k = _kernels()
    options, norm, params = saved.options, saved.norm, saved.params
    c, strides = _flat(saved.c)
    b, ch, h, w = c.shape
    groups = options.groups
    n, cg = b * groups, ch // groups
    acc = _acc(c)
    grad_y, g_strides = _flat(grad_y)
    y, y_strides = _flat(saved.y if saved.y is not None else grad_y)
    a = shift = mean = invstd = None
    if norm is not None:
        mean, invstd = _norm_statistics(norm, acc, saved.save_mean,
                                        saved.save_invstd)
        a, shift = _affine(norm, mean, invstd)
    grad_c = torch.empty_like(c)
    grad_c, o_strides = _flat(grad_c)
    write_identity = saved.has_identity and saved.y is not None
    grad_identity = grad_y if saved.has_identity else None
    if write_identity:
        grad_identity = torch.empty_like(grad_y)
        grad_identity, d_strides = _flat(grad_identity)
    else:
        d_strides = o_strides
    launch, blocks = _prm_launch(c, options, 'backward')
    splits = launch.splits
    partial = torch.zeros(n, 7, dtype=acc, device=c.device)
    bn_sums = torch.zeros(b, splits, 2, ch, dtype=acc, device=c.device) \
        if norm is not None else partial
    if n > 0:
        grid, warps = launch.grid, launch.num_warps
        z = _sizes(c, options)
        pair_ptr = torch.empty(n, splits, 32, dtype=acc, device=c.device)
        chan_ptr = torch.empty(n, splits, 6, cg, dtype=acc, device=c.device)
        a_ptr = c if a is None else a
        shift_ptr = c if shift is None else shift
        qi_ptr, q_ptr, z_ptr, stats_ptr = saved.state
        prm = dict(lam_ptr=params.weight, xi_ptr=params.bias,
                   beta_ptr=params.one, alpha_ptr=params.zero,
                   theta_ptr=params.theta, sigma_ptr=params.scale,
                   qi_ptr=qi_ptr, q_ptr=q_ptr, z_ptr=z_ptr,
                   stats_ptr=stats_ptr)
        maps = dict(**_strides('sg', g_strides), **_strides('sy', y_strides),
                    **_strides('sx', strides))
        flags = dict(HAS_NORM=norm is not None, RELU=saved.y is not None,
                     USE_POS=options.use_position,
                     USE_NORM=options.use_norm,
                     NORMALIZED=options.normalized_positions)
        _launch(k.bwd_sums_kernel, grid, warps, gy_ptr=grad_y, y_ptr=y,
                x_ptr=c, a_ptr=a_ptr, shift_ptr=shift_ptr, **prm,
                pair_ptr=pair_ptr, chan_ptr=chan_ptr, n=n, groups=z.groups,
                cg=z.cg, P=z.P, W=z.W, chunk=launch.chunk, splits=splits,
                inv_hm1=z.inv_hm1, inv_wm1=z.inv_wm1, eps=options.eps,
                **maps, **flags, **blocks)
        _launch(k.bwd_out_kernel, grid, warps, gy_ptr=grad_y, y_ptr=y,
                x_ptr=c, a_ptr=a_ptr, shift_ptr=shift_ptr,
                mean_ptr=c if mean is None else mean,
                invstd_ptr=c if invstd is None else invstd, **prm,
                pair_ptr=pair_ptr, chan_ptr=chan_ptr, gx_ptr=grad_c,
                gid_ptr=grad_identity if write_identity else grad_c,
                pgrad_ptr=partial, bn_sums_ptr=bn_sums, n=n,
                groups=z.groups, cg=z.cg, C=z.C, P=z.P, W=z.W,
                chunk=launch.chunk, splits=splits, inv_p=z.inv_p,
                inv_pm1=z.inv_pm1, inv_hm1=z.inv_hm1, inv_wm1=z.inv_wm1,
                eps=options.eps, **maps, **_strides('so', o_strides),
                **_strides('sd', d_strides),
                NORM_EVAL=norm is not None and not norm.training,
                WRITE_ID=write_identity,
                SPLIT_BLOCK=triton_plan.next_power_of_2(splits), **flags,
                **blocks)
    grad_bn_weight = grad_bn_bias = None
    if norm is not None:
        sum_gx, sum_gx_xhat = bn_sums.sum((0, 1))  # [C] each
        if norm.training and n > 0:
            # dL/dc = a (gx - mean(gx) - xhat mean(gx xhat)), xhat = (c -
            # mean) invstd: A gx + B c + K per channel
            count = b * h * w
            mg, mgx = sum_gx / count, sum_gx_xhat / count
            coef = torch.stack([a, -a * invstd * mgx,
                                a * (mean * invstd * mgx - mg)])
            tiles = triton_plan.bn_backward_launch(tuple(c.shape),
                                                   acc.itemsize)
            _launch(k.bn_backward_kernel, tiles.grid, tiles.num_warps,
                    gx_ptr=grad_c, c_ptr=c, coef_ptr=coef, C=ch, P=h * w,
                    **_strides('s', o_strides), **_strides('sc', strides),
                    BLOCK_CH=tiles.block_ch, BLOCK_P=tiles.block_p,
                    ACC=_tl_acc(c))
        if needs.bn_weight:
            grad_bn_weight = sum_gx_xhat.to(norm.weight.dtype)
        if needs.bn_bias:
            grad_bn_bias = sum_gx.to(norm.bias.dtype)
    per_group = partial.view(b, groups, 7).sum(0)  # [g, 7]
    shared = per_group[:, 4:].sum(0)  # theta_row, theta_col, sigma
    grad_params = (per_group[:, 0], per_group[:, 1], per_group[:, 2],
                   per_group[:, 3], shared[:2], shared[2:])
    grad_params = tuple(g.reshape(p.shape).to(p.dtype)
                        for g, p in zip(grad_params, params))
    return Gradients(grad_c if needs.c else None, grad_identity,
                     grad_bn_weight, grad_bn_bias, grad_params)


def run_guarded(c, launch):
    """``launch()``, turning Triton's compile and fit errors into
    KernelsBroken (warned once): the gate tails' and the local relation
    op's launchers, which then fall back to torch ops."""
    _check_not_broken()
    try:
        return launch()
    except _launch_errors() as exc:
        raise _give_up(exc, c) from exc
