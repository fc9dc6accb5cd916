"""ResNet backbones with an attention module in every residual block.

One family, variants by argument (as timm's ``attn_layer``): the attention is
an mmcv plugin placed after the last norm of the residual branch, before the
shortcut is added, which is where PRM (Ma & Fu, IJCAI 2020), SE (Hu et al.,
CVPR 2018) and GC (Cao et al., ICCV 2019) put it. Everything else is mmdet's
``ResNet``: every argument it takes works here, so swapping
``type='ResNet'`` for ``type='PRMResNet'`` changes nothing but the attention.
"""
from typing import Optional, Sequence

import torch.utils.checkpoint as cp
from mmdet.models.backbones.resnet import BasicBlock, Bottleneck, ResNet

from ...private_apis import HOOK_KINDS, hooks_on
from ..layers.factory import AttentionSpec, attention_cfg
from ..registry import register_model
from .pretrained import CheckedPretrainedMixin


class PluginBasicBlock(BasicBlock):
    """mmdet's BasicBlock plus plugins after its last norm.

    mmdet's BasicBlock refuses plugins. This one accepts them at
    'after_conv2' (after norm2, before the shortcut add: the same place as
    'after_conv3' in a Bottleneck) and also under the name 'after_conv3', so
    one plugin list serves both block types.
    """

    _positions = ('after_conv2', 'after_conv3')

    def __init__(self, inplanes, planes, *args, plugins=None, **kwargs):
        super().__init__(inplanes, planes, *args, plugins=None, **kwargs)
        for plugin in plugins or []:
            if plugin['position'] not in self._positions:
                raise ValueError(
                    f'a BasicBlock takes plugins at {self._positions} (after '
                    f'its last norm), got position={plugin["position"]!r}')
        # mmdet's Bottleneck builds and names plugins the same way
        self.plugin_names = Bottleneck.make_block_plugins(
            self, planes, [plugin['cfg'] for plugin in plugins or []])

    def forward(self, x):

        def _inner_forward(x):
            identity = x
            out = self.conv1(x)
            out = self.norm1(out)
            out = self.relu(out)
            out = self.conv2(out)
            if self.downsample is not None:
                identity = self.downsample(x)
            return _block_tail(self, self.plugin_names, out, self.norm2,
                               identity, self.relu, _is_scratch(self.conv2))

        if self.with_cp and x.requires_grad:
            return cp.checkpoint(_inner_forward, x, use_reentrant=False)
        return _inner_forward(x)


def _is_scratch(conv) -> bool:
    """Whether ``conv``'s output is the block's alone: no forward hook (the
    module's or a global one) can have kept a reference to it."""
    return not hooks_on(conv, 'forward', 'forward_pre')


def _hooked(module) -> bool:
    """Whether a hook (the module's or a global one) expects ``module`` to
    be called: forward hooks and pre-hooks, and backward hooks and
    pre-hooks, which torch attaches to the tensors of a module's call."""
    return hooks_on(module, *HOOK_KINDS)


def _block_tail(block, plugin_names, out, norm, identity, relu,
                out_is_scratch=False):
    """A residual block's tail from its last conv's output: norm, plugins,
    shortcut add, ReLU. When the attention can do more of it itself, it
    does: ``forward_norm_residual`` (PRM after a BatchNorm2d: the norm's
    output is not kept for backward, and in inference the result goes over
    the conv's output when it is scratch) or ``forward_residual`` (PRM: the
    add and the ReLU in its gating pass, two passes over the map fewer than
    mmdet's ``out += identity; relu(out)``). Where a hook sits on the norm
    or the attention (feature capture, visualization, gradient
    inspection: forward or backward hooks), every module is called as in a
    plain block, so the hooks fire."""
    last = getattr(block, plugin_names[-1]) if plugin_names else None
    fuse = last is not None and not _hooked(last)
    if (fuse and len(plugin_names) == 1 and not _hooked(norm)
            and hasattr(last, 'forward_norm_residual')):
        return last.forward_norm_residual(out, norm, identity,
                                          reuse_c=out_is_scratch)
    out = norm(out)
    for name in plugin_names[:-1]:
        out = getattr(block, name)(out)
    if fuse and hasattr(last, 'forward_residual'):
        return last.forward_residual(out, identity)
    if last is not None:
        out = last(out)
    if _hooked(last if last is not None else norm):
        # a hook may hold this output (a full backward hook wraps it, and
        # torch refuses writes over it): add out of place
        out = out + identity
    else:
        out += identity
    return relu(out)


class AttentionBottleneck(Bottleneck):
    """mmdet's Bottleneck whose 'after_conv3' plugins end with the shortcut
    add and ReLU (fused into PRM when PRM is the last plugin)."""

    def forward(self, x):

        def _inner_forward(x):
            identity = x
            out = self.conv1(x)
            out = self.norm1(out)
            out = self.relu(out)
            if self.with_plugins:
                out = self.forward_plugin(out, self.after_conv1_plugin_names)
            out = self.conv2(out)
            out = self.norm2(out)
            out = self.relu(out)
            if self.with_plugins:
                out = self.forward_plugin(out, self.after_conv2_plugin_names)
            out = self.conv3(out)
            if self.downsample is not None:
                identity = self.downsample(x)
            names = self.after_conv3_plugin_names if self.with_plugins else []
            return _block_tail(self, names, out, self.norm3, identity,
                               self.relu, _is_scratch(self.conv3))

        if self.with_cp and x.requires_grad:
            return cp.checkpoint(_inner_forward, x, use_reentrant=False)
        return _inner_forward(x)


def _plugin_names(block) -> list:
    """The names of a residual block's plugin modules (the attention and
    any extra ``plugins``)."""
    if isinstance(block, PluginBasicBlock):
        return list(block.plugin_names)
    if not block.with_plugins:
        return []
    return (block.after_conv1_plugin_names + block.after_conv2_plugin_names
            + block.after_conv3_plugin_names)


@register_model
class AttentionResNet(CheckedPretrainedMixin, ResNet):
    """ResNet with an attention module in the residual blocks of some stages.

    Args:
        depth (int): 18, 34, 50, 101 or 152.
        attention (str | dict | None): 'prm', 'se', 'gc', a plugin config
            dict such as ``dict(type='PRM', groups=32)``, or a dict without
            ``type`` that updates the class default's options. Defaults to
            the class's own attention.
        attention_stages (Sequence[bool] | None): Which stages carry the
            attention, one flag per stage. Defaults to the class's own.
        **kwargs: Every argument of mmdet's ``ResNet`` (out_indices,
            frozen_stages, norm_cfg, norm_eval, style, with_cp, dcn, plugins,
            init_cfg, ...). Extra ``plugins`` go in before the attention.
            An ``init_cfg`` of type ``'Pretrained'`` is checked: a
            checkpoint that leaves tensors unloaded stops training
            (``allow_partial``: :mod:`prm_det.models.backbones.pretrained`).

    Example:
        >>> import torch
        >>> from mmdet.utils import register_all_modules
        >>> import prm_det
        >>> register_all_modules()
        >>> from mmdet.registry import MODELS
        >>> model = MODELS.build(dict(type='PRMResNet', depth=18))
        >>> outs = model(torch.rand(1, 3, 64, 64))
        >>> [tuple(o.shape) for o in outs]
        [(1, 64, 16, 16), (1, 128, 8, 8), (1, 256, 4, 4), (1, 512, 2, 2)]
    """

    arch_settings = {
        18: (PluginBasicBlock, (2, 2, 2, 2)),
        34: (PluginBasicBlock, (3, 4, 6, 3)),
        50: (AttentionBottleneck, (3, 4, 6, 3)),
        101: (AttentionBottleneck, (3, 4, 23, 3)),
        152: (AttentionBottleneck, (3, 8, 36, 3)),
    }
    default_attention: AttentionSpec = None
    default_stages: Optional[Sequence[bool]] = None  # None: every stage

    def __init__(self,
                 depth: int,
                 attention: AttentionSpec = None,
                 attention_stages: Optional[Sequence[bool]] = None,
                 plugins: Optional[list] = None,
                 **kwargs) -> None:
        if depth not in self.arch_settings:
            raise ValueError(f'depth must be one of '
                             f'{sorted(self.arch_settings)}, got {depth!r}')
        num_stages = kwargs.get('num_stages', 4)
        if attention_stages is None:
            attention_stages = self.default_stages or (True, ) * num_stages
        # a string is a sequence too: 'FFFF' would be four True flags
        if (not isinstance(attention_stages, (list, tuple))
                or len(attention_stages) != num_stages or not all(
                    isinstance(s, (bool, int)) and s in (0, 1)
                    for s in attention_stages)):
            raise ValueError(
                f'attention_stages needs one flag per stage ({num_stages} '
                f'for num_stages={num_stages}), a tuple of True/False such '
                f'as {(False, ) + (True, ) * (num_stages - 1)}; got '
                f'{attention_stages!r}')
        attention_stages = tuple(bool(s) for s in attention_stages)
        cfg = attention_cfg(attention, self.default_attention)

        plugins = list(plugins or [])
        if cfg is not None:
            plugins.append(
                dict(cfg=cfg, position='after_conv3',
                     stages=attention_stages))
        super().__init__(depth, plugins=plugins or None, **kwargs)
        self.attention = cfg
        self.attention_stages = attention_stages

        # mmdet's ResNet zero-inits the last norm of its own blocks only (an
        # identity check on the block class); do the same for ours.
        if (self.zero_init_residual and kwargs.get('init_cfg') is None
                and kwargs.get('pretrained') is None):
            last_norm = 'norm2' if self.block is PluginBasicBlock else 'norm3'
            for name in self.res_layers:
                for block in getattr(self, name):
                    block.init_cfg = dict(
                        type='Constant', val=0, override=dict(name=last_norm))


    def attention_tensor_names(self) -> list:
        """State-dict names of the blocks' plugin modules' tensors (what
        an ImageNet ResNet checkpoint lacks)."""
        names = []
        for layer_name in self.res_layers:
            for index, block in enumerate(getattr(self, layer_name)):
                for plugin in _plugin_names(block):
                    prefix = f'{layer_name}.{index}.{plugin}.'
                    names += [prefix + key for key in
                              getattr(block, plugin).state_dict()]
        return names


@register_model
class PRMResNet(AttentionResNet):
    """ResNet with PRM after the last norm of every block, all stages."""
    default_attention = 'prm'


@register_model
class SEResNet(AttentionResNet):
    """ResNet with squeeze-excitation (r=16) in every block, all stages."""
    default_attention = 'se'


@register_model
class GCResNet(AttentionResNet):
    """ResNet with GCNet's global context block (r=16) in stages c3-c5."""
    default_attention = 'gc'
    default_stages = (False, True, True, True)
