"""Test a detector and print its COCO box AP: mmdet's tools/test.py, with
prm_det registered.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out R.pkl]
        [--show] [--show-dir DIR] [--tta] [--metrics-out M.json]
        [--cfg-options k=v ...] [--launcher {none,pytorch,slurm,mpi}]

Evaluation is mmdet's CocoMetric (pycocotools). At the end the six box AP
numbers are printed as a table (in %, as in the paper's Table 4).
``--metrics-out`` also writes the metrics, as the evaluator returns them
(``coco/bbox_mAP``, ... in [0, 1]), to a JSON file for other programs
(tools/analysis_tools/compare_backbones.py); mmengine's own copy sits in a
folder named by the time under the work dir.

The checkpoint loads as data (tensors and the types mmengine's Runner
writes) unless ``--trust-checkpoint``; one whose weights do not fit the
config's model stops the test with a list of them unless
``--allow-key-mismatch``.
"""
import argparse
import json
import os
import os.path as osp
import sys
import warnings
from copy import deepcopy

# run from a checkout: its prm_det first (installed, the tools sit in
# prm_det/.mim/tools/ and import the installed package)
_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if osp.isdir(osp.join(_ROOT, 'prm_det')):
    sys.path.insert(0, _ROOT)

from mmengine import ConfigDict  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from mmengine.dist import is_main_process  # noqa: E402
from mmengine.model import BaseTTAModel, is_model_wrapper  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import prm_det  # noqa: E402,F401  (registers modules and wrappers)
from prm_det.engine import (  # noqa: E402
    TRUST_ENV, CheckpointMismatch, ChecksumMismatch, ConfigLoaderUnavailable,
    DatasetInvalid, DatasetNotFound, LauncherEnvironmentMissing,
    StoppedOnRank0, UnusableCheckpoint, UntrustedCheckpoint,
    check_checkpoint_fits, check_dataset_files, finish_distributed_if_ok,
    init_distributed, install_safe_loading, load_config, local_file_missing,
    on_rank_0, write_text_atomically)
from prm_det.evaluation import AP_KEYS, box_ap, format_ap_table  # noqa: E402,F401


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='MMDet test (and eval) a model')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file or URL')
    parser.add_argument(
        '--work-dir',
        help='the directory to save the file containing evaluation metrics')
    parser.add_argument(
        '--out', type=str,
        help='dump predictions to a pickle file for offline evaluation')
    parser.add_argument(
        '--show', action='store_true', help='show prediction results')
    parser.add_argument(
        '--show-dir',
        help='directory where painted images will be saved. '
        'If specified, it will be automatically saved '
        'to the work_dir/timestamp/show_dir')
    parser.add_argument(
        '--wait-time', type=float, default=2, help='the interval of show (s)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override some settings in the used config, the key-value pair '
        'in xxx=yyy format will be merged into config file. data_root=PATH '
        'moves every dataset and evaluator file to PATH.')
    parser.add_argument(
        '--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none', help='job launcher')
    parser.add_argument('--tta', action='store_true')
    parser.add_argument(
        '--metrics-out', metavar='FILE',
        help='write the evaluation metrics (e.g. coco/bbox_mAP, in [0, 1]) to '
        'this JSON file')
    parser.add_argument(
        '--trust-checkpoint', action='store_true',
        help='load the checkpoint with full pickle, which can run code: only '
        'for files you trust. Without it, it loads as tensors and the types '
        f'mmengine\'s Runner writes. Same as {TRUST_ENV}=1.')
    parser.add_argument(
        '--allow-key-mismatch', action='store_true',
        help='evaluate even when the checkpoint lacks weights of the model, '
        'has others, or has weights of other shapes')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    if args.trust_checkpoint:
        os.environ[TRUST_ENV] = '1'
    return args


def build_cfg(args):
    from mmdet.engine.hooks.utils import trigger_visualization_hook
    cfg = load_config(args.config, args.cfg_options, args.launcher)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    if local_file_missing(args.checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {args.checkpoint}')
    cfg.load_from = args.checkpoint
    if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        raise SystemExit(f'--out must be a .pkl file, got {args.out}')
    if args.show or args.show_dir:
        cfg = trigger_visualization_hook(cfg, args)
    if args.tta:
        if 'tta_model' not in cfg:
            warnings.warn('Cannot find ``tta_model`` in config, '
                          'we will set it as default.')
            cfg.tta_model = dict(
                type='DetTTAModel',
                tta_cfg=dict(
                    nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
        if 'tta_pipeline' not in cfg:
            test_data_cfg = cfg.test_dataloader.dataset
            while 'dataset' in test_data_cfg:
                test_data_cfg = test_data_cfg['dataset']
            cfg.tta_pipeline = deepcopy(test_data_cfg.pipeline)
            cfg.tta_pipeline[-1] = dict(
                type='TestTimeAug',
                transforms=[[
                    dict(type='RandomFlip', prob=1.),
                    dict(type='RandomFlip', prob=0.)
                ], [
                    dict(type='PackDetInputs',
                         meta_keys=('img_id', 'img_path', 'ori_shape',
                                    'img_shape', 'scale_factor', 'flip',
                                    'flip_direction'))
                ]])
        cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
        cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
    return cfg


def run(args):
    from mmdet.evaluation import DumpDetResults
    from mmdet.registry import RUNNERS
    cfg = build_cfg(args)
    init_distributed(cfg)
    # once for the job, before any rank builds a dataloader
    on_rank_0(lambda: check_dataset_files(cfg, ['test_dataloader']))
    runner = (Runner.from_cfg(cfg)
              if 'runner_type' not in cfg else RUNNERS.build(cfg))
    if args.out is not None:
        runner.test_evaluator.metrics.append(
            DumpDetResults(out_file_path=args.out))
    # loaded here, not inside runner.test(), to check it before evaluating
    checkpoint = runner.load_checkpoint(args.checkpoint)
    if not args.allow_key_mismatch:
        model = runner.model
        # the detector inside DDP or a TTA model, as mmengine loads it
        while is_model_wrapper(model) or isinstance(model, BaseTTAModel):
            model = model.module
        check_checkpoint_fits(model, checkpoint, args.checkpoint)
    metrics = runner.test()
    if args.metrics_out is not None and is_main_process():
        # whole or not at all: a program waiting for it reads no part
        write_text_atomically(args.metrics_out,
                              json.dumps(metrics, indent=2, default=float))
    if not is_main_process():  # every rank has the metrics: one table
        return metrics
    if any(k.endswith('bbox_mAP') for k in metrics):
        print('\nCOCO box AP (%):\n' + format_ap_table(metrics), flush=True)
    elif not metrics:
        print('\nNo AP: the model kept no detection on this split (all '
              'scores under model.test_cfg score_thr?)', flush=True)
    return metrics


def main(argv=None):
    install_safe_loading()  # checkpoints load as data
    args = parse_args(argv)
    with finish_distributed_if_ok():
        try:
            return run(args)
        except (DatasetNotFound, DatasetInvalid, FileNotFoundError,
                ConfigLoaderUnavailable, UntrustedCheckpoint,
                UnusableCheckpoint, ChecksumMismatch,
                CheckpointMismatch, LauncherEnvironmentMissing) as error:
            raise SystemExit(f'error: {error}')
        except StoppedOnRank0 as error:
            raise SystemExit(str(error))


if __name__ == '__main__':
    main()
