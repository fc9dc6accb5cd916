"""The max and the mean over a map's channels, in the form each runtime
runs fast.

PyTorch reduces over the channel axis in one pass. ONNX Runtime (1.32,
CPU) does not: ``ReduceMax``/``ReduceMean`` over axis 1 of an NCHW map
take about ten passes' time (1x256x128x128, one thread: 17 ms, against
1.7 ms for the same max as a tree of elementwise ``Max`` over channel
slices and 0.3 ms for the mean as a ``MatMul`` with a 1/c row; measured
with ``benchmarks/bench_onnx.py``'s runtime, see
``benchmarks/results/onnx_cpu_2core.md``). While a model is exported to
ONNX (either exporter) the tree and the product are what is traced;
otherwise ``amax``/``mean`` (FLOP counting and other traces included).
"""
import torch
from torch import Tensor

# the most slices one level of the max tree takes
_TREE_WIDTH = 16


def _widest_divisor(channels: int) -> int:
    """The largest k in [2, 16] dividing ``channels``; 1 if none."""
    return next((k for k in range(min(_TREE_WIDTH, channels), 1, -1)
                 if channels % k == 0), 1)


def _channel_max_tree(x: Tensor, channels: int) -> Tensor:
    """max over dim 1 as levels of elementwise maxima of equal slices."""
    while channels > 1:
        k = _widest_divisor(channels)
        if k == 1:  # a prime count above 16: one reduction, still right
            return x.amax(1, keepdim=True)
        channels //= k
        slices = x.split(channels, 1)
        x = slices[0]
        for other in slices[1:]:
            x = torch.maximum(x, other)
    return x


def _channel_mean_product(x: Tensor, channels: int) -> Tensor:
    """mean over dim 1 as [1, c] @ [b, c, h*w]."""
    row = x.new_full((1, channels), 1.0 / channels)
    return torch.matmul(row, x.flatten(2)).view_as(x[:, :1])


def channel_max_mean(x: Tensor, channels: int) -> Tensor:
    """[b, 2, h, w]: the max and the mean over the ``channels`` channels of
    ``x`` [b, channels, h, w] (CBAM's spatial pooling, in that order). The
    count comes as an int: a trace holds ``x``'s sizes as tensors."""
    if torch.onnx.is_in_onnx_export():
        return torch.cat((_channel_max_tree(x, channels),
                          _channel_mean_product(x, channels)), 1)
    return torch.stack((x.amax(1), x.mean(1)), 1)
