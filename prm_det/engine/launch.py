"""What tools/train.py and tools/test.py do to a config before the Runner.

Kept out of the tools so that tests call the same code.
"""
import datetime
import gc
import os.path as osp
import re
from typing import Iterable, List, Optional

import torch
from mmengine.config import Config

_URI = re.compile(r'^[a-zA-Z][a-zA-Z0-9+.-]*://')  # s3://, http://, ...


class DatasetNotFound(FileNotFoundError):
    """A dataset file named by the config is not on disk."""


def relocate_data_root(cfg: Config, new_root: str) -> None:
    """Make ``--cfg-options data_root=...`` move the whole dataset.

    mmdet configs copy the top-level ``data_root`` into every dataset and
    evaluator when the file is parsed, so changing ``data_root`` afterwards
    changes nothing. Here every string that starts with the old root is
    rewritten to start with the new one.
    """
    old_root = cfg.get('data_root')
    if not new_root.endswith('/'):
        new_root += '/'

    def rewrite(node):
        if isinstance(node, dict):
            return type(node)({k: rewrite(v) for k, v in node.items()})
        if isinstance(node, (list, tuple)):
            return type(node)(rewrite(v) for v in node)
        if isinstance(node, str) and old_root and node.startswith(old_root):
            return new_root + node[len(old_root):]
        return node

    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader',
                'val_evaluator', 'test_evaluator'):
        if cfg.get(key) is not None:
            cfg[key] = rewrite(cfg[key])
    cfg.data_root = new_root


def _datasets(dataset_cfg) -> Iterable[dict]:
    """The leaf datasets of a dataset config (through wrappers)."""
    if dataset_cfg is None:
        return
    if 'datasets' in dataset_cfg:  # ConcatDataset
        for d in dataset_cfg['datasets']:
            yield from _datasets(d)
    elif 'dataset' in dataset_cfg:  # RepeatDataset, ClassBalancedDataset
        yield from _datasets(dataset_cfg['dataset'])
    else:
        yield dataset_cfg


def _local(path: Optional[str]) -> bool:
    return bool(path) and not _URI.match(path)


def missing_dataset_files(cfg: Config, loaders: Iterable[str]) -> List[str]:
    """Annotation files and image folders the given dataloaders need but are
    not on disk (remote paths are not checked)."""
    missing = []
    for loader in loaders:
        loader_cfg = cfg.get(loader)
        if not loader_cfg:
            continue
        for ds in _datasets(loader_cfg.get('dataset')):
            root = ds.get('data_root') or ''
            ann_file = ds.get('ann_file')
            if _local(ann_file):
                path = ann_file if osp.isabs(ann_file) else osp.join(
                    root, ann_file)
                if not osp.isfile(path):
                    missing.append(f'{path}  ({loader}.dataset.ann_file)')
            img_dir = (ds.get('data_prefix') or {}).get('img')
            if _local(img_dir) and _local(root or '.'):
                path = img_dir if osp.isabs(img_dir) else osp.join(
                    root, img_dir)
                if not osp.isdir(path):
                    missing.append(f'{path}  ({loader}.dataset.data_prefix)')
    return missing


def check_dataset_files(cfg: Config, loaders: Iterable[str]) -> None:
    """Raise :class:`DatasetNotFound` naming what is missing and the ways out,
    instead of a stack trace from inside a dataloader worker."""
    missing = missing_dataset_files(cfg, loaders)
    if not missing:
        return
    root = cfg.get('data_root', 'data/coco/')
    raise DatasetNotFound(
        'The dataset is not where the config says:\n  ' +
        '\n  '.join(missing) + '\n'
        'Ways out:\n'
        f'  * download COCO 2017 to {root} (annotations/, train2017/, '
        'val2017/ from cocodataset.org), or\n'
        '  * point at your copy: --cfg-options data_root=/path/to/coco/, or\n'
        '  * try the embedded demo on generated data: make demo')


def configure_launcher(cfg: Config, launcher: str) -> None:
    """Set the launcher and, for distributed runs without CUDA, make them
    work on CPU the mmengine way (configuration and a registered wrapper, no
    patching):

    * the gloo backend (``env_cfg.dist_cfg.backend``) instead of nccl;
    * ``model_wrapper_cfg=dict(type='DeviceAwareDDP')``, a DDP wrapper that
      drops the ``device_ids`` the Runner passes, which torch refuses for a
      CPU module;
    * with torchrun (``--launcher pytorch``) the process group is started
      here with gloo: mmengine 0.10.7's ``init_dist`` calls
      ``torch.cuda.set_device`` first, which a CPU build of torch lacks, and
      the Runner skips ``init_dist`` when a group already exists.
    """
    cfg.launcher = launcher
    if launcher == 'none' or torch.cuda.is_available():
        return
    env_cfg = cfg.setdefault('env_cfg', {})
    dist_cfg = env_cfg.setdefault('dist_cfg', {})
    if dist_cfg.get('backend', 'nccl') == 'nccl':
        dist_cfg['backend'] = 'gloo'
    if cfg.get('model_wrapper_cfg') is None:
        cfg.model_wrapper_cfg = dict(
            type='DeviceAwareDDP',
            find_unused_parameters=cfg.get('find_unused_parameters', False))
    if launcher == 'pytorch' and not torch.distributed.is_initialized():
        options = {k: v for k, v in dist_cfg.items()
                   if k not in ('backend', 'init_backend')}
        if 'timeout' in options:
            options['timeout'] = datetime.timedelta(
                seconds=options['timeout'])
        torch.distributed.init_process_group(backend=dist_cfg['backend'],
                                             **options)


def load_config(path: str, cfg_options: Optional[dict] = None,
                launcher: str = 'none') -> Config:
    """Config.fromfile + --cfg-options (with ``data_root`` moving the whole
    dataset) + the launcher settings."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'config file not found: {path}')
    cfg = Config.fromfile(path)
    cfg_options = dict(cfg_options or {})
    new_root = cfg_options.pop('data_root', None)
    if new_root is not None:
        relocate_data_root(cfg, new_root)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    configure_launcher(cfg, launcher)
    return cfg


def finish_distributed() -> None:
    """Tear the process group down before the interpreter exits, once every
    rank is done and the objects using it (the Runner, its DDP wrapper) are
    gone: a gloo group left to interpreter shutdown, or destroyed under a
    live DDP reducer, can abort the process ("terminate called without an
    active exception"), which torchrun reports as a failure."""
    if torch.distributed.is_available() and \
            torch.distributed.is_initialized():
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
