"""tools/train.py, tools/test.py and tools/dist_train.sh on a tiny generated
dataset, as a user runs them: subprocesses started in a folder of the user's
(not the repository), tools and configs named by path, no PYTHONPATH."""
import os
import os.path as osp
import subprocess
import sys
import time

import pytest
import torch
from tool_runs import (CASCADE, REPO, RETINA, checkpoint_meta, ok,
                       outside_env, parse_ap_table, run_tool, tiny_options)

pytestmark = pytest.mark.slow


def tool(name):
    return osp.join(REPO, 'tools', name)


def user_run(args, tmp_path, timeout=300):
    """``args`` run from the user's folder ``tmp_path``."""
    return run_tool(args, cwd=str(tmp_path), env=outside_env(),
                    timeout=timeout)


@pytest.mark.parametrize('config', [RETINA, CASCADE])
def test_train_writes_checkpoint_and_test_reports_six_ap(config, tiny_data,
                                                          tmp_path):
    work = str(tmp_path / 'work')
    out = ok(user_run([sys.executable, tool('train.py'),
                       osp.join(REPO, config), '--work-dir', work] +
                      tiny_options(tiny_data, config=config), tmp_path))
    assert 'Epoch(train)' in out  # mmengine's progress log
    ckpt = osp.join(work, 'epoch_1.pth')
    assert osp.isfile(ckpt)
    assert checkpoint_meta(ckpt)['iter'] == 4
    results = str(tmp_path / 'results.pkl')
    out = ok(user_run([sys.executable, tool('test.py'),
                       osp.join(REPO, config), ckpt, '--work-dir', work,
                       '--out', results] +
                      tiny_options(tiny_data, config=config), tmp_path))
    ap = parse_ap_table(out)
    assert len(ap) == 6 and ap[0] is not None
    assert all(v is None or 0 <= v <= 100 for v in ap)
    assert osp.getsize(results) > 0


def test_resume_continues_from_the_last_checkpoint(tiny_data, tmp_path):
    work = str(tmp_path / 'work')
    config = osp.join(REPO, RETINA)
    ok(user_run([sys.executable, tool('train.py'), config, '--work-dir',
                 work] + tiny_options(tiny_data, epochs=1), tmp_path))
    out = ok(user_run([sys.executable, tool('train.py'), config, '--work-dir',
                       work, '--resume'] + tiny_options(tiny_data, epochs=2),
                      tmp_path))
    assert 'resumed epoch: 1, iter: 4' in out
    assert 'Epoch(train) [1]' not in out  # epoch 1 is not trained again
    meta = checkpoint_meta(osp.join(work, 'epoch_2.pth'))
    assert meta['epoch'] == 2 and meta['iter'] == 8


def test_two_process_cpu_training_with_dist_train_sh(tiny_data, tmp_path):
    work = str(tmp_path / 'work')
    env = outside_env(PORT=str(29500 + os.getpid() % 1000),
                      PYTHON=sys.executable, OMP_NUM_THREADS='1')
    config = osp.join(REPO, RETINA)
    proc = subprocess.run(
        ['bash', tool('dist_train.sh'), config, '2', '--work-dir', work] +
        tiny_options(tiny_data),
        cwd=str(tmp_path), capture_output=True, text=True, timeout=600,
        env=env)
    out = ok(proc)  # torchrun exits 0 only when both ranks finished
    assert "backend='gloo'" in out
    assert "type='DeviceAwareDDP'" in out
    # 8 images over 2 ranks in batches of 2: 2 iterations an epoch
    ckpt = osp.join(work, 'epoch_1.pth')
    assert checkpoint_meta(ckpt)['iter'] == 2
    proc = subprocess.run(
        ['bash', tool('dist_test.sh'), config, ckpt, '2', '--work-dir', work]
        + tiny_options(tiny_data),
        cwd=str(tmp_path), capture_output=True, text=True, timeout=600,
        env=env)
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
    proc = user_run(args, tmp_path)  # no data/coco/ here
    elapsed = time.time() - start
    assert proc.returncode != 0
    err = proc.stderr
    split = 'train2017' if tool == 'train' else 'val2017'
    assert f'data/coco/annotations/instances_{split}.json' in err
    assert '--cfg-options data_root=' in err
    # the demo tool beside the one run (installed: prm_det/.mim/tools/, as
    # tests/test_packaging/test_installed_demo.py shows), not `make`, which
    # only a checkout has
    assert f'python {osp.join(REPO, "tools", "demo.py")}' in err
    assert 'make demo' not in err
    assert 'Traceback' not in err
    assert elapsed < 60


def test_missing_shapes_data_says_how_to_write_it(tmp_path):
    """The demo config's dataset is generated, not downloaded."""
    proc = user_run([sys.executable, tool('train.py'),
                     osp.join(REPO, RETINA)], tmp_path)
    assert proc.returncode != 0
    err = proc.stderr
    make_shapes = osp.join(REPO, 'tools', 'make_shapes.py')
    assert 'data/prm_demo/annotations/instances_train.json' in err
    assert f'python {make_shapes} --out data/prm_demo/' in err
    assert 'COCO' not in err and 'Traceback' not in err
