"""The local relation aggregation on Triton
(:mod:`.local_relation_triton_kernels`): the ``triton`` backend of
:mod:`prm_det.ops.local_relation`, with the torch backend's contract
(:mod:`.local_relation_torch`: the same arguments, outputs, dtypes and
semantics).

Forward is one kernel: a program per (sample, group, block of output
positions, block of the group's channels) takes two sweeps over the window's
in-map offsets and writes the output and the log-sum-exp per (sample,
group, position). Backward recomputes each offset's weight from it: the
output and D first (the forward kernel given the log-sum-exp: one sweep),
then two kernels, neither with atomics: an output-centric one (the query's gradient,
and each program's partial sums of the prior's, added here in a fixed
order) and an input-centric one (the key's and the value's gradients at
each input position, from the output positions whose windows hold it).
``D`` = sum over the group's channels of grad_out * out, per output
position, comes from the first kernel's channel blocks. Besides the
outputs, nothing bigger than a map of one value per (sample, group,
position) is allocated: never k * k times a map.

Shares the PRM backend's Triton state (:mod:`.triton_backend`): triton is
imported at the first call, CPU tensors run through the interpreter under
``TRITON_INTERPRET=1``, and a kernel Triton cannot compile or fit on this
GPU marks the Triton kernels broken (one warning), raising
:class:`~prm_det.ops.contract.KernelsBroken`.
"""
from typing import Tuple

import torch
from torch import Tensor

from ..local_relation import SIMILARITIES, output_size
from . import triton_backend as tb

NAME = 'triton'
BLOCK_P = 128  # positions per program
MAX_BLOCK_M = 8  # value channels per program (more: several blocks)
NUM_WARPS = 4


def _kernels():
    from . import local_relation_triton_kernels
    return local_relation_triton_kernels



def _cdiv(n: int, block: int) -> int:
    return -(-n // block)


def _channel_blocks(m: int) -> Tuple[int, int]:
    """(BLOCK_M, number of channel blocks) for m channels a group."""
    block_m = min(1 << max(m - 1, 0).bit_length(), MAX_BLOCK_M)
    return block_m, _cdiv(m, block_m)


def _common(query, key, value, prior, kernel_size, stride, method):
    query, key, value, prior = (t.contiguous()
                                for t in (query, key, value, prior))
    b, channels, h, w = value.shape
    groups = key.shape[1]
    m = channels // groups
    block_m, chunks = _channel_blocks(m)
    sizes = dict(G=groups, m=m, H=h, W=w, Ho=output_size(h, stride),
                 Wo=output_size(w, stride))
    consts = dict(K=kernel_size, STRIDE=stride,
                  METHOD=SIMILARITIES.index(method), BLOCK_M=block_m,
                  BLOCK_P=BLOCK_P, ACC=tb._tl_acc(value))
    return (query, key, value, prior), sizes, consts, chunks


def forward(query: Tensor, key: Tensor, value: Tensor, prior: Tensor,
            kernel_size: int, stride: int,
            method: str) -> Tuple[Tensor, Tensor]:
    """(out [b, C, Ho, Wo] in the value's dtype, lse [b, G, Ho, Wo] in the
    compute dtype)."""
    (query, key, value, prior), sizes, consts, chunks = _common(
        query, key, value, prior, kernel_size, stride, method)
    b, channels = value.shape[:2]
    ho, wo, groups = sizes['Ho'], sizes['Wo'], sizes['G']
    out = value.new_empty(b, channels, ho, wo)
    lse = torch.empty(b, groups, ho, wo, dtype=tb._acc(value),
                      device=value.device)
    if out.numel() == 0:
        return out, lse

    def launch():
        tb._launch(_kernels().lr_fwd_kernel,
                   (_cdiv(ho * wo, BLOCK_P), b * groups, chunks), NUM_WARPS,
                   q_ptr=query, k_ptr=key, v_ptr=value, prior_ptr=prior,
                   out_ptr=out, lse_ptr=lse, go_ptr=out, dsum_ptr=lse,
                   **sizes, **consts, RECOMPUTE=False)
        return out, lse

    return tb.run_guarded(value, launch)


def backward(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor,
             prior: Tensor, lse: Tensor, kernel_size: int, stride: int,
             method: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad query, grad key, grad value, grad prior, the output
    recomputed), each in its input's dtype (the output in the value's)."""
    (query, key, value, prior), sizes, consts, chunks = _common(
        query, key, value, prior, kernel_size, stride, method)
    acc = tb._acc(value)
    b, channels, h, w = value.shape
    groups, ho, wo = sizes['G'], sizes['Ho'], sizes['Wo']
    grad_out = grad_out.contiguous()
    lse = lse.contiguous()
    out = value.new_empty(b, channels, ho, wo)
    grad_q = torch.empty_like(query)
    grad_k = torch.empty_like(key)
    grad_v = torch.empty_like(value)
    taps = kernel_size * kernel_size
    blocks = _cdiv(ho * wo, BLOCK_P)
    partial = torch.empty(b, groups, blocks, taps, dtype=acc,
                          device=value.device)
    if value.numel() == 0:
        grad_prior = torch.zeros(groups, kernel_size, kernel_size,
                                 dtype=prior.dtype, device=prior.device)
        return (grad_q.zero_(), grad_k.zero_(), grad_v.zero_(), grad_prior,
                out)
    rows, cols = _cdiv(h, stride), _cdiv(w, stride)  # a residue class's

    def launch():
        kernels = _kernels()
        # D = sum_d w_d dw_d = sum over the group's channels of dout * out,
        # a part per channel block, added in order
        d_parts = torch.empty(chunks, b * groups, ho * wo, dtype=acc,
                              device=value.device)
        tb._launch(kernels.lr_fwd_kernel, (blocks, b * groups, chunks),
                   NUM_WARPS, q_ptr=query, k_ptr=key, v_ptr=value,
                   prior_ptr=prior, out_ptr=out, lse_ptr=lse,
                   go_ptr=grad_out, dsum_ptr=d_parts, **sizes, **consts,
                   RECOMPUTE=True)
        d_total = d_parts[0] if chunks == 1 else d_parts.sum(0)
        maps = dict(go_ptr=grad_out, q_ptr=query, k_ptr=key, v_ptr=value,
                    prior_ptr=prior, lse_ptr=lse, dsum_ptr=d_total)
        tb._launch(kernels.lr_bwd_query_kernel, (blocks, b * groups),
                   NUM_WARPS, **maps, gq_ptr=grad_q, part_ptr=partial,
                   **sizes, ONE_CHUNK=chunks == 1, **consts)
        tb._launch(kernels.lr_bwd_kv_kernel,
                   (_cdiv(rows * cols, BLOCK_P), b * groups,
                    stride * stride * chunks), NUM_WARPS, **maps,
                   gk_ptr=grad_k, gv_ptr=grad_v, **sizes, Hs=rows, Ws=cols,
                   nchunks=chunks, ONE_CHUNK=chunks == 1, **consts)

    tb.run_guarded(value, launch)
    # the programs' partials, added in a fixed order
    grad_prior = partial.sum((0, 2)).view(groups, kernel_size, kernel_size)
    return grad_q, grad_k, grad_v, grad_prior.to(prior.dtype), out
