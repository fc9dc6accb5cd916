"""The local relation aggregation on the compiled C++ kernels
(``../csrc/local_relation_cpu.cpp``, built with PRM's CPU kernel by
:mod:`.cpu`): contiguous float32 / float64 CPU tensors, all of one dtype
(the caller casts). The same contract as :mod:`.local_relation_torch`:
forward returns the output and the log-sum-exp of each window, backward
recomputes the weights (and the output) from it; nothing of k * k times
the map's size is made, and the results are the same bits every run."""
from typing import Tuple

from torch import Tensor

from . import cpu

NAME = 'cpu'


def forward(query: Tensor, key: Tensor, value: Tensor, prior: Tensor,
            kernel_size: int, stride: int,
            method: str) -> Tuple[Tensor, Tensor]:
    """(out [b, C, Ho, Wo], lse [b, G, Ho, Wo]), both in the inputs'
    dtype."""
    out, lse = cpu._ops().local_relation_forward_cpu(
        query.contiguous(), key.contiguous(), value.contiguous(),
        prior.contiguous(), kernel_size, stride, method)
    return out, lse


def backward(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor,
             prior: Tensor, lse: Tensor, kernel_size: int, stride: int,
             method: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad query, grad key, grad value, grad prior, the output
    recomputed), in the inputs' dtype."""
    return tuple(cpu._ops().local_relation_backward_cpu(
        grad_out.contiguous(), query.contiguous(), key.contiguous(),
        value.contiguous(), prior.contiguous(), lse.contiguous(),
        kernel_size, stride, method))
