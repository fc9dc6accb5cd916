"""The fused block tail for the gate attentions (SE, GE, GC, SGE, CBAM).

A gate module with a ``gate_tail(nmap, identity)`` method (its small layers
between :func:`prm_det.ops.gate_tail.normalize` and
:meth:`~prm_det.ops.gate_tail.NormalizedMap.finish`) gets
``forward_norm_residual`` from :class:`FusedGateTail`: the residual block's
``relu(module(norm(c)) + identity)`` in the passes of
:mod:`prm_det.ops.gate_tail` where the norm is a BatchNorm2d and a backend
takes the map; the modules one after another otherwise (SyncBN or another
norm, exporting, the 'reference' backend, an empty batch).
"""
import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmcv.cnn.bricks.hsigmoid import HSigmoid
from torch import Tensor, nn

from prm_det.ops.gate_tail import NormalizedMap, normalize, tail_backend

from .prm import batch_norm_of


class FusedGateTail:
    """Mixin: ``forward_norm_residual`` through the gate tail ops; the
    class defines ``gate_tail(nmap, identity) -> Tensor`` and, if it reads
    :meth:`~prm_det.ops.gate_tail.NormalizedMap.channel_max`,
    ``tail_extrema = True``."""

    tail_extrema = False

    def gate_tail(self, nmap: NormalizedMap, identity: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_norm_residual(self, c: Tensor, norm: nn.Module,
                              identity: Tensor,
                              reuse_c: bool = False) -> Tensor:
        """``relu(self(norm(c)) + identity)`` from the last convolution's
        output (``reuse_c`` is PRM's in-place option: unused here)."""
        backend = tail_backend(c, identity)
        bn = None if backend is None else batch_norm_of(norm, c)
        if bn is None:
            return torch.relu(self(norm(c)) + identity)
        return self.gate_tail(
            normalize(c, bn, backend, with_extrema=self.tail_extrema),
            identity)


# elementwise layers: the same on [b, C] vectors as on [b, C, 1, 1] maps
_ELEMENTWISE = (nn.ReLU, nn.Sigmoid, nn.Hardsigmoid, nn.Identity, HSigmoid)


def on_vectors(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer`` (built for [b, C, 1, 1] maps: the small layers of SE's and
    GC's transforms) applied to [b, C] vectors as the products they are:
    a 1x1 ``nn.Conv2d`` as ``F.linear`` with its weights (a convolution's
    set-up costs ~90 us a call on CPU on a 1x1 map, a tenth of a block tail
    at stage 4), a ``LayerNorm`` over [C, 1, 1] over C, mmcv's
    ``ConvModule`` and ``nn.Sequential`` layer by layer; anything else on
    the [b, C, 1, 1] map itself."""
    if isinstance(layer, nn.Sequential):
        for child in layer:
            x = on_vectors(child, x)
        return x
    if isinstance(layer, ConvModule) and not layer.with_norm:
        x = on_vectors(layer.conv, x)
        return on_vectors(layer.activate, x) if layer.with_activation else x
    if (type(layer) is nn.Conv2d and layer.kernel_size == (1, 1)
            and layer.groups == 1):
        return F.linear(x.to(layer.weight.dtype), layer.weight.flatten(1),
                        layer.bias)
    if (type(layer) is nn.LayerNorm
            and tuple(layer.normalized_shape[1:]) == (1, 1)):
        shape = layer.normalized_shape[:1]
        return F.layer_norm(
            x, shape, None if layer.weight is None else layer.weight.flatten(),
            None if layer.bias is None else layer.bias.flatten(), layer.eps)
    if isinstance(layer, _ELEMENTWISE):
        return layer(x)
    return layer(x[:, :, None, None]).flatten(1)
