"""Convert published ImageNet attention-ResNet weights to prm_det's
backbones, so a detector's backbone can start from them.

    python tools/model_converters/attention2prm_det.py SRC DST
        [--kind {auto,se,sge,cbam,bam,sk}]
        [--source {auto,pytorchinsight,timm,mmpretrain}]
        [--depth {18,34,50,101,152}]

SRC: a PytorchInsight SE/SGE/CBAM/BAM/SK-ResNet or attention-module
CBAM/BAM-ResNet ``.pth.tar`` (``state_dict`` with ``module.`` keys), a timm
``seresnet50/101`` (``.pth``, ``.bin``, ``.safetensors``) or an MMPretrain
``SEResNet``. The attention, the layout and the depth are read from its keys;
the result (prm_det's ``SEResNet``, ``SGEResNet``, ``CBAMResNet``,
``BAMResNet`` or ``SKResNet`` keys, classifier dropped) is checked against
a freshly built backbone of that depth (every tensor filled, shapes equal,
nothing extra) and saved as ``{'state_dict', 'meta'}``. The tool prints the
backbone type and the ``--cfg-options`` to train from DST. Key layouts and
the renaming: :mod:`prm_det.models.converters`, docs/tools.md.

A checkpoint that could run code when loaded is refused (loaded as data);
``PRM_DET_TRUST_CHECKPOINTS=1`` loads one you trust.
"""
import argparse
import os.path as osp
import sys
from typing import Optional

# run from a checkout: its prm_det first (installed, the tools sit in
# prm_det/.mim/tools/ and import the installed package)
_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if osp.isdir(osp.join(_ROOT, 'prm_det')):
    sys.path.insert(0, _ROOT)

from prm_det.models.converters import (DEPTHS, KINDS,  # noqa: E402
                                       LAYOUTS, Conversion, ConversionError,
                                       convert_file)


def parse_args(argv=None, kinds=('auto', ) + KINDS,
               sources=('auto', ) + LAYOUTS, description=None):
    parser = argparse.ArgumentParser(
        description=description or 'Convert PytorchInsight / '
        'attention-module / timm / MMPretrain attention-ResNet weights '
        '(SE, SGE, CBAM, BAM, SK) to prm_det backbone keys')
    parser.add_argument('src', help='source checkpoint (.pth, .pth.tar, '
                        '.bin, .safetensors)')
    parser.add_argument('dst', help='where to save the converted checkpoint')
    if len(kinds) > 1:
        parser.add_argument('--kind', choices=kinds, default='auto',
                            help='attention of SRC (default: from its keys)')
    parser.add_argument('--source', choices=sources, default='auto',
                        help='key layout of SRC (default: from its keys)')
    parser.add_argument('--depth', type=int, choices=DEPTHS,
                        help='ResNet depth (default: from the blocks)')
    args = parser.parse_args(argv)
    if len(kinds) == 1:
        args.kind = kinds[0]
    return args


def main(argv: Optional[list] = None) -> Conversion:
    args = parse_args(argv)
    return convert_file(args.src, args.dst, args.kind, args.source,
                        args.depth)


def run(main_function) -> None:
    """``main_function()``, a refused or unreadable file ending the
    process with one ``error:`` line (no traceback)."""
    from prm_det.engine import UnusableCheckpoint, UntrustedCheckpoint
    try:
        main_function()
    except (ConversionError, FileNotFoundError, UntrustedCheckpoint,
            UnusableCheckpoint) as error:
        sys.exit(f'[convert] error: {error}')


if __name__ == '__main__':
    run(main)
