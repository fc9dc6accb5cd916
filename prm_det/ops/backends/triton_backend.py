"""PRM's ``triton`` backend: launchers for :mod:`.triton_kernels`.

The default on CUDA. It reads float16, bfloat16, float32 and float64 maps
as they are (float32 accumulation, float64 for float64 maps), contiguous or
channels_last, and keeps nothing but :class:`PRMState` between forward and
backward. Besides the outputs, a call allocates only per-(sample, group)
and per-channel values. Triton is imported at the first call, so
``import prm_det`` does not need it; on a CPU tensor the kernels run through
Triton's interpreter when ``TRITON_INTERPRET=1`` was set before triton was
imported (the tests do this).
"""
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..contract import (BatchNorm, Forward, Gradients, Needs, PRMOptions,
                        PRMParams, PRMState, Saved)

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# elements of one [channels, positions] tile: forward, backward
_TILE = {'forward': 4096, 'backward': 2048}
_state = {'kernels': None, 'error': None}


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


def _blocks(cg: int, num_positions: int, tile: int) -> Tuple[int, int]:
    import triton
    block_c = triton.next_power_of_2(cg)
    block_p = max(16, min(triton.next_power_of_2(num_positions),
                          tile // block_c))
    return block_c, block_p


def _channel_tile(num_positions: int, tile: int = 1024) -> Tuple[int, int]:
    """[channels, positions] tile of the per-channel BatchNorm kernels: one
    channel per program on large maps, several on small ones."""
    _, block_p = _blocks(1, num_positions, tile)
    return max(1, tile // block_p), block_p


def _prm_grid(c: Tensor, n: int, cg: int, num_positions: int,
              tile: int) -> dict:
    """Tile sizes and grid of the PRM kernels: a program takes as many
    (sample, group) pairs as fill a tile when the maps are small, but on a
    GPU no fewer programs than ~4 per SM remain (an SM runs several)."""
    import triton
    block_c, block_p = _blocks(cg, num_positions, tile)
    g_block = max(1, tile // (block_c * block_p))
    if c.is_cuda:
        sms = torch.cuda.get_device_properties(c.device).multi_processor_count
        g_block = min(g_block, max(1, n // (4 * sms)))
    g_block = min(triton.next_power_of_2(g_block),
                  triton.next_power_of_2(n))
    g_block = 1 << (g_block.bit_length() - 1)  # a power of two, <= the cap
    return dict(grid=(triton.cdiv(n, g_block), ),
                meta=dict(n=n, G_BLOCK=g_block, BLOCK_C=block_c,
                          BLOCK_P=block_p))


def _geometry(c: Tensor, options: PRMOptions) -> dict:
    """The kernels' size arguments."""
    _, ch, h, w = c.shape
    num_positions = h * w
    return dict(
        groups=options.groups, cg=ch // options.groups, P=num_positions,
        W=w, inv_p=1.0 / num_positions,
        inv_pm1=1.0 / max(num_positions - 1, 1),
        inv_hm1=1.0 / max(h - 1, 1), inv_wm1=1.0 / max(w - 1, 1),
        eps=options.eps)


def _flags(options: PRMOptions) -> dict:
    return dict(USE_POS=options.use_position, USE_NORM=options.use_norm,
                NORMALIZED=options.normalized_positions)


def _affine(norm: BatchNorm, mean: Tensor,
            invstd: Tensor) -> Tuple[Tensor, Tensor]:
    """BatchNorm as x = c * a + shift per channel."""
    a = invstd if norm.weight is None else invstd * norm.weight.to(invstd)
    shift = -mean * a
    if norm.bias is not None:
        shift = shift + norm.bias.to(invstd)
    return a, shift


def _batch_statistics(c: Tensor, strides, norm: BatchNorm,
                      acc: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Mean and 1/std over the batch and positions per channel; updates
    the running statistics as ``native_batch_norm`` does."""
    k = _kernels()
    b, ch, h, w = c.shape
    count = b * h * w
    mean = torch.empty(ch, dtype=acc, device=c.device)
    var = torch.empty(ch, dtype=acc, device=c.device)
    block_ch, block_p = _channel_tile(h * w)
    k.channel_stats_kernel[(-(-ch // block_ch), )](
        c, mean, var, ch, b, h * w, 1.0 / count, *strides,
        BLOCK_CH=block_ch, BLOCK_P=block_p, ACC=_tl_acc(c))
    with torch.no_grad():
        momentum = norm.momentum
        if norm.running_mean is not None:
            norm.running_mean.mul_(1 - momentum).add_(
                mean.to(norm.running_mean.dtype), alpha=momentum)
        if norm.running_var is not None:
            unbiased = var * (count / max(count - 1, 1))
            norm.running_var.mul_(1 - momentum).add_(
                unbiased.to(norm.running_var.dtype), alpha=momentum)
    return mean, torch.rsqrt(var + norm.eps)


def _norm_statistics(norm: BatchNorm, acc: torch.dtype, save_mean,
                     save_invstd) -> Tuple[Tensor, Tensor]:
    if norm.training:
        return save_mean, save_invstd
    return (norm.running_mean.to(acc),
            torch.rsqrt(norm.running_var.to(acc) + norm.eps))


def forward(c: Tensor, norm: Optional[BatchNorm], identity: Optional[Tensor],
            relu: bool, params: PRMParams, options: PRMOptions,
            inplace: bool = False) -> Forward:
    k = _kernels()
    b, ch, h, w = c.shape
    n, cg = b * options.groups, ch // options.groups
    acc = _acc(c)
    c, strides = _flat(c)
    save_mean = save_invstd = a = shift = None
    if norm is not None:
        if norm.training:
            save_mean, save_invstd = _batch_statistics(c, strides, norm, acc)
        a, shift = _affine(norm, *_norm_statistics(norm, acc, save_mean,
                                                   save_invstd))
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
    if n == 0:
        return Forward(y, save_mean, save_invstd, state)
    launch = _prm_grid(c, n, cg, h * w, _TILE['forward'])
    state_args = state if state is not None else (y, ) * 4  # unused
    k.prm_forward_kernel[launch['grid']](
        c, c if identity is None else identity, y,
        c if a is None else a, c if shift is None else shift, *params,
        *state_args, **_geometry(c, options), **dict(zip(
            ('sx_b', 'sx_c', 'sx_p'), strides)),
        **dict(zip(('si_b', 'si_c', 'si_p'),
                   strides if identity is None else id_strides)),
        **dict(zip(('sy_b', 'sy_c', 'sy_p'), y_strides)),
        HAS_NORM=norm is not None, HAS_ID=identity is not None, RELU=relu,
        KEEP_STATE=state is not None, ACC=_tl_acc(c), **launch['meta'],
        **_flags(options))
    return Forward(y, save_mean, save_invstd, state)


def backward(grad_y: Tensor, saved: Saved, needs: Needs) -> Gradients:
    k = _kernels()
    options, norm, params = saved.options, saved.norm, saved.params
    c, strides = _flat(saved.c)
    b, ch, h, w = c.shape
    groups = options.groups
    n = b * groups
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
    partial = torch.zeros(n, 7, dtype=acc, device=c.device)
    bn_sums = torch.zeros(b, 2, ch, dtype=acc, device=c.device) \
        if norm is not None else partial
    if n > 0:
        launch = _prm_grid(c, n, ch // groups, h * w, _TILE['backward'])
        k.prm_backward_kernel[launch['grid']](
            grad_y, y, c, *(c if t is None else t
                            for t in (a, shift, mean, invstd)),
            *params, *saved.state, grad_c,
            grad_identity if write_identity else grad_c, partial, bn_sums,
            C=ch, **_geometry(c, options),
            **dict(zip(('sg_b', 'sg_c', 'sg_p'), g_strides)),
            **dict(zip(('sy_b', 'sy_c', 'sy_p'), y_strides)),
            **dict(zip(('sx_b', 'sx_c', 'sx_p'), strides)),
            **dict(zip(('so_b', 'so_c', 'so_p'), o_strides)),
            **dict(zip(('sd_b', 'sd_c', 'sd_p'), d_strides)),
            HAS_NORM=norm is not None,
            NORM_EVAL=norm is not None and not norm.training,
            WRITE_ID=write_identity, RELU=saved.y is not None,
            ACC=_tl_acc(c), **launch['meta'], **_flags(options))
    grad_bn_weight = grad_bn_bias = None
    if norm is not None:
        sum_gx, sum_gx_xhat = bn_sums.sum(0)  # [C] each
        if norm.training and n > 0:
            # dL/dc = a (gx - mean(gx) - xhat mean(gx xhat)), xhat = (c -
            # mean) invstd: A gx + B c + K per channel
            count = b * h * w
            mg, mgx = sum_gx / count, sum_gx_xhat / count
            coef = torch.stack([a, -a * invstd * mgx,
                                a * (mean * invstd * mgx - mg)])
            block_ch, block_p = _channel_tile(h * w)
            k.bn_backward_kernel[(b * -(-ch // block_ch),
                                  -(-h * w // block_p))](
                grad_c, c, coef, ch, h * w, *o_strides, *strides,
                BLOCK_CH=block_ch, BLOCK_P=block_p, ACC=_tl_acc(c))
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
