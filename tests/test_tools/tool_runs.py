"""Running tools/ as a user does, on a tiny generated dataset: shared by the
end-to-end tests of tests/test_tools/."""
import os
import re
import subprocess

import torch
from helpers import REPO, tool_module  # noqa: F401 (the tests import them here)

RETINA = 'configs/demo/retinanet_prm_r18_shapes.py'
CASCADE = 'configs/demo/two_stage/cascade_rcnn_prm_r18_shapes.py'


def tiny_options(data_root, epochs=1, config=RETINA):
    """8 train images in batches of 2: 4 iterations an epoch. A detector
    trained 4 iterations scores every box low: keep all of them so that
    CocoMetric has detections to score."""
    score = ('model.test_cfg.score_thr=0.0' if config == RETINA else
             'model.test_cfg.rcnn.score_thr=0.0')
    return [
        '--cfg-options', score, f'data_root={data_root}',
        f'train_cfg.max_epochs={epochs}', f'train_cfg.val_interval={epochs}',
        'train_dataloader.batch_size=2', 'train_dataloader.num_workers=0',
        'train_dataloader.persistent_workers=False',
        'val_dataloader.num_workers=0',
        'val_dataloader.persistent_workers=False',
        'test_dataloader.num_workers=0',
        'test_dataloader.persistent_workers=False',
        'default_hooks.logger.interval=1',
    ]


def tool_env(**extra):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='2')
    env.update(extra)
    return env


def outside_env(**extra):
    """A user's environment: no PYTHONPATH (the tools put their checkout's
    prm_det first themselves)."""
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env['OMP_NUM_THREADS'] = '2'
    env.update(extra)
    return env


def run_tool(args, cwd=REPO, timeout=300, env=None):
    return subprocess.run(args, cwd=cwd, env=env or tool_env(),
                          capture_output=True, text=True, timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def checkpoint_meta(path):
    return torch.load(path, map_location='cpu', weights_only=False)['meta']


def parse_ap_table(output):
    match = re.search(r'\| AP \| AP50 \| AP75 \| APs \| APm \| APl \|\n'
                      r'\|(?:---\|){6}\n\|((?: (?:[\d.]+|n/a) \|){6})', output)
    assert match, output[-2000:]
    return [float(v) if v.strip() != 'n/a' else None
            for v in match.group(1).split('|') if v.strip()]
