"""Selective Kernel (SK) unit of PytorchInsight's SK-ResNet.

Li, Wang, Hu & Yang, "Selective Kernel Networks", CVPR 2019.
https://arxiv.org/abs/1903.06586
Official code of the variant the PRM paper compares with (SK-ResNet50,
26.154M parameters): PytorchInsight, classification/models/imagenet/
resnet_sk.py, whose Bottleneck runs two 3x3 branches on the same input, the
block's own dense conv and a grouped one (32 groups), each with BatchNorm
and ReLU, and fuses them: the sum of their means over the positions, a
1x1 conv c -> c/16 (no bias), BatchNorm, ReLU, a 1x1 conv c/16 -> 2c (no
bias), a softmax over the two branches per channel, and the weighted sum.

This module is the grouped branch and the fusion; the dense branch stays the
block's ``conv2``/``norm2`` (so ImageNet ResNet weights fill it, and only
this module starts fresh). Official names map as ``OFFICIAL_NAMES``.
Its squeeze BatchNorm on a single value per channel (batch 1) follows
:mod:`prm_det.models.layers.gate_norm`.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from mmcv.cnn import build_conv_layer, build_norm_layer
from torch import Tensor, nn

from .cbam import reduced_channels
from .gate_norm import GateBatchNorm2d


class SelectiveKernel(nn.Module):
    """The grouped 3x3 branch and the selection between it and a dense one.

    Args:
        in_channels (int): Channels into the branches.
        out_channels (int): Channels out of each branch.
        stride (int): The branches' stride. Defaults to 1.
        dilation (int): The branches' dilation. Defaults to 1.
        groups (int): Groups of the grouped branch. Defaults to 32.
        ratio (float): Hidden channels of the squeeze,
            ``int(out_channels * ratio)``. Defaults to 1/16.
        conv_cfg (dict | None): The grouped conv's config (mmcv).
        norm_cfg (dict): The grouped branch's norm. Defaults to BN.
    """

    _abbr_ = 'sk'
    OFFICIAL_NAMES = {
        'conv2g.': 'sk.grouped_conv.',
        'bn2g.': 'sk.grouped_norm.',
        'conv_fc1.': 'sk.squeeze_conv.',
        'bn_fc1.': 'sk.squeeze_norm.',
        'conv_fc2.': 'sk.select_conv.',
    }

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 dilation: int = 1, groups: int = 32, ratio: float = 1. / 16,
                 conv_cfg: Optional[dict] = None,
                 norm_cfg: dict = dict(type='BN')) -> None:
        super().__init__()
        for name, channels in (('in_channels', in_channels),
                               ('out_channels', out_channels)):
            if channels % groups:
                raise ValueError(
                    f'SK: groups={groups} does not divide {name}='
                    f'{channels}; use a divisor of both {in_channels} and '
                    f'{out_channels} (for a backbone: sk=dict(groups=...))')
        hidden = reduced_channels('SK', out_channels, ratio)
        self.out_channels = out_channels
        self.grouped_conv = build_conv_layer(
            conv_cfg, in_channels, out_channels, 3, stride=stride,
            padding=dilation, dilation=dilation, groups=groups, bias=False)
        self.grouped_norm = build_norm_layer(norm_cfg, out_channels)[1]
        self.squeeze_conv = nn.Conv2d(out_channels, hidden, 1, bias=False)
        self.squeeze_norm = GateBatchNorm2d(hidden)
        self.select_conv = nn.Conv2d(hidden, 2 * out_channels, 1, bias=False)

    def forward(self, x: Tensor, dense: Tensor) -> Tensor:
        """``x``: the branches' input; ``dense``: the dense branch's output
        (after its norm and ReLU). Returns the selected sum."""
        grouped = F.relu(self.grouped_norm(self.grouped_conv(x)))
        pooled = dense.mean((2, 3), keepdim=True) + \
            grouped.mean((2, 3), keepdim=True)                # [b, c, 1, 1]
        hidden = F.relu(self.squeeze_norm(self.squeeze_conv(pooled)))
        logits = self.select_conv(hidden)                     # [b, 2c, 1, 1]
        weights = torch.softmax(logits.unflatten(1, (2, self.out_channels)),
                                1).to(dense.dtype)          # [b, 2, c, 1, 1]
        return dense * weights[:, 0] + grouped * weights[:, 1]
