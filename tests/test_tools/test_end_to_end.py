"""tools/train.py, tools/test.py and tools/dist_train.sh on a tiny generated
dataset, as a user runs them (subprocesses, the real configs)."""
import os
import os.path as osp
import subprocess
import sys
import time

import pytest
import torch
from tool_runs import (CASCADE, REPO, RETINA, checkpoint_meta, ok,
                       parse_ap_table, run_tool, tiny_options)

pytestmark = pytest.mark.slow


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
