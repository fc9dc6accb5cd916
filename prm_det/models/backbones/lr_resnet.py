"""LR-ResNet: the Local Relation Networks of Hu, Zhang, Xie & Lin ("Local
Relation Networks for Image Recognition", ICCV 2019,
https://arxiv.org/abs/1904.11491) as an mmdet backbone.

Every spatial convolution of mmdet's ResNet becomes a local relation layer
(:class:`~prm_det.models.layers.local_relation.LocalRelation2d`: 7x7
windows, 8 channels sharing each aggregation weight map, squared-difference
appearance term, geometric prior, final 1x1):

- a Bottleneck's 3x3 ``conv2`` is ``LocalRelation2d(width, width, 7,
  stride)``, followed by the block's ``norm2`` and ReLU as before; the
  bottleneck width is the ResNet's times ``width_multiplier`` (the paper
  widens 64/128/256/512 to 100/200/400/800, 1.5625x, to spend the FLOPs a
  7x7 relation saves over a 3x3 conv), rounded to the nearest multiple of
  ``channels_per_group`` (100 is no multiple of 8: it becomes 104);
- the stem's 7x7 conv is a 1x1 conv (3 -> 64), BN, ReLU, then
  ``LocalRelation2d(64, 64, 7, stride=2)``, BN, ReLU, then the max pool
  (``lr_stem=False`` keeps mmdet's 7x7 conv stem). It is a ``stem``
  Sequential, as mmdet's deep stem is, so mmdet's forward and
  ``frozen_stages`` treat it as one.

Depths 26 ([2, 2, 2, 2] Bottlenecks, the paper's LR-Net-26), 50, 101 and
152 (mmdet's Bottleneck stages). Depths 18 and 34 (no LR-Net in the paper)
build the same way on BasicBlocks: both 3x3 convs are local relation
layers, the first strided, with the width between them widened the same
way, so that every mmdet depth builds (the shapes demo is a depth-18 one,
as the other demos).

Every other mmdet ``ResNet`` argument works as there (out_indices,
frozen_stages, norm_cfg, norm_eval, style, with_cp, plugins, init_cfg,
...), except those that act on the 3x3 convs that are gone: ``dcn`` and
``dilations`` other than 1 stop the build. docs/models.md gives the sizes
against the paper's.
"""
import math
from typing import Optional

import torch
from mmcv.cnn import build_conv_layer, build_norm_layer
from torch import nn

from prm_det.ops.local_relation import SIMILARITIES
from prm_det.ops.pointwise_norm import (pointwise_batch_moments,
                                        pointwise_norm_relu)

from ..layers.local_relation import LocalRelation2d
from ..registry import register_model
from .attention_resnet import (AttentionBottleneck, AttentionResNet,
                               PluginBasicBlock)

LR_DEFAULTS = dict(kernel_size=7, channels_per_group=8,
                   similarity='squared_difference', prior_hidden=None)
# the paper's bottleneck widths 100/200/400/800 over ResNet's 64...512
PAPER_WIDTH_MULTIPLIER = 1.5625


def lr_width(planes: int, width_multiplier: float,
             channels_per_group: int) -> int:
    """A block's inner width: ``planes * width_multiplier`` to the nearest
    multiple of ``channels_per_group``, halves up (the paper's 100 -> 104
    for 8; 200, 400, 800 stay), at least one group."""
    groups = math.floor(planes * width_multiplier / channels_per_group + 0.5)
    return max(groups, 1) * channels_per_group


class LRBottleneck(AttentionBottleneck):
    """mmdet's Bottleneck with a local relation layer as its ``conv2`` (the
    stride sits there in the 'pytorch' style) and its width between the 1x1
    convs ``lr_width(planes, ...)`` instead of ``planes``."""

    attention_unit_names = ('conv2', )

    def __init__(self, inplanes, planes, *args,
                 local_relation: dict = LR_DEFAULTS,
                 width_multiplier: float = PAPER_WIDTH_MULTIPLIER,
                 **kwargs):
        super().__init__(inplanes, planes, *args, **kwargs)
        if self.with_dcn:
            raise ValueError('LRResNet: dcn has no 3x3 conv to deform (the '
                             'local relation layer replaces it); use '
                             'dcn=None')
        width = lr_width(planes, width_multiplier,
                         local_relation['channels_per_group'])
        self.width = width
        if width != planes:
            self.conv1 = build_conv_layer(self.conv_cfg, inplanes, width,
                                          kernel_size=1,
                                          stride=self.conv1_stride,
                                          bias=False)
            self.add_module(self.norm1_name,
                            build_norm_layer(self.norm_cfg, width,
                                             postfix=1)[1])
            self.add_module(self.norm2_name,
                            build_norm_layer(self.norm_cfg, width,
                                             postfix=2)[1])
            self.conv3 = build_conv_layer(self.conv_cfg, width,
                                          planes * self.expansion,
                                          kernel_size=1, bias=False)
            if self.with_plugins:  # those on the inner width, rebuilt
                for name in (self.after_conv1_plugin_names +
                             self.after_conv2_plugin_names):
                    delattr(self, name)
                self.after_conv1_plugin_names = self.make_block_plugins(
                    width, self.after_conv1_plugins)
                self.after_conv2_plugin_names = self.make_block_plugins(
                    width, self.after_conv2_plugins)
        self.conv2 = LocalRelation2d(width, width, stride=self.conv2_stride,
                                     **local_relation)


class LRBasicBlock(PluginBasicBlock):
    """mmdet's BasicBlock with local relation layers as both its convs
    (``conv1`` strided), the width between them widened as a Bottleneck's
    (module docstring)."""

    attention_unit_names = ('conv1', 'conv2')

    def __init__(self, inplanes, planes, stride=1, dilation=1, *args,
                 norm_cfg=dict(type='BN'), local_relation: dict = LR_DEFAULTS,
                 width_multiplier: float = PAPER_WIDTH_MULTIPLIER, **kwargs):
        if kwargs.get('dcn') is not None:
            raise ValueError('LRResNet: dcn has no 3x3 conv to deform (the '
                             'local relation layers replace them); use '
                             'dcn=None')
        super().__init__(inplanes, planes, stride, dilation, *args,
                         norm_cfg=norm_cfg, **kwargs)
        width = lr_width(planes, width_multiplier,
                         local_relation['channels_per_group'])
        self.width = width
        self.conv1 = LocalRelation2d(inplanes, width, stride=stride,
                                     **local_relation)
        self.add_module(self.norm1_name,
                        build_norm_layer(norm_cfg, width, postfix=1)[1])
        self.conv2 = LocalRelation2d(width, planes, **local_relation)


class LRStem(nn.Sequential):
    """The paper's stem: 1x1 conv, BN, ReLU, the strided local relation
    layer, BN, ReLU (``stem.0`` ... ``stem.5``, as modules one after
    another in a state dict).

    Where the first BN is a plain ``nn.BatchNorm2d`` after a plain 1x1
    ``nn.Conv2d`` without bias, the first three run as one matmul with
    BatchNorm folded into the conv's weight and a bias
    (:mod:`prm_det.ops.pointwise_norm`: the full-resolution map written
    once instead of written three times and read four more): with the
    running statistics in evaluation, and in training with the batch's,
    taken from the input's covariance (the same numbers), the running
    statistics updated as BatchNorm does. Otherwise (SyncBN, GN, another
    conv_cfg, a batch BN refuses, and while tracing: get_flops and ONNX
    export see the modules) the modules run.
    """

    def forward(self, x):
        conv, norm, relu = self[0], self[1], self[2]
        if _folds_into_one_matmul(conv, norm, x):
            x = _pointwise_norm_relu(x, conv, norm)
        else:
            x = relu(norm(conv(x)))
        for module in self[3:]:
            x = module(x)
        return x


def _batch_statistics(norm) -> bool:
    """Whether ``norm`` normalizes with the batch's statistics (as
    ``_BatchNorm.forward`` decides)."""
    return norm.training or not norm.track_running_stats


def _folds_into_one_matmul(conv, norm, x) -> bool:
    return (not torch.jit.is_tracing() and type(norm) is nn.BatchNorm2d
            and type(conv) is nn.Conv2d and conv.bias is None
            and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.groups == 1 and x.dim() == 4
            # BN refuses one value a channel in training: its error
            and x.numel() > x.shape[1])


def _pointwise_norm_relu(x, conv, norm):
    """The first three of :class:`LRStem` as one matmul, BatchNorm's
    running statistics used or updated as in ``nn.BatchNorm2d.forward``."""
    if not _batch_statistics(norm):
        return pointwise_norm_relu(x, conv.weight, norm.weight, norm.bias,
                                   norm.running_mean, norm.running_var,
                                   norm.eps)
    mean, var = pointwise_batch_moments(x, conv.weight)
    if norm.training and norm.track_running_stats:
        with torch.no_grad():
            norm.num_batches_tracked.add_(1)
            factor = (1.0 / norm.num_batches_tracked.to(mean.dtype)
                      if norm.momentum is None else norm.momentum)
            count = x.numel() // x.shape[1]
            unbiased = var * (count / (count - 1))
            for running, batch in ((norm.running_mean, mean),
                                   (norm.running_var, unbiased)):
                running.copy_(torch.lerp(running.to(batch.dtype), batch,
                                         factor))
    return pointwise_norm_relu(x, conv.weight, norm.weight, norm.bias, mean,
                               var, norm.eps)


def _check_local_relation(local_relation: Optional[dict]) -> dict:
    """``local_relation`` over the defaults, each option checked (the
    divisibility of the widths: :meth:`LRResNet._check_widths`)."""
    cfg = {**LR_DEFAULTS, **(local_relation or {})}
    unknown = set(cfg) - set(LR_DEFAULTS)
    if unknown:
        raise ValueError(f'LRResNet: local_relation takes '
                         f'{sorted(LR_DEFAULTS)}, got {sorted(unknown)}')
    k = cfg['kernel_size']
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k % 2 == 0:
        raise ValueError(
            f'LRResNet: local_relation.kernel_size must be a positive odd '
            f'int (the window is centred on its position), such as 3, 5 or '
            f'7 (the paper\'s); got {k!r}')
    m = cfg['channels_per_group']
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise ValueError(f'LRResNet: local_relation.channels_per_group must '
                         f'be a positive int (the paper\'s is 8), got {m!r}')
    if cfg['similarity'] not in SIMILARITIES:
        raise ValueError(f'LRResNet: local_relation.similarity must be one '
                         f'of {SIMILARITIES}, got {cfg["similarity"]!r}')
    hidden = cfg['prior_hidden']
    if hidden is not None and (not isinstance(hidden, int) or hidden < 1):
        raise ValueError(f'LRResNet: local_relation.prior_hidden must be a '
                         f'positive int or None (groups // 2), got '
                         f'{hidden!r}')
    return cfg


def _divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


@register_model
class LRResNet(AttentionResNet):
    """ResNet whose spatial convolutions are local relation layers
    (LR-Net, Hu et al., ICCV 2019; module docstring).

    Args:
        depth (int): 26 or 50 (the paper's LR-Net-26/50), 101, 152; 18 and
            34 on BasicBlocks.
        local_relation (dict): The layers' ``kernel_size`` (7, odd),
            ``channels_per_group`` (8; must divide the stem's and, at
            depths 18/34, ``base_channels``), ``similarity``
            ('squared_difference', 'dot_product', 'absolute_difference')
            and ``prior_hidden`` (None: groups // 2).
        width_multiplier (float): Block inner width over ResNet's
            (``planes``), rounded to a multiple of ``channels_per_group``.
            Defaults to the paper's 1.5625 (widths 104, 200, 400, 800).
        lr_stem (bool): The local relation stem (1x1 conv, BN, ReLU, 7x7
            local relation at stride 2, BN, ReLU). False: mmdet's stem
            (7x7 conv, or ``deep_stem``). Defaults to True.
        **kwargs: every :class:`AttentionResNet` argument (an ``attention``
            goes after each block's last norm as in the other backbones;
            none by default); ``dcn`` and dilations other than 1 are
            refused.
    """

    arch_settings = {
        18: (LRBasicBlock, (2, 2, 2, 2)),
        26: (LRBottleneck, (2, 2, 2, 2)),
        34: (LRBasicBlock, (3, 4, 6, 3)),
        50: (LRBottleneck, (3, 4, 6, 3)),
        101: (LRBottleneck, (3, 4, 23, 3)),
        152: (LRBottleneck, (3, 8, 36, 3)),
    }

    def __init__(self, depth: int, local_relation: Optional[dict] = None,
                 width_multiplier: float = PAPER_WIDTH_MULTIPLIER,
                 lr_stem: bool = True, **kwargs) -> None:
        self.lr_cfg = _check_local_relation(local_relation)
        if (isinstance(width_multiplier, bool)
                or not isinstance(width_multiplier, (int, float))
                or not width_multiplier > 0):
            raise ValueError(f'LRResNet: width_multiplier must be a positive '
                             f'number (the paper\'s 1.5625), got '
                             f'{width_multiplier!r}')
        self.width_multiplier = width_multiplier
        self.lr_stem = bool(lr_stem)
        if self.lr_stem and kwargs.get('deep_stem'):
            raise ValueError('LRResNet: deep_stem=True replaces the stem, and '
                             'so does lr_stem=True (the default); choose one '
                             '(lr_stem=False for the deep stem)')
        if kwargs.get('dcn') is not None:
            raise ValueError('LRResNet: dcn has no 3x3 conv to deform (local '
                             'relation layers replace them); use dcn=None')
        dilations = kwargs.get('dilations', (1, ) * kwargs.get('num_stages',
                                                               4))
        if any(d != 1 for d in dilations):
            raise ValueError(f'LRResNet: the local relation layer has no '
                             f'dilation; dilations must all be 1, got '
                             f'{tuple(dilations)!r}')
        self._check_widths(depth, kwargs)
        super().__init__(depth, **kwargs)

    def _check_widths(self, depth, kwargs) -> None:
        """channels_per_group divides every width a layer aggregates: the
        stem's, and at depths 18/34 each block's input (multiples of
        base_channels); the Bottleneck widths are made multiples of it."""
        m = self.lr_cfg['channels_per_group']
        base = kwargs.get('base_channels', 64)
        stem = kwargs.get('stem_channels') or base
        widths = []
        if self.lr_stem:
            widths.append(('the stem\'s stem_channels', stem))
        block = self.arch_settings.get(depth, (None, ))[0]
        if block is LRBasicBlock:
            widths.append(('the first blocks\' input stem_channels', stem))
            widths.append(('base_channels', base))
        for what, width in widths:
            if width % m:
                raise ValueError(
                    f'LRResNet: local_relation.channels_per_group={m} must '
                    f'divide {what}={width}; pick one of '
                    f'{_divisors(width)} or a multiple of {m} for {what}')

    def make_res_layer(self, **kwargs):
        return super().make_res_layer(local_relation=self.lr_cfg,
                                      width_multiplier=self.width_multiplier,
                                      **kwargs)

    def _make_stem_layer(self, in_channels, stem_channels):
        if not self.lr_stem:
            return super()._make_stem_layer(in_channels, stem_channels)
        # a `stem` Sequential as mmdet's deep stem: its forward and
        # _freeze_stages take it whole
        self.deep_stem = True
        self.stem = LRStem(
            build_conv_layer(self.conv_cfg, in_channels, stem_channels,
                             kernel_size=1, bias=False),
            build_norm_layer(self.norm_cfg, stem_channels)[1],
            nn.ReLU(inplace=True),
            LocalRelation2d(stem_channels, stem_channels, stride=2,
                            **self.lr_cfg),
            build_norm_layer(self.norm_cfg, stem_channels)[1],
            nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def attention_tensor_names(self) -> list:
        """State-dict names of the local relation layers' tensors (and any
        attention's): what an ImageNet ResNet checkpoint lacks."""
        names = super().attention_tensor_names()
        if self.lr_stem:
            names += [f'stem.3.{key}' for key in self.stem[3].state_dict()]
        return names
