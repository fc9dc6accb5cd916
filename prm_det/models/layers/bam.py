"""Bottleneck Attention Module (BAM), placed between a backbone's stages.

Park, Woo, Lee & Kweon, "BAM: Bottleneck Attention Module", BMVC 2018.
https://arxiv.org/abs/1807.06514
Official code: github Jongchan/attention-module, MODELS/bam.py (the same
module in PytorchInsight's classification/models/imagenet/resnet_bam.py).

``y = x * (1 + sigmoid(combine(channel(x), spatial(x))))``. Channel branch:
the map's mean over the positions, Linear c -> c/r, BatchNorm1d, ReLU,
Linear c/r -> c. Spatial branch: 1x1 conv c -> c/r, BatchNorm, ReLU, two
3x3 convs of dilation 4 (each with BatchNorm and ReLU), 1x1 conv c/r -> 1.

``combine``: the paper adds the two branches; the official code (and so
every published checkpoint: attention-module's ResNet50+BAM, PytorchInsight's
BAM-ResNets) multiplies them. ``'multiply'`` is the default, so those
weights compute what they were trained to; ``'add'`` is the paper's.

Where the official code fails: its channel branch average-pools an H x H
window (``avg_pool2d(x, x.size(2))``), so a map that is not square (every
detector's) raises or pools the wrong window; here the mean is over the
whole map, equal to the official pooling on the square maps it works on.
Its BatchNorm layers on a single value per channel (the channel branch at
batch 1) follow :mod:`prm_det.models.layers.gate_norm`.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import register_model
from .cbam import reduced_channels
from .gate_norm import GateBatchNorm1d, GateBatchNorm2d

COMBINE = ('multiply', 'add')


class _ConvNormReLU(nn.Module):
    """conv (with bias, as the official code) -> BatchNorm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int,
                 kernel_size: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size,
                              padding=dilation * (kernel_size // 2),
                              dilation=dilation)
        self.bn = GateBatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


@register_model
class BAM(nn.Module):
    """BAM with ``in_channels`` first.

    Official parameter names map to these (``OFFICIAL_NAMES``, for the
    default ``num_dilated``):
    ``channel_att.gate_c.gate_c_fc_0`` / ``gate_c_bn_1`` /
    ``gate_c_fc_final`` are ``channel_fc1`` / ``channel_norm`` /
    ``channel_fc2``; ``spatial_att.gate_s.gate_s_conv_reduce0`` and
    ``gate_s_bn_reduce0`` are ``spatial_reduce.conv`` / ``.bn``,
    ``gate_s_conv_di_i`` / ``gate_s_bn_di_i`` are
    ``spatial_dilated.i.conv`` / ``.bn``, ``gate_s_conv_final`` is
    ``spatial_out``.

    Args:
        in_channels (int): Channels of the input feature map.
        ratio (float): Hidden channels of both branches are
            ``int(in_channels * ratio)``. Defaults to 1/16.
        dilation (int): Dilation of the spatial branch's 3x3 convs.
            Defaults to 4.
        num_dilated (int): How many dilated 3x3 convs. Defaults to 2.
        combine (str): 'multiply' (the official code, the published
            weights) or 'add' (the paper). Defaults to 'multiply'.
    """

    _abbr_ = 'bam'
    # official parameter-name prefixes -> ours (the default two dilated convs)
    OFFICIAL_NAMES = {
        'channel_att.gate_c.gate_c_fc_0.': 'channel_fc1.',
        'channel_att.gate_c.gate_c_bn_1.': 'channel_norm.',
        'channel_att.gate_c.gate_c_fc_final.': 'channel_fc2.',
        'spatial_att.gate_s.gate_s_conv_reduce0.': 'spatial_reduce.conv.',
        'spatial_att.gate_s.gate_s_bn_reduce0.': 'spatial_reduce.bn.',
        'spatial_att.gate_s.gate_s_conv_di_0.': 'spatial_dilated.0.conv.',
        'spatial_att.gate_s.gate_s_bn_di_0.': 'spatial_dilated.0.bn.',
        'spatial_att.gate_s.gate_s_conv_di_1.': 'spatial_dilated.1.conv.',
        'spatial_att.gate_s.gate_s_bn_di_1.': 'spatial_dilated.1.bn.',
        'spatial_att.gate_s.gate_s_conv_final.': 'spatial_out.',
    }

    def __init__(self, in_channels: int, ratio: float = 1. / 16,
                 dilation: int = 4, num_dilated: int = 2,
                 combine: str = 'multiply') -> None:
        super().__init__()
        hidden = reduced_channels('BAM', in_channels, ratio)
        if combine not in COMBINE:
            raise ValueError(f'BAM: combine must be one of {COMBINE} '
                             f"('multiply': the official code and its "
                             f"weights, 'add': the paper), got {combine!r}")
        self.in_channels = in_channels
        self.combine = combine
        self.channel_fc1 = nn.Linear(in_channels, hidden)
        self.channel_norm = GateBatchNorm1d(hidden)
        self.channel_fc2 = nn.Linear(hidden, in_channels)
        self.spatial_reduce = _ConvNormReLU(in_channels, hidden)
        self.spatial_dilated = nn.Sequential(*[
            _ConvNormReLU(hidden, hidden, 3, dilation)
            for _ in range(num_dilated)])
        self.spatial_out = nn.Conv2d(hidden, 1, 1)
        self.init_weights()

    def init_weights(self) -> None:
        """The official ResNet's initialization of its BAM modules: convs
        Kaiming-normal (fan_out), BatchNorm weights 1, every bias 0; the
        Linear weights keep torch's default."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode='fan_out')
            elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.ones_(module.weight)
            if getattr(module, 'bias', None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        pooled = x.mean((2, 3))                               # [b, c]
        channel = self.channel_fc2(
            F.relu(self.channel_norm(self.channel_fc1(pooled))))
        spatial = self.spatial_out(
            self.spatial_dilated(self.spatial_reduce(x)))    # [b, 1, h, w]
        channel = channel[:, :, None, None]                  # [b, c, 1, 1]
        if self.combine == 'multiply':
            logits = channel * spatial                       # [b, c, h, w]
        else:
            logits = channel + spatial
        return x * (1 + torch.sigmoid(logits)).to(x.dtype)

    def extra_repr(self) -> str:
        return f'in_channels={self.in_channels}, combine={self.combine!r}'
