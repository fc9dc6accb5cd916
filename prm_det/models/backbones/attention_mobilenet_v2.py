"""MobileNetV2 with an attention module in every inverted residual block.

The PRM paper applies PRM to MobileNetV2 (ImageNet top-1 71.03 -> 72.55,
0.320 -> 0.321 GFLOPs, 3.51M parameters). As in its ResNets, the attention
sits at the end of the residual branch: after the linear 1x1 projection and
its norm, before the shortcut add (blocks without a shortcut, stride 2 or a
change of width, carry it too). Everything else is mmdet's ``MobileNetV2``,
so its detectors (SSDLite, YOLOv3) and MMPretrain's classifier take it by
changing ``type``.
"""
from typing import Optional

import torch.utils.checkpoint as cp
from mmdet.models.backbones.mobilenet_v2 import MobileNetV2
from mmdet.models.layers import InvertedResidual
from torch import nn

from ..layers.factory import AttentionSpec, attention_cfg, build_attention
from ..registry import register_model
from .pretrained import CheckedPretrainedMixin

CHANNELS_PER_HEAD = 4
MAX_HEADS = 64  # PRM's default for ResNet


def prm_heads(channels: int) -> int:
    """PRM's heads (groups) for a block of ``channels`` outputs: 4 channels
    a head, at most 64 (ResNet's). MobileNetV2's widths (16 to 320, all
    multiples of 8) are too narrow for ResNet's 64 heads everywhere."""
    return min(MAX_HEADS, max(1, channels // CHANNELS_PER_HEAD))


class AttentionInvertedResidual(InvertedResidual):
    """mmdet's InvertedResidual with ``attention`` after the linear
    projection (conv + norm), before the shortcut add. Without one
    (``None``: ``nn.Identity``, no tensors) it is mmdet's block, with a
    checkpointed forward that names ``use_reentrant=False`` (prm_det's
    plain MnasNet is built of these)."""

    def __init__(self, *args, attention: Optional[nn.Module] = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.attention = nn.Identity() if attention is None else attention

    def forward(self, x):

        def _inner_forward(x):
            out = x
            if self.with_expand_conv:
                out = self.expand_conv(out)
            out = self.depthwise_conv(out)
            if self.with_se:
                out = self.se(out)
            out = self.attention(self.linear_conv(out))
            if self.with_res_shortcut:
                return x + self.drop_path(out)
            return out

        if self.with_cp and x.requires_grad:
            return cp.checkpoint(_inner_forward, x, use_reentrant=False)
        return _inner_forward(x)


class InvertedResidualAttention(CheckedPretrainedMixin):
    """For an inverted-residual backbone (mmdet's MobileNetV2, prm_det's
    MnasNet), put first among its bases: the ``attention`` argument, read
    before the backbone's ``__init__`` builds its blocks, a module of it for
    a block of a given width, its tensors' names and the checked
    ``init_cfg`` load (:class:`CheckedPretrainedMixin`).

    Args:
        attention (str | dict | None): 'prm', 'se', 'gc' or a config dict,
            as for :class:`AttentionResNet`; None (or the class's
            ``default_attention``) for none. For PRM without ``groups``,
            each block takes :func:`prm_heads` of its width.
        **kwargs: The backbone's arguments.
    """

    default_attention: AttentionSpec = None

    def __init__(self, attention: AttentionSpec = None, **kwargs) -> None:
        # the backbone's __init__ builds the blocks, which read it
        self.attention = attention_cfg(attention, self.default_attention)
        super().__init__(**kwargs)

    def _attention_for(self, channels: int) -> nn.Module:
        """The attention module of a block of ``channels`` outputs."""
        cfg = self.attention
        if cfg is None:
            return nn.Identity()
        if cfg['type'] == 'PRM' and 'groups' not in cfg:
            cfg = dict(cfg, groups=prm_heads(channels))
        return build_attention(cfg, channels)

    def attention_tensor_names(self) -> list:
        """State-dict names of the blocks' attention tensors (what an
        ImageNet checkpoint of the plain network lacks)."""
        return [name for name in self.state_dict()
                if '.attention.' in name]


@register_model
class AttentionMobileNetV2(InvertedResidualAttention, MobileNetV2):
    """mmdet's MobileNetV2 with an attention module in every block.

    Args:
        attention (str | dict | None): 'prm', 'se', 'gc' or a config dict,
            as for :class:`AttentionResNet`. For PRM without ``groups``,
            each block takes :func:`prm_heads` of its width.
        **kwargs: Every argument of mmdet's ``MobileNetV2`` (widen_factor,
            out_indices, frozen_stages, norm_cfg, norm_eval, with_cp,
            init_cfg, ...). An ``init_cfg`` of type ``'Pretrained'`` is
            checked (:mod:`prm_det.models.backbones.pretrained`).
    """

    def make_layer(self, out_channels, num_blocks, stride, expand_ratio):
        """mmdet's layer of ``num_blocks`` inverted residual blocks, each
        with the attention."""
        layers = []
        for index in range(num_blocks):
            layers.append(AttentionInvertedResidual(
                self.in_channels, out_channels,
                mid_channels=int(round(self.in_channels * expand_ratio)),
                stride=stride if index == 0 else 1,
                with_expand_conv=expand_ratio != 1,
                conv_cfg=self.conv_cfg, norm_cfg=self.norm_cfg,
                act_cfg=self.act_cfg, with_cp=self.with_cp,
                attention=self._attention_for(out_channels)))
            self.in_channels = out_channels
        return nn.Sequential(*layers)

    def train(self, mode: bool = True):
        """mmdet's ``train`` (frozen stages, ``norm_eval``), returning the
        module as ``nn.Module.train`` does (mmdet's returns None, so
        ``model.eval()`` could not be chained)."""
        super().train(mode)
        return self


@register_model
class PRMMobileNetV2(AttentionMobileNetV2):
    """MobileNetV2 with PRM in every inverted residual block."""
    default_attention = 'prm'
