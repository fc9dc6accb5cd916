"""The gate tail on Triton (:mod:`.gate_triton_kernels`): the ``triton``
backend of ``prm_det::gate_moments`` and ``prm_det::gate_tail``.

Shares the PRM backend's Triton state (:mod:`.triton_backend`): triton is
imported at the first call, CPU tensors run through the interpreter under
``TRITON_INTERPRET=1``, and a kernel Triton cannot compile or fit on this
GPU marks the Triton kernels broken (one warning), raising
:class:`~prm_det.ops.contract.KernelsBroken`: the op then runs the call on
torch ops, and ``select`` names the torch backend from then on.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import triton_backend as tb

BLOCK_P = 512  # positions per program
NUM_WARPS = 4


def _kernels():
    from . import gate_triton_kernels
    return gate_triton_kernels


def _position_strides(t: Tensor) -> Tuple[Tensor, Tuple[int, int, int]]:
    """``t`` with its positions at one stride (copied when they are not) and
    its (sample, channel, position) strides."""
    return tb._flat(t)


def _like(t: Optional[Tensor], c: Tensor) -> Optional[Tensor]:
    """``t`` laid out as ``c`` (the kernels address every map with c's
    strides)."""
    if t is None or t.stride() == c.stride():
        return t
    return torch.empty_like(c, dtype=t.dtype).copy_(t)



def moments(c: Tensor) -> Tuple[Tensor, Tensor]:
    c, strides = _position_strides(c)
    b, ch, h, w = c.shape
    acc = tb._acc(c)
    mean = torch.empty(b, ch, dtype=acc, device=c.device)
    m2 = torch.empty_like(mean)

    def launch():
        tb._launch(_kernels().moments_kernel, (b * ch, ), NUM_WARPS,
                   c_ptr=c, mean_ptr=mean, m2_ptr=m2, C=ch, P=h * w,
                   s_b=strides[0], s_c=strides[1], s_p=strides[2],
                   BLOCK_P=BLOCK_P, ACC=tb._tl_acc(c))
        return mean, m2

    return tb.run_guarded(c, launch)


PROGRAMS_PER_SM = 4  # the channel split aims at this many programs


def _gate_args(c: Tensor, gate: Optional[Tensor],
               gate_affine: Optional[Tensor]) -> dict:
    """The kernels' gate arguments, and the grid: (sample, group) pairs x
    position splits x channel splits, the channels split only as far as it
    takes to give every SM ``PROGRAMS_PER_SM`` programs."""
    b, ch, h, w = c.shape
    groups = ch if gate is None else gate.shape[1]
    cg = ch // groups
    splits = triton_cdiv(h * w, BLOCK_P)
    wanted = PROGRAMS_PER_SM * tb.sm_count(c.device)
    csplits = min(cg, triton_cdiv(wanted, b * groups * splits))
    ch_chunk = triton_cdiv(cg, csplits)
    csplits = triton_cdiv(cg, ch_chunk)
    return dict(groups=groups, cg=cg, ch_chunk=ch_chunk,
                HAS_GATE=gate is not None, HAS_AFFINE=gate_affine is not None,
                grid=(b * groups, splits, csplits))


def tail_forward(c: Tensor, identity: Optional[Tensor], scale: Tensor,
                 shift: Tensor, gate: Optional[Tensor],
                 gate_affine: Optional[Tensor], relu: bool) -> Tensor:
    c, strides = _position_strides(c)
    identity = _like(identity, c)
    b, ch, h, w = c.shape
    y = torch.empty_like(c)
    gate = None if gate is None else gate.contiguous()
    gate_affine = None if gate_affine is None else gate_affine.contiguous()
    args = _gate_args(c, gate, gate_affine)
    grid = args.pop('grid')

    def launch():
        tb._launch(_kernels().tail_fwd_kernel, grid, NUM_WARPS, c_ptr=c,
                   id_ptr=identity if identity is not None else c,
                   scale_ptr=scale.contiguous(),
                   shift_ptr=shift.contiguous(),
                   gate_ptr=gate if gate is not None else scale,
                   affine_ptr=gate_affine if gate_affine is not None else
                   scale, y_ptr=y, C=ch, P=h * w, s_b=strides[0],
                   s_c=strides[1], s_p=strides[2],
                   HAS_ID=identity is not None, RELU=relu, BLOCK_P=BLOCK_P,
                   ACC=tb._tl_acc(c), **args)
        return y

    return tb.run_guarded(c, launch)


def tail_backward(grad_y: Tensor, c: Tensor, y: Optional[Tensor],
                  scale: Tensor, shift: Tensor, gate: Optional[Tensor],
                  gate_affine: Optional[Tensor], has_identity: bool):
    """(grad_c, masked grad_y or None, grad_scale, grad_shift, grad_gate or
    None, grad_gate_affine or None)."""
    c, strides = _position_strides(c)
    grad_y, y = _like(grad_y, c), _like(y, c)
    b, ch, h, w = c.shape
    num_positions = h * w
    splits = triton_cdiv(num_positions, BLOCK_P)
    gate = None if gate is None else gate.contiguous()
    gate_affine = None if gate_affine is None else gate_affine.contiguous()
    args = _gate_args(c, gate, gate_affine)
    grid = args.pop('grid')
    pairs, csplits = grid[0], grid[2]
    acc = tb._acc(c)
    grad_c = torch.empty_like(c)
    write_masked = has_identity and y is not None
    masked = torch.empty_like(grad_y) if write_masked else None
    grad_gate = None if gate is None else torch.empty_like(gate)
    partial = torch.empty(b * ch, splits, 2, dtype=acc, device=c.device)
    d_gate = (None if gate is None else torch.empty(
        csplits, pairs, num_positions, dtype=acc, device=c.device))
    partial_affine = (None if gate_affine is None else torch.empty(
        pairs, splits, 2, dtype=acc, device=c.device))

    def launch():
        kernels = _kernels()
        tb._launch(kernels.tail_bwd_kernel, grid, NUM_WARPS, gy_ptr=grad_y,
                   c_ptr=c,
                   y_ptr=y if y is not None else c,
                   scale_ptr=scale.contiguous(),
                   shift_ptr=shift.contiguous(),
                   gate_ptr=gate if gate is not None else scale,
                   affine_ptr=gate_affine if gate_affine is not None else
                   scale, gc_ptr=grad_c,
                   masked_ptr=masked if masked is not None else grad_c,
                   dgate_ptr=d_gate if d_gate is not None else partial,
                   part_ptr=partial, C=ch, P=num_positions, splits=splits,
                   s_b=strides[0], s_c=strides[1], s_p=strides[2],
                   HAS_Y=y is not None, WRITE_MASKED=write_masked,
                   BLOCK_P=BLOCK_P, ACC=tb._tl_acc(c), **args)
        if gate is not None:
            tb._launch(kernels.gate_grad_kernel, (pairs, splits), NUM_WARPS,
                       dgate_ptr=d_gate, gate_ptr=gate,
                       affine_ptr=gate_affine if gate_affine is not None
                       else gate, ggate_ptr=grad_gate,
                       part_affine_ptr=partial_affine if partial_affine is
                       not None else partial, P=num_positions,
                       csplits=csplits, splits=splits,
                       HAS_AFFINE=gate_affine is not None, BLOCK_P=BLOCK_P,
                       ACC=tb._tl_acc(c))

    tb.run_guarded(c, launch)
    sums = partial.sum(1).view(b, ch, 2)  # the splits, in a fixed order
    grad_affine = None
    if partial_affine is not None:
        grad_affine = partial_affine.sum(1).view_as(gate_affine)
    return (grad_c, masked, sums[..., 0].to(scale.dtype, copy=True),
            sums[..., 1].to(shift.dtype, copy=True), grad_gate, grad_affine)


def triton_cdiv(n: int, block: int) -> int:
    return max(1, -(-n // block))
