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

from mmdet.registry import MODELS

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

    def forward_conv1(self, x):
        """The first 3x3 step: conv1, norm1, ReLU (SK joins a grouped
        branch)."""
        return self.relu(self.norm1(self.conv1(x)))

    def forward(self, x):

        def _inner_forward(x):
            identity = x
            out = self.conv2(self.forward_conv1(x))
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

    def forward_conv2(self, out):
        """The 3x3 step: conv2, norm2, ReLU (SK joins a grouped branch)."""
        return self.relu(self.norm2(self.conv2(out)))

    def forward(self, x):

        def _inner_forward(x):
            identity = x
            out = self.conv1(x)
            out = self.norm1(out)
            out = self.relu(out)
            if self.with_plugins:
                out = self.forward_plugin(out, self.after_conv1_plugin_names)
            out = self.forward_conv2(out)
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
    """The names of a residual block's attention modules: its plugins (the
    attention and any extra ``plugins``) and the blocks' own attention
    units (SK's ``sk``)."""
    own = list(getattr(block, 'attention_unit_names', ()))
    if isinstance(block, PluginBasicBlock):
        return own + list(block.plugin_names)
    if not block.with_plugins:
        return own
    return own + (block.after_conv1_plugin_names +
                  block.after_conv2_plugin_names +
                  block.after_conv3_plugin_names)


STAGE_POSITIONS = ('after_stage', 'before_last_block')


def _check_flags(option: str, flags, num_stages: int, example) -> tuple:
    """``flags`` as a tuple of bools, one per stage, or a ValueError naming
    ``option`` and an example that would work."""
    # a string is a sequence too: 'FFFF' would be four True flags
    if (not isinstance(flags, (list, tuple)) or len(flags) != num_stages
            or not all(isinstance(s, (bool, int)) and s in (0, 1)
                       for s in flags)):
        raise ValueError(
            f'{option} needs one flag per stage ({num_stages} for '
            f'num_stages={num_stages}), a tuple of True/False such as '
            f'{example}; got {flags!r}')
    return tuple(bool(s) for s in flags)


@register_model
class AttentionResNet(CheckedPretrainedMixin, ResNet):
    """ResNet with an attention module in the residual blocks of some stages.

    Args:
        depth (int): 18, 34, 50, 101 or 152.
        attention (str | dict | None): A short name ('prm', 'se', 'gc',
            'ge', 'sge', 'cbam', 'bam'), a plugin config dict such as
            ``dict(type='PRM', groups=32)``, or a dict without ``type``
            that updates the class default's options. Defaults to the
            class's own attention.
        attention_stages (Sequence[bool] | None): Which stages carry the
            attention, one flag per stage. Defaults to the class's own.
        stage_attention (dict | None): A module between blocks (BAM,
            non-local): ``cfg`` (its config), ``stages`` (one flag per
            stage) and ``position`` ('after_stage': on the stage's output;
            'before_last_block': on the input of its last block). A dict
            without ``cfg`` updates the class default's. Defaults to the
            class's own (none for most).
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
    default_stage_attention: Optional[dict] = None

    def __init__(self,
                 depth: int,
                 attention: AttentionSpec = None,
                 attention_stages: Optional[Sequence[bool]] = None,
                 stage_attention: Optional[dict] = None,
                 plugins: Optional[list] = None,
                 **kwargs) -> None:
        if depth not in self.arch_settings:
            raise ValueError(f'depth must be one of '
                             f'{sorted(self.arch_settings)}, got {depth!r}')
        num_stages = kwargs.get('num_stages', 4)
        if attention_stages is None:
            attention_stages = self.default_stages or (True, ) * num_stages
        attention_stages = _check_flags(
            'attention_stages', attention_stages, num_stages,
            (False, ) + (True, ) * (num_stages - 1))
        cfg = attention_cfg(attention, self.default_attention)
        stage_attention = self._stage_attention_cfg(stage_attention,
                                                    num_stages)

        plugins = list(plugins or [])
        if cfg is not None:
            plugins.append(
                dict(cfg=cfg, position='after_conv3',
                     stages=attention_stages))
        super().__init__(depth, plugins=plugins or None, **kwargs)
        self.attention = cfg
        self.attention_stages = attention_stages
        self.stage_attention = stage_attention
        self.stage_attention_names = self._make_stage_attention()
        self._freeze_stages()  # the stage attention of frozen stages too

        # mmdet's ResNet zero-inits the last norm of its own blocks only (an
        # identity check on the block class); do the same for ours.
        if (self.zero_init_residual and kwargs.get('init_cfg') is None
                and kwargs.get('pretrained') is None):
            last_norm = ('norm2' if issubclass(self.block, PluginBasicBlock)
                         else 'norm3')
            for name in self.res_layers:
                for block in getattr(self, name):
                    block.init_cfg = dict(
                        type='Constant', val=0, override=dict(name=last_norm))


    def _stage_attention_cfg(self, stage_attention: Optional[dict],
                             num_stages: int) -> Optional[dict]:
        """``stage_attention`` (or the class default, updated by a dict
        without ``cfg``) checked: ``cfg`` (a module config, ``in_channels``
        filled in), ``stages`` (one flag per stage) and ``position``
        ('after_stage': on the stage's output, as BAM; 'before_last_block':
        on the input of the stage's last block, as the non-local paper's
        detection models)."""
        base = self.default_stage_attention
        if stage_attention is None:
            stage_attention = base
        elif base is not None and 'cfg' not in stage_attention:
            stage_attention = {**base, **stage_attention}
        if stage_attention is None:
            return None
        unknown = set(stage_attention) - {'cfg', 'stages', 'position'}
        if unknown or 'cfg' not in stage_attention:
            raise ValueError(
                f'stage_attention takes cfg (a module config), stages (one '
                f'flag per stage) and position {STAGE_POSITIONS}; got '
                f'{stage_attention!r}')
        position = stage_attention.get('position', 'after_stage')
        if position not in STAGE_POSITIONS:
            raise ValueError(f'stage_attention.position must be one of '
                             f'{STAGE_POSITIONS}, got {position!r}')
        default_flags = (True, ) * (num_stages - 1) + (False, )
        flags = _check_flags(
            f'stage_attention.stages (num_stages={num_stages}: '
            f"{stage_attention['cfg'].get('type')} needs one flag for each "
            f'of the stages it may follow)',
            stage_attention.get('stages', default_flags), num_stages,
            default_flags)
        return dict(cfg=dict(stage_attention['cfg']), stages=flags,
                    position=position)

    def _make_stage_attention(self) -> dict:
        """Build the stage attention modules: ``{stage index: name}``, each
        module an attribute named after its ``_abbr_`` and its stage
        (``bam1``: after stage 1, as the official BAM-ResNet's names)."""
        if self.stage_attention is None:
            return {}
        names = {}
        cfg = self.stage_attention['cfg']
        for i, flag in enumerate(self.stage_attention['stages']):
            if not flag:
                continue
            # a stage's output width, also its last block's input width
            channels = self.base_channels * 2**i * self.block.expansion
            module = MODELS.build(dict(cfg, in_channels=channels))
            name = f"{getattr(module, '_abbr_', 'stage_attention')}{i + 1}"
            self.add_module(name, module)
            names[i] = name
        return names

    def _freeze_stages(self):
        super()._freeze_stages()
        for i, name in getattr(self, 'stage_attention_names', {}).items():
            if i < self.frozen_stages:
                module = getattr(self, name)
                module.eval()
                for param in module.parameters():
                    param.requires_grad = False

    def forward(self, x):
        if not self.stage_attention_names:
            return super().forward(x)
        # mmdet's ResNet.forward, with the stage attention
        if self.deep_stem:
            x = self.stem(x)
        else:
            x = self.relu(self.norm1(self.conv1(x)))
        x = self.maxpool(x)
        outs = []
        before_last = (self.stage_attention['position'] ==
                       'before_last_block')
        for i, layer_name in enumerate(self.res_layers):
            res_layer = getattr(self, layer_name)
            name = self.stage_attention_names.get(i)
            if name is None:
                x = res_layer(x)
            elif before_last:
                *blocks, last = res_layer  # (slicing would build a ResLayer)
                for block in blocks:
                    x = block(x)
                x = last(self._stage_attention(name, x))
            else:
                x = self._stage_attention(name, res_layer(x))
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)

    def _stage_attention(self, name: str, x):
        """The stage attention ``name`` on ``x``; an empty batch (a
        sampler's last) passes as it is, since mmcv's NonLocal2d cannot
        reshape one."""
        if x.shape[0] == 0:
            return x
        return getattr(self, name)(x)

    def attention_tensor_names(self) -> list:
        """State-dict names of the attention modules' tensors (what an
        ImageNet ResNet checkpoint lacks)."""
        names = [f'{name}.{key}'
                 for name in self.stage_attention_names.values()
                 for key in getattr(self, name).state_dict()]
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


@register_model
class GEResNet(AttentionResNet):
    """ResNet with parameter-free gather-excite (GE-theta-minus, global
    extent) in every block, all stages: the PRM paper's GE-ResNet50."""
    default_attention = 'ge'


@register_model
class SGEResNet(AttentionResNet):
    """ResNet with spatial group-wise enhance (64 groups) in every block,
    all stages, as PytorchInsight's SGE-ResNet."""
    default_attention = 'sge'


@register_model
class CBAMResNet(AttentionResNet):
    """ResNet with CBAM (r=16, 7x7 spatial gate) in every block, all
    stages, as attention-module's ResNet + CBAM."""
    default_attention = 'cbam'


@register_model
class BAMResNet(AttentionResNet):
    """ResNet with BAM (r=16, dilation 4) on the outputs of stages 1-3, as
    attention-module's ResNet + BAM (names ``bam1``-``bam3``); no
    attention inside the blocks. ``stage_attention=dict(cfg=dict(
    type='BAM', combine='add'))`` gives the paper's sum of branches."""
    default_stage_attention = dict(cfg=dict(type='BAM'),
                                   stages=(True, True, True, False),
                                   position='after_stage')


@register_model
class NLResNet(AttentionResNet):
    """ResNet with one of mmcv's ``NonLocal2d`` (embedded Gaussian,
    reduction 2, zero-initialized output) on the input of stage c4's last
    block: the non-local paper's placement for COCO detection (Wang et
    al., CVPR 2018, one block before the last residual block of res4)."""
    default_stage_attention = dict(cfg=dict(type='NonLocal2d'),
                                   stages=(False, False, True, False),
                                   position='before_last_block')
