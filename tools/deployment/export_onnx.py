"""Export a detector's backbone and neck to ONNX and check the file with
onnxruntime.

    python tools/deployment/export_onnx.py CONFIG [CHECKPOINT] --shape H W
        --out FILE [--dynamo] [--opset N] [--check-shape H W ...]
        [--trust-checkpoint] [--cfg-options k=v ...]

Builds the config's model (mmdet conventions: mmengine Config,
``custom_imports``, ``--cfg-options``), loads CHECKPOINT with mmengine's
``load_checkpoint`` (as data unless ``--trust-checkpoint``: a file that
could run code is refused with one ``error:`` line; without a checkpoint
the weights are random: a check of the graph, not a model to deploy), and
exports ``backbone`` + ``neck`` (the features the heads read) with
``torch.onnx.export``:

* input ``image`` [1, 3, H, W], the preprocessed image (the config's
  ``data_preprocessor``: mean/std normalization, channel order, padding to
  its ``pad_size_divisor``), with height and width dynamic;
* outputs ``feature0``, ``feature1``, ... (one per neck level, or per
  backbone stage without a neck).

PRM exports as standard ops (its readable reference is taken while
exporting). The TorchScript-based exporter writes opset 17; ``--dynamo``
takes the dynamo-based one (``torch.export``; opset 18, the lowest torch
2.13's writes; much slower to export). onnxruntime then runs the file at the
export size (and every ``--check-shape``) and its outputs are compared with
PyTorch's: the tool fails when the relative error (max abs difference /
max abs value, per output) is over ``--tolerance``.

Not exported: the heads and their post-processing (anchors, box decoding,
NMS and RoIAlign, which are mmcv ops). For a whole detector use MMDeploy
(github.com/open-mmlab/mmdeploy), which maps mmcv's ops to its ONNX
Runtime / TensorRT custom ops; with ``custom_imports`` loading prm_det its
mmdet configs take these backbones as they are.
"""
import argparse
import os
import os.path as osp
import sys
from typing import List, Optional

import torch

# run from a checkout: its prm_det first (installed, the tools sit in
# prm_det/.mim/tools/ and import the installed package)
_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if osp.isdir(osp.join(_ROOT, 'prm_det')):
    sys.path.insert(0, _ROOT)

from mmengine.config import DictAction  # noqa: E402

import prm_det  # noqa: E402,F401  (registers the backbones)
from prm_det.engine import (TRUST_ENV, ChecksumMismatch,  # noqa: E402
                            ConfigLoaderUnavailable, UnusableCheckpoint,
                            UntrustedCheckpoint)
from prm_det.deployment import (BackboneNeck, check_onnx,  # noqa: E402
                                export_onnx, missing_export_modules)

EXPORTED = ('backbone', 'neck')
NOT_PART_OF_THE_NETWORK = ('data_preprocessor', )


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(
        description='Export a detector\'s backbone + neck to ONNX')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', nargs='?',
                        help='checkpoint file (default: random weights)')
    parser.add_argument('--shape', type=int, nargs=2, required=True,
                        metavar=('H', 'W'), help='input height and width '
                        'to export at (the graph keeps them dynamic)')
    parser.add_argument('--out', required=True, help='the .onnx file')
    parser.add_argument('--dynamo', action='store_true',
                        help='use the dynamo-based exporter (torch.export; '
                        'needs onnxscript) instead of the TorchScript-based')
    parser.add_argument('--opset', type=int,
                        help='default: 17 (TorchScript), 18 (--dynamo)')
    parser.add_argument('--check-shape', type=int, nargs=2, action='append',
                        default=[], metavar=('H', 'W'),
                        help='also compare onnxruntime with PyTorch at this '
                        'size (repeatable)')
    parser.add_argument('--tolerance', type=float, default=1e-4,
                        help='largest relative error accepted (default '
                        '1e-4)')
    parser.add_argument(
        '--trust-checkpoint', action='store_true',
        help='load the checkpoint with full pickle, which can run code: only '
        'for a file you trust. Without it, it loads as tensors and the types '
        f'mmengine\'s Runner writes. Same as {TRUST_ENV}=1.')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override some settings in the used config, the key-value pair '
        'in xxx=yyy format will be merged into config file.')
    args = parser.parse_args(argv)
    if args.trust_checkpoint:
        os.environ[TRUST_ENV] = '1'
    return args


def build_detector(config: str, checkpoint: Optional[str],
                   cfg_options: Optional[dict]):
    """The config's detector in eval mode, on the CPU, with the checkpoint's
    weights (mmengine's ``load_checkpoint``) or random ones."""
    from mmdet.registry import MODELS
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import init_default_scope
    from mmengine.runner import load_checkpoint

    from prm_det.engine import local_file_missing
    from prm_det.engine import load_config
    cfg = load_config(config, cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    if checkpoint is not None and local_file_missing(checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {checkpoint}')
    # the checkpoint (or nothing) gives the weights: no pretrained download
    cfg.model.setdefault('backbone', {})['init_cfg'] = None
    model = revert_sync_batchnorm(MODELS.build(cfg.model))
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, map_location='cpu')
    model.eval()
    return cfg, model


def not_exported(model) -> List[str]:
    """The detector's parts this tool leaves out, with their types."""
    return [f'{name} ({type(module).__name__})'
            for name, module in model.named_children()
            if name not in EXPORTED + NOT_PART_OF_THE_NETWORK]


def _weights_where(out: str) -> str:
    data = out + '.data'
    if osp.isfile(data) and osp.getmtime(data) >= osp.getmtime(out) - 60:
        return (f'weights in {data}: keep it beside {osp.basename(out)} '
                f'(the .onnx alone has no weights)')
    return 'weights inside the file (one file to deploy)'


def main(argv: Optional[List[str]] = None) -> dict:
    from prm_det.engine import install_safe_loading
    install_safe_loading()  # the checkpoint loads as data
    args = parse_args(argv)
    missing = missing_export_modules(args.dynamo)
    if missing:
        raise SystemExit(
            f'error: the export needs {", ".join(missing)}, not installed '
            f'here: pip install {" ".join(missing)} (or prm_det\'s extra: '
            f'pip install "prm_det[onnx]", from a checkout pip install '
            f'".[onnx]")')
    try:
        cfg, detector = build_detector(args.config, args.checkpoint,
                                       args.cfg_options)
    except (FileNotFoundError, ConfigLoaderUnavailable, UntrustedCheckpoint,
            UnusableCheckpoint, ChecksumMismatch) as error:
        raise SystemExit(f'error: {error}')  # as tools/test.py's checkpoint
    model = BackboneNeck(detector.backbone, getattr(detector, 'neck', None))
    model.eval()
    height, width = args.shape
    image = torch.randn(1, 3, height, width,
                        generator=torch.Generator().manual_seed(0))
    out_dir = osp.dirname(osp.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    opset = export_onnx(model, image, args.out, dynamo=args.dynamo,
                        opset=args.opset)
    exporter = 'dynamo-based' if args.dynamo else 'TorchScript-based'
    parts = ' + '.join(name for name in EXPORTED
                       if getattr(model, name, None) is not None)
    weights = (f'weights of {args.checkpoint}' if args.checkpoint else
               'random weights')
    print(f'exported {parts} of {args.config} ({weights}) to {args.out}: '
          f'{exporter} exporter, opset {opset}, input image [1, 3, height, '
          f'width] (preprocessed as the config\'s data_preprocessor does), '
          f'height and width dynamic; {_weights_where(args.out)}')

    result = dict(out=args.out, opset=opset, errors={})
    sizes = [tuple(args.shape)] + [tuple(s) for s in args.check_shape]
    images = [torch.randn(1, 3, h, w,
                          generator=torch.Generator().manual_seed(h * w))
              for h, w in sizes]
    failed = []
    for (h, w), errors in zip(sizes, check_onnx(model, args.out, images)):
        result['errors'][(h, w)] = errors
        worst = max(errors)
        verdict = 'ok' if worst <= args.tolerance else 'MISMATCH'
        print(f'onnxruntime vs PyTorch at {h}x{w}: max relative error '
              f'{worst:.2e} over {len(errors)} outputs ({verdict}, tolerance '
              f'{args.tolerance:g})')
        if worst > args.tolerance:
            failed.append(f'{h}x{w}')

    left_out = not_exported(detector)
    if left_out:
        mmcv_ops = 'NMS, RoIAlign' if hasattr(detector, 'roi_head') else 'NMS'
        print(f'not exported: {", ".join(left_out)}, and the detector\'s '
              f'post-processing (anchors, box decoding, {mmcv_ops}: mmcv '
              f'ops). For the whole detector use MMDeploy '
              f'(github.com/open-mmlab/mmdeploy): it exports mmcv\'s ops as '
              f'its ONNX Runtime / TensorRT custom ops and builds these '
              f'backbones once custom_imports loads prm_det.')
    if failed:
        raise SystemExit(f'error: onnxruntime\'s outputs differ from '
                         f'PyTorch\'s at {", ".join(failed)} by more than '
                         f'{args.tolerance:g}')
    return result


if __name__ == '__main__':
    main()
