"""Convolutional Block Attention Module (CBAM) as an MMDetection plugin.

Woo, Park, Lee & Kweon, "CBAM: Convolutional Block Attention Module",
ECCV 2018. https://arxiv.org/abs/1807.06521
Official code: github Jongchan/attention-module, MODELS/cbam.py (the same
module in PytorchInsight's classification/models/imagenet/resnet_cbam.py).

A channel gate then a spatial gate. Channel: the map's average and its max
over the positions, each through one shared MLP (c -> c/r, ReLU, c/r -> c,
Linear layers with biases), summed, sigmoid, multiplied channel-wise.
Spatial: the channel-gated map's max and mean over the channels, a 7x7 conv
(2 -> 1, no bias), BatchNorm (momentum 0.01), sigmoid, multiplied
position-wise. Initialization as the official ResNet's: the 7x7 conv
Kaiming-normal (fan_out), the spatial BatchNorm's weight 0 (a fresh spatial
gate is sigmoid(0) = 0.5 everywhere), every bias 0.

Rules where the official code fails: the spatial BatchNorm on a single
value per channel (batch 1 of a 1x1 map) follows
:mod:`prm_det.models.layers.gate_norm`. Under autocast the gates are
computed as autocast runs each op (the MLP and conv in half precision, the
pooling and BatchNorm in the input's) and cast to the input's dtype.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prm_det.ops.gate_tail import NormalizedMap, position_pool

from ..registry import register_model
from .channel_pool import channel_max_mean
from .fused_tail import FusedGateTail
from .gate_norm import GateBatchNorm2d


def reduced_channels(module: str, in_channels: int, ratio: float) -> int:
    """``int(in_channels * ratio)`` hidden channels, at least one, or a
    ValueError naming the module, the ratio and what would work."""
    hidden = int(in_channels * ratio)
    if not 0 < ratio <= 1 or hidden < 1:
        raise ValueError(
            f'{module}: ratio={ratio} leaves {hidden} hidden channels for '
            f'in_channels={in_channels}; use a ratio in '
            f'[1/{in_channels}, 1] (the official 1/16 needs at least 16 '
            f'channels)')
    return hidden


@register_model
class CBAM(FusedGateTail, nn.Module):
    """CBAM with ``in_channels`` first.

    Official parameter names map to these (see ``OFFICIAL_NAMES``):
    ``ChannelGate.mlp.1`` / ``.mlp.3`` are ``channel_fc1`` / ``channel_fc2``,
    ``SpatialGate.spatial.conv`` / ``.bn`` are ``spatial_conv`` /
    ``spatial_norm``.

    Args:
        in_channels (int): Channels of the input feature map.
        ratio (float): Hidden channels of the channel MLP are
            ``int(in_channels * ratio)``. Defaults to 1/16.
        kernel_size (int): The spatial gate's conv kernel. Defaults to 7.
    """

    _abbr_ = 'cbam'
    OFFICIAL_NAMES = {
        'ChannelGate.mlp.1.': 'channel_fc1.',
        'ChannelGate.mlp.3.': 'channel_fc2.',
        'SpatialGate.spatial.conv.': 'spatial_conv.',
        'SpatialGate.spatial.bn.': 'spatial_norm.',
    }

    def __init__(self, in_channels: int, ratio: float = 1. / 16,
                 kernel_size: int = 7) -> None:
        super().__init__()
        hidden = reduced_channels('CBAM', in_channels, ratio)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f'CBAM: kernel_size must be a positive odd int '
                             f'(the map keeps its size), got {kernel_size}')
        self.in_channels = in_channels
        self.channel_fc1 = nn.Linear(in_channels, hidden)
        self.channel_fc2 = nn.Linear(hidden, in_channels)
        self.spatial_conv = nn.Conv2d(2, 1, kernel_size,
                                      padding=kernel_size // 2, bias=False)
        self.spatial_norm = GateBatchNorm2d(1, momentum=0.01)
        self.init_weights()

    def init_weights(self) -> None:
        """The official ResNet's initialization of its CBAM modules (also
        run after a backbone's own init, which would set every BatchNorm
        weight to 1)."""
        nn.init.kaiming_normal_(self.spatial_conv.weight, mode='fan_out')
        nn.init.zeros_(self.spatial_norm.weight)
        nn.init.zeros_(self.spatial_norm.bias)
        nn.init.zeros_(self.channel_fc1.bias)
        nn.init.zeros_(self.channel_fc2.bias)

    def channel_mlp(self, pooled: Tensor) -> Tensor:
        """[b, c] -> [b, c]: the MLP both pooled vectors share."""
        return self.channel_fc2(F.relu(self.channel_fc1(pooled)))

    def channel_gate(self, x: Tensor) -> Tensor:
        """The channel gate of ``x`` [b, c, h, w]: [b, c]."""
        return torch.sigmoid(self.channel_mlp(x.mean((2, 3))) +
                             self.channel_mlp(x.amax((2, 3))))

    def spatial_gate(self, x: Tensor) -> Tensor:
        """The spatial gate of the channel-gated map ``x``: [b, 1, h, w]
        (what ``tools/analysis_tools/vis_prm.py`` draws)."""
        pooled = channel_max_mean(x, self.in_channels)    # [b, 2, h, w]
        return torch.sigmoid(self.spatial_norm(self.spatial_conv(pooled)))

    def forward(self, x: Tensor) -> Tensor:
        x = x * self.channel_gate(x).to(x.dtype)[:, :, None, None]
        return x * self.spatial_gate(x).to(x.dtype)

    tail_extrema = True  # the channel gate reads the max over positions

    def gate_tail(self, nmap: NormalizedMap, identity: Tensor) -> Tensor:
        """The block's output: the max over positions of the normalized
        map comes with the norm's statistics (c's max or min, by the sign
        of the norm's scale); the spatial gate pools the channel-gated map
        per position from c in one pass (``position_pool``), without
        writing it."""
        c = nmap.c
        b, ch, h, w = c.shape
        acc = nmap.alpha.dtype
        channel = torch.sigmoid(
            self.channel_mlp(nmap.channel_mean()) +
            self.channel_mlp(nmap.channel_max())).to(acc)
        scale, shift = nmap.channel_affine(channel)        # x * channel
        mean, best = position_pool(c, scale, shift, nmap.backend,
                                   with_max=True)
        pooled = torch.cat((best, mean), 1).view(b, 2, h, w)
        spatial = torch.sigmoid(self.spatial_norm(self.spatial_conv(pooled)))
        return nmap.finish(identity, channel_scale=channel, gate=spatial)

    def extra_repr(self) -> str:
        return f'in_channels={self.in_channels}'
