"""MnasNet-B1 as an MMDetection backbone, built from mmcv's bricks.

MnasNet: Platform-Aware Neural Architecture Search for Mobile (Tan et al.,
CVPR 2019, https://arxiv.org/abs/1807.11626). The network here is the
depth-multiplier-1.0 model that torchvision names ``mnasnet1_0`` (4,383,312
parameters with its 1280 -> 1000 classifier, about 0.33 GFLOPs at 224x224):
the MnasNet the PRM paper applies PRM to (ImageNet top-1 71.72 -> 73.01,
0.330 -> 0.331 GFLOPs, 4.38M parameters). Written from the architecture's
description, not from torchvision's code; the tests compare the two.

Layout, as mmdet's ``MobileNetV2`` lays out its stages, so that its
``out_indices`` and ``frozen_stages`` mean the same:

======  ========================================================  ==========
index   module                                                    out, stride
======  ========================================================  ==========
(stem)  ``conv1``: 3x3 conv 32, stride 2, BN, ReLU                32, 2
0       ``layer1``: separable conv: depthwise 3x3 32, BN, ReLU,   16, 2
        pointwise 1x1 16, BN (no ReLU): an inverted residual
        without expansion
1-6     ``layer2``-``layer7``: inverted residuals (expansion,     24, 4 ...
        kernel, stride, repeats, channels): ``arch_settings``     320, 32
7       ``conv2``: 1x1 conv 1280, BN, ReLU                        1280, 32
======  ========================================================  ==========

A block adds its input back (the shortcut) where stride is 1 and the width
is unchanged. Blocks are mmdet's ``InvertedResidual`` (as
``AttentionInvertedResidual`` without an attention: no extra tensors, a
checkpointed forward that names ``use_reentrant=False``); the attention
MnasNets (``attention_mnasnet.py``) put one in each of ``layer2`` to
``layer7``'s blocks. BatchNorm defaults to torchvision's momentum, 1 - 0.9997 (the
paper's TensorFlow decay, 0.9997, in PyTorch's convention).
"""
from typing import Optional, Sequence

from mmcv.cnn import ConvModule
from mmdet.models.utils import make_divisible
from mmengine.model import BaseModule
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..registry import register_model
from .attention_mobilenet_v2 import AttentionInvertedResidual

BN_MOMENTUM = 1 - 0.9997
STEM_CHANNELS = 32
SEPARABLE_CHANNELS = 16
LAST_CHANNELS = 1280  # whatever the width multiplier, as torchvision's


@register_model
class MnasNet(BaseModule):
    """MnasNet-B1 (torchvision's ``mnasnet1_0`` at ``widen_factor=1.0``).

    Args:
        widen_factor (float): Width multiplier of every layer but the last
            1280-wide conv, rounded to multiples of 8 (0.5, 0.75, 1.3:
            torchvision's other MnasNets). Defaults to 1.0.
        out_indices (Sequence[int]): Outputs, from 0 (``layer1``, stride 2)
            to 7 (``conv2``, 1280 channels): the table in the module
            docstring. Defaults to (1, 2, 4, 7): strides 4, 8, 16, 32.
        frozen_stages (int): Freeze (eval mode, no gradients) the stem at 0,
            and ``layer1`` to ``layer{frozen_stages}`` beyond. Defaults to -1
            (nothing frozen).
        conv_cfg (dict, optional): Convolution config. Defaults to None
            (Conv2d).
        norm_cfg (dict): Norm config. Defaults to BN with momentum
            1 - 0.9997, as torchvision's.
        act_cfg (dict): Activation config. Defaults to ReLU.
        norm_eval (bool): Keep the norms in eval mode while training
            (frozen running statistics). Defaults to False.
        with_cp (bool): Gradient checkpointing in every block. Defaults to
            False.
        init_cfg (dict | list[dict], optional): Initialization config.
            Defaults to Kaiming for convolutions, 1 for norm weights, as
            mmdet's MobileNetV2.

    Example:
        >>> import torch
        >>> model = MnasNet(out_indices=(0, 1, 2, 3, 4, 5, 6, 7)).eval()
        >>> for out in model(torch.rand(1, 3, 64, 64)):
        ...     print(tuple(out.shape))
        (1, 16, 32, 32)
        (1, 24, 16, 16)
        (1, 40, 8, 8)
        (1, 80, 4, 4)
        (1, 96, 4, 4)
        (1, 192, 2, 2)
        (1, 320, 2, 2)
        (1, 1280, 2, 2)
    """

    # layer2 to layer7: expand_ratio, kernel_size, stride, num_blocks,
    # channels (MnasNet-B1; the first block of a layer takes the stride)
    arch_settings = [[3, 3, 2, 3, 24], [3, 5, 2, 3, 40], [6, 5, 2, 3, 80],
                     [6, 3, 1, 2, 96], [6, 5, 2, 4, 192], [6, 3, 1, 1, 320]]
    num_outputs = len(arch_settings) + 2  # layer1, the six, conv2

    def __init__(self,
                 widen_factor: float = 1.,
                 out_indices: Sequence[int] = (1, 2, 4, 7),
                 frozen_stages: int = -1,
                 conv_cfg: Optional[dict] = None,
                 norm_cfg: dict = dict(type='BN', momentum=BN_MOMENTUM),
                 act_cfg: dict = dict(type='ReLU'),
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 init_cfg=None) -> None:
        if init_cfg is None:
            init_cfg = [dict(type='Kaiming', layer='Conv2d'),
                        dict(type='Constant', val=1,
                             layer=['_BatchNorm', 'GroupNorm'])]
        super().__init__(init_cfg)
        if not set(out_indices) <= set(range(self.num_outputs)):
            raise ValueError(f'out_indices must be a subset of range(0, '
                             f'{self.num_outputs}); got {out_indices}')
        if frozen_stages not in range(-1, self.num_outputs):
            raise ValueError(f'frozen_stages must be in range(-1, '
                             f'{self.num_outputs}); got {frozen_stages}')
        self.widen_factor = widen_factor
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.conv_cfg = conv_cfg
        self.norm_cfg = norm_cfg
        self.act_cfg = act_cfg
        self.norm_eval = norm_eval
        self.with_cp = with_cp

        stem = self._width(STEM_CHANNELS)
        self.conv1 = ConvModule(3, stem, 3, stride=2, padding=1,
                                conv_cfg=conv_cfg, norm_cfg=norm_cfg,
                                act_cfg=act_cfg)
        self.in_channels = self._width(SEPARABLE_CHANNELS)
        # the separable conv: not one of the inverted residuals (MnasNet's
        # SepConv, part of torchvision's stem), so no attention either;
        # built as an inverted residual without its expand conv, as mmdet's
        # MobileNetV2 builds its first layer (the same convs and norms)
        self.layer1 = nn.Sequential(AttentionInvertedResidual(
            stem, self.in_channels, mid_channels=stem, kernel_size=3,
            stride=1, with_expand_conv=False, conv_cfg=conv_cfg,
            norm_cfg=norm_cfg, act_cfg=act_cfg, with_cp=with_cp))
        self.layers = ['layer1']
        for index, (expand_ratio, kernel_size, stride, num_blocks,
                    channels) in enumerate(self.arch_settings):
            name = f'layer{index + 2}'
            self.add_module(name, self.make_layer(
                self._width(channels), num_blocks, stride, expand_ratio,
                kernel_size))
            self.layers.append(name)
        self.out_channel = LAST_CHANNELS
        self.conv2 = ConvModule(self.in_channels, self.out_channel, 1,
                                conv_cfg=conv_cfg, norm_cfg=norm_cfg,
                                act_cfg=act_cfg)
        self.layers.append('conv2')

    def _width(self, channels: int) -> int:
        return make_divisible(channels * self.widen_factor, 8)

    def make_layer(self, out_channels: int, num_blocks: int, stride: int,
                   expand_ratio: int, kernel_size: int) -> nn.Sequential:
        """``num_blocks`` inverted residuals, the first with ``stride``."""
        blocks = []
        for index in range(num_blocks):
            blocks.append(self.make_block(
                self.in_channels, out_channels,
                mid_channels=self.in_channels * expand_ratio,
                kernel_size=kernel_size,
                stride=stride if index == 0 else 1))
            self.in_channels = out_channels
        return nn.Sequential(*blocks)

    def make_block(self, in_channels: int, out_channels: int,
                   mid_channels: int, kernel_size: int,
                   stride: int) -> nn.Module:
        """One inverted residual of ``layer2`` to ``layer7``: 1x1 expand
        conv, BN, ReLU; depthwise kxk conv, BN, ReLU; 1x1 linear conv, BN;
        the shortcut where the shape allows; between the linear conv's norm
        and the shortcut, ``_attention_for(out_channels)``."""
        return AttentionInvertedResidual(
            in_channels, out_channels, mid_channels=mid_channels,
            kernel_size=kernel_size, stride=stride, conv_cfg=self.conv_cfg,
            norm_cfg=self.norm_cfg, act_cfg=self.act_cfg,
            with_cp=self.with_cp,
            attention=self._attention_for(out_channels))

    def _attention_for(self, channels: int) -> Optional[nn.Module]:
        """A block's attention: none here; the attention MnasNets' mixin
        (``InvertedResidualAttention``) overrides it."""
        return None

    def forward(self, x):
        x = self.conv1(x)
        outs = []
        for index, name in enumerate(self.layers):
            x = getattr(self, name)(x)
            if index in self.out_indices:
                outs.append(x)
        return tuple(outs)

    def _freeze_stages(self) -> None:
        frozen = [self.conv1] if self.frozen_stages >= 0 else []
        frozen += [getattr(self, f'layer{i}')
                   for i in range(1, self.frozen_stages + 1)]
        for module in frozen:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True):
        """``nn.Module.train``, then the frozen stages back in eval mode and,
        with ``norm_eval``, every norm; returns the module."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self
