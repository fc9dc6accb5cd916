"""Published ImageNet attention-ResNet weights to prm_det's backbones.

What ``tools/model_converters/attention2prm_det.py`` (and its older name
``seresnet2prm_det.py``) runs. A source checkpoint is recognized from its
keys: the attention (SE, SGE, CBAM, BAM, SK), the layout (who saved it) and
the depth (blocks per stage); its keys are renamed to those of the matching
prm_det backbone (``SEResNet``, ``SGEResNet``, ``CBAMResNet``, ``BAMResNet``,
``SKResNet``), the classifier is dropped, and the result is checked against
a freshly built backbone of that depth: every tensor filled, every shape
equal, no key left over, so prm_det's checked pretrained load
(:mod:`prm_det.models.backbones.pretrained`) takes it with no
``allow_partial``.

Layouts, as the sources' model definitions name their parameters:

* ``pytorchinsight``: PytorchInsight (github implus/PytorchInsight,
  ``classification/models/imagenet/resnet_{se,sge,cbam,bam,sk}.py``, saved
  by ``classification/imagenet.py``) and attention-module (github
  Jongchan/attention-module, ``MODELS/model_resnet.py``, ``cbam.py``,
  ``bam.py``, saved by ``train_imagenet.py``): a dict whose ``state_dict``
  has DataParallel's ``module.`` keys; torchvision's ResNet names (``conv1``,
  ``bn1``, ``layer1.0.conv1`` ... ``bn3``, ``downsample.0/1``, classifier
  ``fc``) and the attention as
  SE ``layer1.0.se.fc.0`` / ``se.fc.2`` (Linear c -> c/16 -> c),
  SGE ``layer1.0.sge.weight`` / ``.bias`` [1, 64, 1, 1],
  CBAM ``layer1.0.cbam.ChannelGate.mlp.1`` / ``.mlp.3`` and
  ``cbam.SpatialGate.spatial.conv`` / ``.spatial.bn``,
  BAM ``bam1``-``bam3`` (after stages 1-3) ``.channel_att.gate_c.*`` and
  ``.spatial_att.gate_s.*``,
  SK (Bottleneck) ``layer1.0.conv2g``, ``bn2g``, ``conv_fc1``, ``bn_fc1``,
  ``conv_fc2`` beside the block's ``conv2`` / ``bn2``.
* ``timm``: timm's ``seresnet50`` / ``seresnet101`` (``timm/models/
  resnet.py``, ``timm/layers/squeeze_excite.py``): torchvision's ResNet
  names, SE as ``layer1.0.se.fc1`` / ``se.fc2`` (1x1 convs with bias),
  classifier ``fc``.
* ``mmpretrain``: MMPretrain's ``SEResNet`` (``mmpretrain/models/backbones/
  seresnet.py``, ``mmpretrain/models/utils/se_layer.py``): the same ResNet
  names under ``backbone.``, SE as ``se_layer.conv1.conv`` /
  ``se_layer.conv2.conv``, classifier under ``head.``.

prm_det's names: mmdet's ResNet names are torchvision's; SE is mmdet's
``SELayer`` (``se.conv1.conv``, ``se.conv2.conv``: 1x1 convs, so
PytorchInsight's Linear weights [o, i] become [o, i, 1, 1]); the other
attention modules' official names map through
:data:`prm_det.models.official_names.OFFICIAL_NAMES`.

A BatchNorm saved without ``num_batches_tracked`` (checkpoints from before
PyTorch 0.4.1, and many published ones) gets it as PyTorch's own
``load_state_dict`` fills it: 0, the buffer's default.
"""
import os.path as osp
import re
from collections import OrderedDict
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

from .backbones.pretrained import compare_state_dicts
from .official_names import OFFICIAL_NAMES, rename_official

KINDS = ('se', 'sge', 'cbam', 'bam', 'sk')
LAYOUTS = ('pytorchinsight', 'timm', 'mmpretrain')
DEPTHS = (18, 34, 50, 101, 152)
# prm_det backbone of each attention
BACKBONES = {'se': 'SEResNet', 'sge': 'SGEResNet', 'cbam': 'CBAMResNet',
             'bam': 'BAMResNet', 'sk': 'SKResNet'}
NAMES = {'se': 'SE', 'sge': 'SGE', 'cbam': 'CBAM', 'bam': 'BAM', 'sk': 'SK'}
_ARTICLE = {'se': 'an', 'sge': 'an', 'cbam': 'a', 'bam': 'a', 'sk': 'an'}
# which layouts hold which attention
LAYOUT_KINDS = {'pytorchinsight': KINDS, 'timm': ('se', ),
                'mmpretrain': ('se', )}
LAYOUT_NAMES = {'pytorchinsight': 'PytorchInsight / attention-module',
                'timm': 'timm', 'mmpretrain': 'MMPretrain'}
# attention-module published CBAM and BAM ResNets only
_ATTENTION_MODULE = ('cbam', 'bam')

# The ResNet part, named alike in torchvision, PytorchInsight,
# attention-module, timm, MMPretrain and mmdet.
_RESNET_KEY = re.compile(
    r'^(conv1\.weight|bn1\.\w+|'
    r'layer[1-4]\.\d+\.(conv[1-3]\.weight|bn[1-3]\.\w+|downsample\.[01]\.\w+))$')
_BLOCK = r'layer[1-4]\.\d+'
# (kind, layout) -> a key (no 'module.', no 'backbone.') that only a
# checkpoint of that attention in that layout has
_SIGNATURES = {
    ('se', 'pytorchinsight'): re.compile(rf'^{_BLOCK}\.se\.fc\.[02]\.'),
    ('se', 'timm'): re.compile(rf'^{_BLOCK}\.se\.fc[12]\.'),
    ('se', 'mmpretrain'): re.compile(rf'^{_BLOCK}\.se_layer\.conv[12]\.conv\.'),
    ('sge', 'pytorchinsight'): re.compile(rf'^{_BLOCK}\.sge\.(weight|bias)$'),
    ('cbam', 'pytorchinsight'): re.compile(
        rf'^{_BLOCK}\.cbam\.(ChannelGate|SpatialGate)\.'),
    ('bam', 'pytorchinsight'): re.compile(
        r'^bam[1-3]\.(channel_att\.gate_c|spatial_att\.gate_s)\.'),
    ('sk', 'pytorchinsight'): re.compile(
        rf'^{_BLOCK}\.(conv2g|bn2g|conv_fc1|bn_fc1|conv_fc2)\.'),
}
# what each known layout looks like, for a refusal
EXAMPLES = {
    ('se', 'pytorchinsight'): 'layer1.0.se.fc.0.weight, layer1.0.se.fc.2.'
                              'weight (Linear)',
    ('se', 'timm'): 'layer1.0.se.fc1.weight, layer1.0.se.fc2.weight '
                    '(1x1 conv)',
    ('se', 'mmpretrain'): 'backbone.layer1.0.se_layer.conv1.conv.weight, '
                          'head.fc.weight',
    ('sge', 'pytorchinsight'): 'layer1.0.sge.weight, layer1.0.sge.bias',
    ('cbam', 'pytorchinsight'): 'layer1.0.cbam.ChannelGate.mlp.1.weight, '
                                'layer1.0.cbam.SpatialGate.spatial.conv.'
                                'weight',
    ('bam', 'pytorchinsight'): 'bam1.channel_att.gate_c.gate_c_fc_0.weight, '
                               'bam1.spatial_att.gate_s.gate_s_conv_reduce0.'
                               'weight',
    ('sk', 'pytorchinsight'): 'layer1.0.conv2g.weight, layer1.0.conv_fc1.'
                              'weight',
}
# prm_det's own attention keys (a file converted already)
_PRM_DET_KEY = re.compile(
    rf'^({_BLOCK}\.(se\.conv[12]\.conv|cbam\.(channel_fc[12]|spatial_conv)'
    rf'|sk\.grouped_conv)|bam[1-3]\.(channel_fc[12]|spatial_reduce))\.')
# SE: source name -> prm_det's (mmdet SELayer: two ConvModules)
_SE_KEYS = {
    'pytorchinsight': (re.compile(
        rf'^({_BLOCK})\.se\.fc\.([02])\.(weight|bias)$'),
        lambda m: f'{m.group(1)}.se.conv{int(m.group(2)) // 2 + 1}.conv.'
                  f'{m.group(3)}'),
    'timm': (re.compile(rf'^({_BLOCK})\.se\.fc([12])\.(weight|bias)$'),
             r'\1.se.conv\2.conv.\3'),
    'mmpretrain': (re.compile(
        rf'^({_BLOCK})\.se_layer\.conv([12])\.conv\.(weight|bias)$'),
        r'\1.se.conv\2.conv.\3'),
}
_CLASSIFIER = {'pytorchinsight': re.compile(r'^fc\.'),
               'timm': re.compile(r'^fc\.'),
               'mmpretrain': re.compile(r'^head\.')}
# blocks per stage -> depth (bottleneck, basic)
_DEPTHS = {(True, (3, 4, 6, 3)): 50, (True, (3, 4, 23, 3)): 101,
           (True, (3, 8, 36, 3)): 152, (False, (2, 2, 2, 2)): 18,
           (False, (3, 4, 6, 3)): 34}
# configs/ that use each backbone at depth 50
CONFIGS = {kind: (f'configs/retinanet_{kind}_r50.py',
                  f'configs/cascade_rcnn_{kind}_r50.py') for kind in KINDS}
SHOWN = 8  # keys listed per kind in a message


class ConversionError(ValueError):
    """The source is not a checkpoint this converter knows, or its
    converted weights do not fit the prm_det backbone."""


class Conversion(NamedTuple):
    state_dict: 'OrderedDict[str, torch.Tensor]'  # prm_det's keys
    source: str  # the layout: 'pytorchinsight', 'timm' or 'mmpretrain'
    dropped: List[str]  # classifier keys, not used by a detector
    unmapped: List[str]  # source keys that map to nothing
    kind: str = 'se'  # 'se', 'sge', 'cbam', 'bam' or 'sk'


def _some(keys: List[str]) -> str:
    shown = ', '.join(keys[:SHOWN])
    return shown + (f', ... ({len(keys)} in all)' if len(keys) > SHOWN
                    else '')


def source_name(kind: str, layout: str) -> str:
    """Who publishes ``kind`` in ``layout``, for messages."""
    if layout == 'pytorchinsight' and kind not in _ATTENTION_MODULE:
        return 'PytorchInsight'
    return LAYOUT_NAMES[layout]


def known_layouts() -> str:
    """One line per known (attention, layout): what its keys look like."""
    return '\n'.join(
        f'  {NAMES[kind]}-ResNet, {source_name(kind, layout)}: {example}'
        for (kind, layout), example in EXAMPLES.items())


def strip_prefixes(state_dict: Dict[str, torch.Tensor]
                   ) -> 'OrderedDict[str, torch.Tensor]':
    """``state_dict`` without DataParallel's / DDP's ``module.``."""
    return OrderedDict(
        (k[len('module.'):] if k.startswith('module.') else k, v)
        for k, v in state_dict.items())


def _model_keys(keys: List[str]) -> Tuple[List[str], bool]:
    """The keys without MMPretrain's ``backbone.``, and whether they had
    it (an MMPretrain classifier)."""
    backbone = [k[len('backbone.'):] for k in keys
                if k.startswith('backbone.')]
    if backbone:
        return backbone, True
    return keys, False


def unrecognized_message(keys: List[str], kind: Optional[str] = None) -> str:
    """Why ``keys`` are refused: what was found, what each known layout
    looks like."""
    model_keys, _ = _model_keys(keys)
    if kind is None:
        what = ('not a checkpoint of an attention ResNet this converter '
                'knows')
    else:
        layouts = ' or '.join(source_name(kind, layout)
                              for (k, layout) in EXAMPLES if k == kind)
        what = (f'not {_ARTICLE[kind]} {NAMES[kind]}-ResNet checkpoint of '
                f'{layouts} (tools/model_converters/attention2prm_det.py '
                f'takes every layout below)')
    found = (f'{len(keys)} key{"s" if len(keys) != 1 else ""}, the '
             f'first: {keys[:5]}')
    others = sorted({NAMES[k] for (k, _), signature in _SIGNATURES.items()
                     for key in model_keys if signature.match(key)})
    if others:
        found += f'; these are {" and ".join(others)}-ResNet keys'
    elif any(_PRM_DET_KEY.match(k) for k in model_keys):
        found += ('; these are prm_det\'s own attention keys (a converted '
                  'file): it loads as it is')
    elif kind is None and any(_RESNET_KEY.match(k) for k in model_keys):
        found += ('; ResNet keys and no attention module this converter '
                  'knows: a plain ResNet needs no conversion (the configs '
                  "load it with init_cfg.allow_partial='attention')")
    return (f'{what}; found {found}.\nKnown layouts (keys may carry '
            f"DataParallel's 'module.'; the ResNet part is torchvision's: "
            f'conv1, bn1, layer1.0.conv1 ... downsample.0):\n'
            f'{known_layouts()}')


def detect(state_dict: Dict[str, torch.Tensor],
           kind: str = 'auto') -> Tuple[str, str]:
    """``(kind, layout)`` of a source state dict, from its attention keys
    (``kind`` given: only that attention's layouts are looked for)."""
    keys = list(strip_prefixes(state_dict))
    model_keys, _ = _model_keys(keys)
    found = sorted({(k, layout) for (k, layout), signature
                    in _SIGNATURES.items() if kind in ('auto', k)
                    for key in model_keys if signature.match(key)})
    if not found:
        raise ConversionError(unrecognized_message(
            keys, None if kind == 'auto' else kind))
    if len(found) > 1:
        raise ConversionError(
            'keys of more than one attention layout: ' + '; '.join(
                f'{NAMES[k]}-ResNet of {source_name(k, layout)} (keys like '
                f'{EXAMPLES[(k, layout)]})' for k, layout in found) +
            f'; first keys: {keys[:5]}. Pass --kind and --source.')
    return found[0]


def _attention_name(name: str, kind: str, layout: str) -> Optional[str]:
    """prm_det's name of an attention key (no prefixes), or None."""
    if kind == 'se':
        pattern, target = _SE_KEYS[layout]
        return pattern.sub(target, name) if pattern.match(name) else None
    if not _SIGNATURES[(kind, layout)].match(name):
        return None
    if kind == 'sge':  # the official names are prm_det's
        return name
    renamed = rename_official(name, OFFICIAL_NAMES[kind])
    return renamed if renamed != name else None


def convert(state_dict: Dict[str, torch.Tensor], kind: str = 'auto',
            source: str = 'auto') -> Conversion:
    """Rename a source state dict to prm_det's keys (tensors are not
    copied, except PytorchInsight's SE Linear weights, viewed as 1x1
    convs). ``kind``: 'auto' or one of :data:`KINDS`; ``source`` (the
    layout): 'auto' or one of :data:`LAYOUTS`."""
    if kind not in ('auto', ) + KINDS:
        raise ConversionError(f'kind must be one of {KINDS} or auto, got '
                              f'{kind!r}')
    if source not in ('auto', ) + LAYOUTS:
        raise ConversionError(f'source must be one of {LAYOUTS} or auto, '
                              f'got {source!r}')
    state_dict = strip_prefixes(state_dict)
    if kind == 'auto' or source == 'auto':
        found_kind, found_source = detect(state_dict, kind)
        kind = found_kind
        source = found_source if source == 'auto' else source
    if kind not in LAYOUT_KINDS[source]:
        raise ConversionError(
            f'{source_name(kind, source)} checkpoints of {NAMES[kind]}-ResNet are '
            f'not a layout this converter knows; {LAYOUT_NAMES[source]} '
            f'has {", ".join(NAMES[k] for k in LAYOUT_KINDS[source])}')
    converted, dropped, unmapped = OrderedDict(), [], []
    for key, value in state_dict.items():
        if _CLASSIFIER[source].match(key):
            dropped.append(key)
            continue
        name = key
        if source == 'mmpretrain' and key.startswith('backbone.'):
            name = key[len('backbone.'):]
        ours = _attention_name(name, kind, source)
        if ours is not None:
            if (source == 'pytorchinsight' and kind == 'se'
                    and value.dim() == 2):
                value = value[:, :, None, None]  # Linear -> 1x1 conv
            converted[ours] = value
        elif _RESNET_KEY.match(name):
            converted[name] = value
        else:
            unmapped.append(key)
    return Conversion(with_num_batches_tracked(converted), source, dropped,
                      unmapped, kind)


def with_num_batches_tracked(
        state_dict: 'OrderedDict[str, torch.Tensor]'
) -> 'OrderedDict[str, torch.Tensor]':
    """``state_dict`` with ``num_batches_tracked`` after each BatchNorm's
    ``running_var`` that has none: 0, as ``nn.BatchNorm2d`` loads a state
    dict saved before the buffer existed."""
    filled = OrderedDict()
    for key, value in state_dict.items():
        filled[key] = value
        if key.endswith('.running_var'):
            tracked = key[:-len('running_var')] + 'num_batches_tracked'
            if tracked not in state_dict:
                filled[tracked] = torch.tensor(0, dtype=torch.long)
    return filled


def infer_depth(state_dict: Dict[str, torch.Tensor]) -> int:
    """ResNet depth from the number of blocks per stage (prm_det keys)."""
    blocks = []
    for stage in range(1, 5):
        indices = {int(m.group(1)) for k in state_dict
                   for m in [re.match(rf'^layer{stage}\.(\d+)\.', k)] if m}
        blocks.append(max(indices) + 1 if indices else 0)
    bottleneck = any(re.match(r'^layer1\.0\.conv3\.', k) for k in state_dict)
    depth = _DEPTHS.get((bottleneck, tuple(blocks)))
    if depth is None:
        block = 'bottleneck' if bottleneck else 'basic'
        raise ConversionError(
            f'{block} blocks per stage {tuple(blocks)} match no ResNet depth '
            f'(18, 34, 50, 101, 152); pass --depth')
    return depth


def build_backbone(kind: str, depth: int) -> torch.nn.Module:
    """A fresh prm_det backbone for ``kind`` (the class itself, so no
    registry scope can pick another package's ``SEResNet``)."""
    from . import backbones
    return getattr(backbones, BACKBONES[kind])(depth=depth)


def check_against_backbone(state_dict: Dict[str, torch.Tensor], kind: str,
                           depth: int) -> None:
    """Raise :class:`ConversionError` unless ``state_dict`` fills every
    tensor of a fresh prm_det backbone for ``kind`` of ``depth``, with the
    same shapes, and has no other key."""
    name = f'{BACKBONES[kind]}-{depth}'
    target = build_backbone(kind, depth).state_dict()
    report = compare_state_dicts(
        {k: v.shape for k, v in target.items()}, state_dict)
    # every tensor, num_batches_tracked too (convert() fills it)
    missing = [k for k in target if k not in state_dict]
    mismatched = [
        f'{k}: {tuple(state_dict[k].shape)} here, {tuple(target[k].shape)} '
        f'in {name}' for k in report.mismatched]
    problems = []
    if missing:
        problems.append(f'{len(missing)} {name} tensors not filled: '
                        f'{_some(missing)}')
    if report.unexpected:
        problems.append(f'{len(report.unexpected)} keys {name} does not '
                        f'have: {_some(report.unexpected)}')
    if mismatched:
        problems.append(
            f'{len(mismatched)} shapes differ (prm_det\'s {NAMES[kind]} has '
            f'the official widths: int(channels / 16) hidden channels'
            f'{", 64 groups" if kind == "sge" else ""}'
            f'{", 32 groups" if kind == "sk" else ""}): '
            f'{"; ".join(mismatched[:4])}')
    if problems:
        raise ConversionError(
            f'the converted weights do not fit prm_det\'s {name}:\n  ' +
            '\n  '.join(problems))


def load_source(path: str) -> 'OrderedDict[str, torch.Tensor]':
    """A state dict from a .pth/.pth.tar/.bin (plain, or under 'state_dict'
    or 'model') or a .safetensors file, ``module.`` stripped. Loaded as
    data, as prm_det's tools load checkpoints (``load_checkpoint_file``: a
    file that could run code is refused, naming the opt-in)."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if path.endswith('.safetensors'):
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            raise ImportError(
                f'{path} is a safetensors file: pip install safetensors, or '
                f'download the .bin / .pth file instead') from error
        return strip_prefixes(load_file(path))
    from prm_det.engine import load_checkpoint_file
    checkpoint = load_checkpoint_file(path, map_location='cpu')
    for key in ('state_dict', 'model'):
        if isinstance(checkpoint, dict) and isinstance(
                checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict) or not all(
            torch.is_tensor(v) for v in checkpoint.values()):
        held = (sorted(checkpoint)[:8] if isinstance(checkpoint, dict)
                else type(checkpoint).__name__)
        raise ConversionError(
            f'{path} holds no state dict (tensors by name, at the top or '
            f"under 'state_dict' or 'model'); found {held}")
    return strip_prefixes(checkpoint)


def usage(kind: str, depth: int, dst: str) -> str:
    """How to train a detector from the converted file."""
    checkpoint = (f'model.backbone.init_cfg.checkpoint={dst} '
                  f'model.backbone.init_cfg.allow_partial=False')
    depth_option = '' if depth == 50 else f'model.backbone.depth={depth} '
    retina, cascade = CONFIGS[kind]
    return (f'train from it with the {NAMES[kind]} configs ({retina}, '
            f'{cascade}):\n'
            f'  python tools/train.py {retina} --cfg-options '
            f'{depth_option}{checkpoint}\n'
            f'or any config with mmdet\'s ResNet backbone:\n'
            f'  --cfg-options model.backbone.type={BACKBONES[kind]} '
            f'model.backbone.depth={depth} {checkpoint}')


def convert_file(src: str, dst: str, kind: str = 'auto',
                 source: str = 'auto', depth: Optional[int] = None,
                 log: Callable[[str], None] = print) -> Conversion:
    """Convert the checkpoint ``src``, check it against the prm_det
    backbone, save ``{'state_dict', 'meta'}`` to ``dst``; ``log`` gets
    what was found and done. Raises :class:`ConversionError` (nothing
    saved) for a file it does not recognize or whose weights do not fit."""
    result = convert(load_source(src), kind, source)
    depth = depth or infer_depth(result.state_dict)
    backbone = BACKBONES[result.kind]
    log(f'[convert] {src}: {result.source} layout, '
        f'{NAMES[result.kind]}-ResNet-{depth} -> prm_det {backbone}, '
        f'{len(result.state_dict)} keys mapped')
    if result.dropped:
        log(f'[convert] dropped the classifier: {", ".join(result.dropped)}')
    if result.unmapped:
        raise ConversionError(
            f'{len(result.unmapped)} keys of {src} map to no tensor of '
            f'{backbone}-{depth} (a variant this converter does not know; '
            f'nothing saved): {_some(result.unmapped)}')
    check_against_backbone(result.state_dict, result.kind, depth)
    log(f'[convert] checked against a fresh {backbone}-{depth}: all '
        f'{len(result.state_dict)} tensors filled, shapes equal, nothing '
        f'extra')
    torch.save(dict(state_dict=result.state_dict,
                    meta=dict(converted_from=osp.basename(src),
                              source=result.source, kind=result.kind,
                              backbone=backbone, depth=depth)), dst)
    log(f'[convert] saved {dst} (backbone type={backbone}, depth={depth}); '
        + usage(result.kind, depth, dst))
    return result
