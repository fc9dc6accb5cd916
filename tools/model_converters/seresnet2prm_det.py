"""Convert ImageNet SE-ResNet weights from timm or MMPretrain to prm_det's
``SEResNet`` keys, so a detector's backbone can start from them.

    python tools/model_converters/seresnet2prm_det.py SRC DST
        [--source {auto,timm,mmpretrain}] [--depth {18,34,50,101,152}]

Then train with
``--cfg-options model.backbone.init_cfg.checkpoint=DST`` on an SE config
(``configs/retinanet_se_r50.py``).

Key layouts, as the sources' model definitions name them:

* timm ``seresnet50`` / ``seresnet101`` (``timm/models/resnet.py``,
  ``timm/layers/squeeze_excite.py``): torchvision's ResNet keys
  (``conv1``, ``bn1``, ``layer1.0.conv1`` ... ``bn3``, ``downsample.0/1``),
  the SE layer as ``layer1.0.se.fc1`` / ``se.fc2`` (1x1 convs with bias), the
  classifier ``fc``.
* MMPretrain ``SEResNet`` (``mmpretrain/models/backbones/seresnet.py``,
  ``mmpretrain/models/utils/se_layer.py``): ``backbone.`` and the same ResNet
  keys, the SE layer as ``se_layer.conv1.conv`` / ``se_layer.conv2.conv``
  (mmcv ConvModules), the classifier under ``head.``.
* prm_det's ``SEResNet`` (mmdet's ResNet with mmdet's SELayer as the plugin
  ``se``): the same ResNet keys, SE as ``se.conv1.conv`` / ``se.conv2.conv``.

Every converted key is checked against a freshly built ``SEResNet`` of the
same depth (names and shapes); source keys that map to nothing are listed,
and the classifier is dropped (a detector has none). A BatchNorm saved
without ``num_batches_tracked`` (checkpoints from before PyTorch 0.4.1, and
many published ones) gets it as PyTorch's own ``load_state_dict`` fills it:
0, the buffer's default (used only when a BatchNorm has ``momentum=None``).
"""
import argparse
import os.path as osp
import re
import sys
from collections import OrderedDict
from typing import Dict, List, NamedTuple, Optional

import torch

# run from a checkout: its prm_det first (installed, the tools sit in
# prm_det/.mim/tools/ and import the installed package)
_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if osp.isdir(osp.join(_ROOT, 'prm_det')):
    sys.path.insert(0, _ROOT)

SOURCES = ('timm', 'mmpretrain')
# The ResNet part, named alike in torchvision, timm, MMPretrain and mmdet.
_RESNET_KEY = re.compile(
    r'^(conv1\.weight|bn1\.\w+|'
    r'layer[1-4]\.\d+\.(conv[1-3]\.weight|bn[1-3]\.\w+|downsample\.[01]\.\w+))$')
# SE layer: source name -> prm_det's (mmdet SELayer: two ConvModules)
_SE_KEYS = {
    'timm': (re.compile(r'^(layer[1-4]\.\d+)\.se\.fc([12])\.(weight|bias)$'),
             r'\1.se.conv\2.conv.\3'),
    'mmpretrain': (re.compile(
        r'^(layer[1-4]\.\d+)\.se_layer\.conv([12])\.conv\.(weight|bias)$'),
        r'\1.se.conv\2.conv.\3'),
}
_CLASSIFIER = {'timm': re.compile(r'^fc\.'),
               'mmpretrain': re.compile(r'^head\.')}
# blocks per stage -> depth (bottleneck, basic)
_DEPTHS = {(True, (3, 4, 6, 3)): 50, (True, (3, 4, 23, 3)): 101,
           (True, (3, 8, 36, 3)): 152, (False, (2, 2, 2, 2)): 18,
           (False, (3, 4, 6, 3)): 34}


class ConversionError(ValueError):
    """The source does not fit prm_det's SEResNet."""


class Conversion(NamedTuple):
    state_dict: 'OrderedDict[str, torch.Tensor]'  # prm_det SEResNet keys
    source: str  # 'timm' or 'mmpretrain'
    dropped: List[str]  # classifier keys, not used by a detector
    unmapped: List[str]  # source keys that map to nothing


def detect_source(state_dict: Dict[str, torch.Tensor]) -> str:
    """'timm' or 'mmpretrain', from how the SE layers are named."""
    keys = list(state_dict)
    if any('.se_layer.' in k for k in keys):
        return 'mmpretrain'
    if any(re.search(r'\.se\.fc[12]\.', k) for k in keys):
        return 'timm'
    raise ConversionError(
        'not an SE-ResNet checkpoint of timm (keys like layer1.0.se.fc1.'
        'weight) or MMPretrain (keys like backbone.layer1.0.se_layer.conv1.'
        f'conv.weight); first keys: {keys[:5]}')


def convert(state_dict: Dict[str, torch.Tensor],
            source: str = 'auto') -> Conversion:
    """Rename a timm or MMPretrain SE-ResNet state dict to prm_det's
    ``SEResNet`` keys (tensors are not copied)."""
    if source == 'auto':
        source = detect_source(state_dict)
    if source not in SOURCES:
        raise ConversionError(
            f'source must be one of {SOURCES} or auto, got {source!r}')
    se_pattern, se_target = _SE_KEYS[source]
    converted, dropped, unmapped = OrderedDict(), [], []
    for key, value in state_dict.items():
        if _CLASSIFIER[source].match(key):
            dropped.append(key)
            continue
        name = key
        if source == 'mmpretrain':
            if not key.startswith('backbone.'):
                unmapped.append(key)
                continue
            name = key[len('backbone.'):]
        if se_pattern.match(name):
            converted[se_pattern.sub(se_target, name)] = value
        elif _RESNET_KEY.match(name):
            converted[name] = value
        else:
            unmapped.append(key)
    return Conversion(with_num_batches_tracked(converted), source, dropped,
                      unmapped)


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
        kind = 'bottleneck' if bottleneck else 'basic'
        raise ConversionError(
            f'{kind} blocks per stage {tuple(blocks)} match no ResNet depth '
            f'(18, 34, 50, 101, 152); pass --depth')
    return depth


def check_against_seresnet(state_dict: Dict[str, torch.Tensor],
                           depth: int) -> None:
    """Raise :class:`ConversionError` unless ``state_dict`` fills every key
    of a prm_det ``SEResNet`` of ``depth``, with the same shapes, and has no
    other key."""
    from mmdet.registry import MODELS

    import prm_det  # noqa: F401  (registers SEResNet)
    target = MODELS.build(dict(type='SEResNet', depth=depth)).state_dict()
    missing = sorted(set(target) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(target))
    mismatched = [
        f'{k}: {tuple(state_dict[k].shape)} here, {tuple(target[k].shape)} '
        f'in SEResNet' for k in target
        if k in state_dict and state_dict[k].shape != target[k].shape]
    problems = []
    if missing:
        problems.append(f'{len(missing)} SEResNet-{depth} keys not filled: '
                        f'{missing[:8]}')
    if unexpected:
        problems.append(f'{len(unexpected)} keys SEResNet-{depth} does not '
                        f'have: {unexpected[:8]}')
    if mismatched:
        problems.append(f'{len(mismatched)} shapes differ (prm_det\'s SE has '
                        f'int(channels / 16) hidden channels): '
                        f'{mismatched[:4]}')
    if problems:
        raise ConversionError('the converted weights do not fit prm_det\'s '
                              'SEResNet:\n  ' + '\n  '.join(problems))


def load_source(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from a .pth/.pth.tar/.bin (plain, or under 'state_dict'
    or 'model') or a .safetensors file. Loaded without running code
    (``weights_only``)."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    if path.endswith('.safetensors'):
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            raise ImportError(
                f'{path} is a safetensors file: pip install safetensors, or '
                f'download the .bin / .pth file instead') from error
        return load_file(path)
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    for key in ('state_dict', 'model'):
        if isinstance(checkpoint, dict) and isinstance(
                checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
    # DataParallel / DDP checkpoints
    return OrderedDict((k[len('module.'):] if k.startswith('module.') else k,
                        v) for k, v in checkpoint.items())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Convert timm / MMPretrain SE-ResNet weights to '
        'prm_det SEResNet keys')
    parser.add_argument('src', help='source checkpoint (.pth, .bin, '
                        '.safetensors)')
    parser.add_argument('dst', help='where to save the converted checkpoint')
    parser.add_argument('--source', choices=('auto', ) + SOURCES,
                        default='auto',
                        help='key layout of SRC (default: from its keys)')
    parser.add_argument('--depth', type=int,
                        choices=(18, 34, 50, 101, 152),
                        help='ResNet depth (default: from the blocks)')
    return parser.parse_args(argv)


def main(argv: Optional[list] = None) -> Conversion:
    args = parse_args(argv)
    result = convert(load_source(args.src), args.source)
    depth = args.depth or infer_depth(result.state_dict)
    print(f'[convert] {args.src}: {result.source} layout, SE-ResNet-{depth}, '
          f'{len(result.state_dict)} keys mapped')
    if result.dropped:
        print(f'[convert] dropped the classifier: '
              f'{", ".join(result.dropped)}')
    if result.unmapped:
        print(f'[convert] not mapped ({len(result.unmapped)}): '
              f'{", ".join(result.unmapped)}')
    check_against_seresnet(result.state_dict, depth)
    torch.save(dict(state_dict=result.state_dict,
                    meta=dict(converted_from=osp.basename(args.src),
                              source=result.source, depth=depth)), args.dst)
    print(f'[convert] saved {args.dst}; use it with --cfg-options '
          f'model.backbone.init_cfg.checkpoint={args.dst}')
    return result


if __name__ == '__main__':
    try:
        main()
    except (ConversionError, FileNotFoundError) as error:
        sys.exit(f'[convert] error: {error}')
