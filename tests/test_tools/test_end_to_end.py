"""tools/train.py, tools/test.py and tools/dist_train.sh on a tiny generated
dataset, as a user runs them (subprocesses, the real configs)."""
import os
import os.path as osp
import re
import subprocess
import sys
import time

import pytest
import torch

from prm_det.datasets.synthetic_shapes import generate

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
RETINA = 'configs/demo/retinanet_prm_r18_shapes.py'
CASCADE = 'configs/demo/cascade_rcnn_prm_r18_shapes.py'

pytestmark = pytest.mark.slow


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


def run_tool(args, cwd=REPO, timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='2')
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('shapes'))
    generate(root, num_train=8, num_val=4, image_size=96, max_objects=3,
             min_size=16, max_size=48, seed=1)
    return root


def checkpoint_meta(path):
    return torch.load(path, map_location='cpu', weights_only=False)['meta']


def parse_ap_table(output):
    match = re.search(r'\| AP \| AP50 \| AP75 \| APs \| APm \| APl \|\n'
                      r'\|(?:---\|){6}\n\|((?: (?:[\d.]+|n/a) \|){6})', output)
    assert match, output[-2000:]
    return [float(v) if v.strip() != 'n/a' else None
            for v in match.group(1).split('|') if v.strip()]


@pytest.mark.parametrize('config', [RETINA, CASCADE])
def test_train_writes_checkpoint_and_test_reports_six_ap(config, tiny_data,
                                                          tmp_path):
    work = str(tmp_path / 'work')
    out = ok(run_tool([sys.executable, 'tools/train.py', config,
                       '--work-dir', work] +
                      tiny_options(tiny_data, config=config)))
    assert 'Epoch(train)' in out  # mmengine's progress log
    ckpt = osp.join(work, 'epoch_1.pth')
    assert osp.isfile(ckpt)
    assert checkpoint_meta(ckpt)['iter'] == 4
    results = str(tmp_path / 'results.pkl')
    out = ok(run_tool([sys.executable, 'tools/test.py', config, ckpt,
                       '--work-dir', work, '--out', results] +
                      tiny_options(tiny_data, config=config)))
    ap = parse_ap_table(out)
    assert len(ap) == 6 and ap[0] is not None
    assert all(v is None or 0 <= v <= 100 for v in ap)
    assert osp.getsize(results) > 0


def test_resume_continues_from_the_last_checkpoint(tiny_data, tmp_path):
    work = str(tmp_path / 'work')
    ok(run_tool([sys.executable, 'tools/train.py', RETINA, '--work-dir',
                 work] + tiny_options(tiny_data, epochs=1)))
    out = ok(run_tool([sys.executable, 'tools/train.py', RETINA, '--work-dir',
                       work, '--resume'] + tiny_options(tiny_data, epochs=2)))
    assert 'resumed epoch: 1, iter: 4' in out
    assert 'Epoch(train) [1]' not in out  # epoch 1 is not trained again
    meta = checkpoint_meta(osp.join(work, 'epoch_2.pth'))
    assert meta['epoch'] == 2 and meta['iter'] == 8


def test_two_process_cpu_training_with_dist_train_sh(tiny_data, tmp_path):
    work = str(tmp_path / 'work')
    env = dict(os.environ, PORT=str(29500 + os.getpid() % 1000),
               PYTHON=sys.executable, OMP_NUM_THREADS='1')
    proc = subprocess.run(
        ['bash', 'tools/dist_train.sh', RETINA, '2', '--work-dir', work] +
        tiny_options(tiny_data),
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    out = ok(proc)  # torchrun exits 0 only when both ranks finished
    assert "backend='gloo'" in out
    assert "type='DeviceAwareDDP'" in out
    # 8 images over 2 ranks in batches of 2: 2 iterations an epoch
    ckpt = osp.join(work, 'epoch_1.pth')
    assert checkpoint_meta(ckpt)['iter'] == 2
    proc = subprocess.run(
        ['bash', 'tools/dist_test.sh', RETINA, ckpt, '2', '--work-dir', work]
        + tiny_options(tiny_data),
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert len(parse_ap_table(ok(proc))) == 6


@pytest.mark.parametrize('tool', ['train', 'test'])
def test_missing_coco_stops_at_once_with_the_ways_out(tool, tmp_path):
    args = [sys.executable, osp.join(REPO, 'tools', f'{tool}.py'),
            osp.join(REPO, 'configs', 'retinanet_prm_r50.py')]
    if tool == 'test':
        ckpt = tmp_path / 'model.pth'
        torch.save({}, ckpt)
        args.append(str(ckpt))
    start = time.time()
    proc = run_tool(args, cwd=str(tmp_path))  # no data/coco/ here
    elapsed = time.time() - start
    assert proc.returncode != 0
    err = proc.stderr
    split = 'train2017' if tool == 'train' else 'val2017'
    assert f'data/coco/annotations/instances_{split}.json' in err
    assert '--cfg-options data_root=' in err and 'make demo' in err
    assert 'Traceback' not in err
    assert elapsed < 60
