"""Train a detector: mmdet's tools/train.py, with prm_det registered.

    python tools/train.py configs/retinanet_prm_r50.py [--work-dir DIR]
        [--resume [CHECKPOINT]] [--amp] [--auto-scale-lr]
        [--cfg-options k=v ...] [--launcher {none,pytorch,slurm,mpi}]

Same flags and behaviour as MMDetection's, plus: a missing or unusable
dataset stops at once with the ways out; ``--cfg-options data_root=...``
moves the whole dataset; distributed runs without CUDA use gloo and a
CPU-capable DDP wrapper; ``--resume`` without a file takes the newest
complete checkpoint; checkpoints load as data unless ``--trust-checkpoint``.
Under torchrun, srun (``--launcher slurm``, tools/slurm_train.sh) and mpirun
alike, rank 0 alone holds the work_dir, removes partial checkpoints, picks
the one to resume and checks the dataset, while the others wait; a job
slurm requeues (preemption) resumes from the newest complete checkpoint.
"""
import argparse
import os
import os.path as osp
import sys

# run from a checkout: its prm_det first (installed, the tools sit in
# prm_det/.mim/tools/ and import the installed package)
_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if osp.isdir(osp.join(_ROOT, 'prm_det')):
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from mmengine.registry import RUNNERS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import prm_det  # noqa: E402,F401  (registers modules and wrappers)
from prm_det.engine import (  # noqa: E402
    TRUST_ENV, CheckpointDiskFull, ChecksumMismatch, ConfigLoaderUnavailable,
    DatasetInvalid, DatasetNotFound, LauncherEnvironmentMissing,
    PretrainedLoadIncomplete, PretrainedWeightsUnavailable, StoppedOnRank0,
    UnusableCheckpoint,
    UntrustedCheckpoint, WorkDirBusy, check_dataset_files, collective_timeout,
    finish_distributed_if_ok, init_distributed, install_safe_loading,
    latest_complete_checkpoint, load_config, local_file_missing,
    lock_work_dir, on_rank_0, remove_partials, work_dir_holder, world_size)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a detector')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--amp', action='store_true', default=False,
        help='enable automatic-mixed-precision training (needs CUDA)')
    parser.add_argument(
        '--auto-scale-lr', action='store_true',
        help='enable automatically scaling LR.')
    parser.add_argument(
        '--resume', nargs='?', type=str, const='auto',
        help='If specify checkpoint path, resume from it, while if not '
        'specify, try to auto resume from the latest checkpoint '
        'in the work directory that is complete.')
    parser.add_argument(
        '--trust-checkpoint', action='store_true',
        help='load checkpoints (--resume, load_from, init_cfg) with full '
        'pickle, which can run code: only for files you trust. Without it '
        'they load as tensors and the types mmengine\'s Runner writes. '
        f'Same as {TRUST_ENV}=1.')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override some settings in the used config, the key-value pair '
        'in xxx=yyy format will be merged into config file. data_root=PATH '
        'moves every dataset and evaluator file to PATH.')
    parser.add_argument(
        '--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none', help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    if args.trust_checkpoint:
        os.environ[TRUST_ENV] = '1'
    return args


def build_cfg(args):
    cfg = load_config(args.config, args.cfg_options, args.launcher)
    # work_dir: CLI > segment in file > config file name
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    if args.amp:
        if not torch.cuda.is_available():
            raise SystemExit('--amp needs a CUDA device (mmengine\'s '
                             'AmpOptimWrapper); drop --amp on CPU.')
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        if 'auto_scale_lr' in cfg and 'enable' in cfg.auto_scale_lr and \
                'base_batch_size' in cfg.auto_scale_lr:
            cfg.auto_scale_lr.enable = True
        else:
            raise SystemExit('--auto-scale-lr: the config has no '
                             'auto_scale_lr=dict(enable=..., '
                             'base_batch_size=...)')
    if args.resume is None and requeued_by_slurm(args.launcher):
        args.resume = 'auto'
    if args.resume not in (None, 'auto'):
        if local_file_missing(args.resume):
            raise SystemExit(f'--resume: checkpoint not found: {args.resume}')
        cfg.resume = True
        cfg.load_from = args.resume
    return cfg


def requeued_by_slurm(launcher):
    """Whether slurm started this job again (``--requeue``, preemption):
    it then resumes even without ``--resume``, as the first run would have
    gone on."""
    return launcher == 'slurm' and int(
        os.environ.get('SLURM_RESTART_COUNT') or 0) > 0


def prepare_work_dir(cfg, args):
    """What one process does for the whole job, before any training (rank
    0's, :func:`~prm_det.engine.distributed.on_rank_0`): hold the work_dir
    (one training per work_dir), remove the parts of checkpoints a killed
    training left (freeing their space), choose the checkpoint to resume
    and check the dataset. Returns the checkpoint ``--resume`` without a
    file resumes from (None: from the start, or not asked)."""
    lock_work_dir(cfg.work_dir)
    if cfg.launcher != 'none':
        print(f'[prm_det] rank 0 of {world_size()} holds the work_dir '
              f'{cfg.work_dir} for this {cfg.launcher} job: '
              f'{work_dir_holder(cfg.work_dir)}', flush=True)
    remove_partials(cfg.work_dir)
    resume_from = None
    if args.resume == 'auto':
        if requeued_by_slurm(args.launcher):
            print(f'slurm requeued this job (restart '
                  f'{os.environ["SLURM_RESTART_COUNT"]}): resuming from the '
                  f'newest complete checkpoint in {cfg.work_dir}', flush=True)
        # mmengine trusts `last_checkpoint`, which may name a file cut short
        # by a kill, or be empty; take the newest whole checkpoint instead
        resume_from = latest_complete_checkpoint(cfg.work_dir)
        if resume_from is None:
            print(f'--resume: no complete checkpoint in {cfg.work_dir}; '
                  f'training from the start', flush=True)
    loaders = ['train_dataloader']
    if cfg.get('val_cfg') is not None:
        loaders.append('val_dataloader')
    check_dataset_files(cfg, loaders)
    return resume_from


def train(cfg):
    runner = (Runner.from_cfg(cfg)
              if 'runner_type' not in cfg else RUNNERS.build(cfg))
    runner.train()
    # the runner (and its DDP wrapper) goes before the process group does


def main(argv=None):
    install_safe_loading()  # checkpoints load as data
    args = parse_args(argv)
    with finish_distributed_if_ok():
        try:
            cfg = build_cfg(args)
            init_distributed(cfg)
            resume_from = on_rank_0(lambda: prepare_work_dir(cfg, args))
        except (DatasetNotFound, DatasetInvalid, FileNotFoundError,
                ConfigLoaderUnavailable, WorkDirBusy,
                LauncherEnvironmentMissing) as error:
            raise SystemExit(f'error: {error}')
        except StoppedOnRank0 as error:
            raise SystemExit(str(error))
        if args.resume == 'auto':
            cfg.load_from = resume_from
            cfg.resume = resume_from is not None
        try:
            train(cfg)
        except (PretrainedWeightsUnavailable, PretrainedLoadIncomplete,
                UntrustedCheckpoint, UnusableCheckpoint, ChecksumMismatch,
                CheckpointDiskFull) as error:
            raise SystemExit(f'error: {error}')
        except RuntimeError as error:
            stalled = collective_timeout(error, cfg)
            if stalled is None:
                raise
            raise SystemExit(f'error: {stalled}') from error


if __name__ == '__main__':
    main()
