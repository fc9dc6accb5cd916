"""SK-ResNet: PytorchInsight's selective-kernel ResNet as an mmdet backbone.

Li, Wang, Hu & Yang, "Selective Kernel Networks", CVPR 2019; the variant of
PytorchInsight (classification/models/imagenet/resnet_sk.py, the PRM
paper's SK-ResNet50 row, 26.154M parameters): each Bottleneck's 3x3 conv is
joined by a grouped 3x3 conv (32 groups) on the same input and the two are
fused by :class:`~prm_det.models.layers.sk.SelectiveKernel`.

PytorchInsight has no SK BasicBlock ("TODO"). For depths 18 and 34 the SK
unit is placed the same way, on the block's first 3x3 conv (the strided one
followed by norm and ReLU, the position of a Bottleneck's conv2), so every
mmdet depth builds.
"""

from ..layers.sk import SelectiveKernel
from ..registry import register_model
from .attention_resnet import (AttentionBottleneck, AttentionResNet,
                               PluginBasicBlock)

SK_DEFAULTS = dict(groups=32, ratio=1. / 16)


class SKBottleneck(AttentionBottleneck):
    """mmdet's Bottleneck whose 3x3 conv is selected with a grouped one."""

    attention_unit_names = ('sk', )

    def __init__(self, inplanes, planes, *args, sk: dict = SK_DEFAULTS,
                 **kwargs):
        super().__init__(inplanes, planes, *args, **kwargs)
        self.sk = SelectiveKernel(planes, planes, stride=self.conv2_stride,
                                  dilation=self.dilation,
                                  conv_cfg=self.conv_cfg,
                                  norm_cfg=self.norm_cfg, **sk)

    def forward_conv2(self, out):
        dense = super().forward_conv2(out)
        return self.sk(out, dense)


class SKBasicBlock(PluginBasicBlock):
    """A BasicBlock whose first (strided) 3x3 conv is selected with a
    grouped one (module docstring)."""

    attention_unit_names = ('sk', )

    def __init__(self, inplanes, planes, stride=1, dilation=1,
                 *args, conv_cfg=None, norm_cfg=dict(type='BN'),
                 sk: dict = SK_DEFAULTS, **kwargs):
        super().__init__(inplanes, planes, stride, dilation, *args,
                         conv_cfg=conv_cfg, norm_cfg=norm_cfg, **kwargs)
        self.sk = SelectiveKernel(inplanes, planes, stride=stride,
                                  dilation=dilation, conv_cfg=conv_cfg,
                                  norm_cfg=norm_cfg, **sk)

    def forward_conv1(self, x):
        return self.sk(x, super().forward_conv1(x))


@register_model
class SKResNet(AttentionResNet):
    """ResNet with PytorchInsight's selective-kernel blocks in every stage.

    Args:
        depth (int): 18, 34, 50, 101 or 152.
        sk (dict): The SK unit's ``groups`` (32) and ``ratio`` (1/16).
        **kwargs: every :class:`AttentionResNet` argument (an
            ``attention`` goes after the last norm as in the other
            backbones; none by default).
    """

    arch_settings = {
        depth: (SKBasicBlock if block is PluginBasicBlock else SKBottleneck,
                stages)
        for depth, (block, stages) in AttentionResNet.arch_settings.items()
    }

    def __init__(self, depth: int, sk: dict = None, **kwargs) -> None:
        sk = {**SK_DEFAULTS, **(sk or {})}
        unknown = set(sk) - set(SK_DEFAULTS)
        if unknown:
            raise ValueError(f'sk takes {sorted(SK_DEFAULTS)}, got '
                             f'{sorted(unknown)}')
        self.sk_cfg = sk
        super().__init__(depth, **kwargs)

    def make_res_layer(self, **kwargs):
        return super().make_res_layer(sk=self.sk_cfg, **kwargs)

