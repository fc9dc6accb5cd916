"""Squeeze-and-Excitation as an MMDetection plugin.

Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018.
https://arxiv.org/abs/1709.01507

mmdet already has the layer (``mmdet.models.layers.SELayer``: global average
pool, 1x1 conv c -> c/r with bias, ReLU, 1x1 conv c/r -> c with bias,
sigmoid, channel-wise scale). It is wrapped here only to give it the plugin
contract: ``in_channels`` first, a ratio in the timm sense, ``_abbr_ = 'se'``.
"""
from mmdet.models.layers import SELayer
from torch import Tensor

from prm_det.ops.gate_tail import NormalizedMap

from ..registry import register_model
from .fused_tail import FusedGateTail, on_vectors


@register_model
class SE(FusedGateTail, SELayer):
    """Squeeze-and-excitation with ``in_channels`` first.

    Args:
        in_channels (int): Channels of the input feature map.
        ratio (float): Reduction ratio, hidden channels are
            ``int(in_channels * ratio)``. Defaults to 1/16.
        **kwargs: ``conv_cfg``, ``act_cfg``, ``init_cfg`` of ``SELayer``.
    """

    _abbr_ = 'se'

    def __init__(self, in_channels: int, ratio: float = 1. / 16,
                 **kwargs) -> None:
        if not 0 < ratio <= 1 or int(in_channels * ratio) < 1:
            raise ValueError(
                f'SE: ratio must be in (0, 1] and leave at least one hidden '
                f'channel, got ratio={ratio} for in_channels={in_channels}')
        # SELayer's ratio divides: hidden = int(channels / ratio).
        super().__init__(in_channels, ratio=1. / ratio, **kwargs)

    def gate_tail(self, nmap: NormalizedMap, identity: Tensor) -> Tensor:
        """The block's output: the squeeze is the normalized map's channel
        mean, the excitation this module's two convs on [b, C] vectors."""
        excite = on_vectors(self.conv2, on_vectors(self.conv1,
                                                   nmap.channel_mean()))
        return nmap.finish(identity, channel_scale=excite)
