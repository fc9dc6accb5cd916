"""Convert ImageNet SE-ResNet weights (timm, MMPretrain, PytorchInsight) to
prm_det's ``SEResNet`` keys: the SE part of
``tools/model_converters/attention2prm_det.py``, under the name this tool
had before that one converted SGE, CBAM, BAM and SK too.

    python tools/model_converters/seresnet2prm_det.py SRC DST
        [--source {auto,timm,mmpretrain,pytorchinsight}]
        [--depth {18,34,50,101,152}]

The same as ``attention2prm_det.py SRC DST --kind se``: key layouts, checks
and messages in :mod:`prm_det.models.converters` and docs/tools.md.
"""
import os.path as osp
import sys
from typing import Dict, Optional

import torch

# run from a checkout: its prm_det first (installed, the tools sit in
# prm_det/.mim/tools/ and import the installed package)
_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if osp.isdir(osp.join(_ROOT, 'prm_det')):
    sys.path.insert(0, _ROOT)

from prm_det.models import converters  # noqa: E402
from prm_det.models.converters import (Conversion,  # noqa: E402,F401
                                       ConversionError, infer_depth,
                                       load_source, with_num_batches_tracked)

SOURCES = converters.LAYOUTS


def _cli():
    """attention2prm_det.py beside this file, as a module."""
    from prm_det.engine import load_tool
    return load_tool(osp.join(osp.dirname(osp.abspath(__file__)),
                              'attention2prm_det.py'))


def detect_source(state_dict: Dict[str, torch.Tensor]) -> str:
    """The layout of an SE-ResNet state dict: 'timm', 'mmpretrain' or
    'pytorchinsight'."""
    return converters.detect(state_dict, 'se')[1]


def convert(state_dict: Dict[str, torch.Tensor],
            source: str = 'auto') -> Conversion:
    """Rename an SE-ResNet state dict to prm_det's ``SEResNet`` keys."""
    return converters.convert(state_dict, 'se', source)


def check_against_seresnet(state_dict: Dict[str, torch.Tensor],
                           depth: int) -> None:
    """Raise :class:`ConversionError` unless ``state_dict`` fills every
    tensor of a prm_det ``SEResNet`` of ``depth`` with equal shapes, and
    has no other key."""
    converters.check_against_backbone(state_dict, 'se', depth)


def parse_args(argv=None):
    return _cli().parse_args(
        argv, kinds=('se', ), description='Convert timm / MMPretrain / '
        'PytorchInsight SE-ResNet weights to prm_det SEResNet keys')


def main(argv: Optional[list] = None) -> Conversion:
    args = parse_args(argv)
    return converters.convert_file(args.src, args.dst, 'se', args.source,
                                   args.depth)


if __name__ == '__main__':
    _cli().run(main)
