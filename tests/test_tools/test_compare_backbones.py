"""tools/analysis_tools/compare_backbones.py as a user runs it: a subprocess
started in a folder of the user's, configs named by path, no PYTHONPATH.

One sweep serves most tests: mmdet's ResNet, a config that does not build
and PRM, one seed, 2 epochs of 4 iterations on the tiny dataset. It is
killed (SIGKILL to its process group) once PRM's first checkpoint is
written, then run again with the same command."""
import json
import math
import os
import os.path as osp
import signal
import subprocess
import sys
import time
import types

import pytest
from mmdet.registry import MODELS
from tool_runs import REPO, RETINA, outside_env, tiny_options

from prm_det.engine import load_config

pytestmark = pytest.mark.slow

TOOL = osp.join(REPO, 'tools', 'analysis_tools', 'compare_backbones.py')
PLAIN = osp.join(REPO, 'configs', 'demo', 'retinanet_r18_shapes.py')
PRM = osp.join(REPO, RETINA)
# a config whose training fails at once: its backbone is not registered
BROKEN = f"""_base_ = '{PRM}'
model = dict(backbone=dict(type='NoSuchResNet'))
"""
ITERS_PER_EPOCH = 4  # tiny_data's 8 images in batches of 2


def sweep_options(data_root):
    """Two tiny epochs (a checkpoint each), no validation while training."""
    return tiny_options(data_root, epochs=2) + [
        'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None']


def run_dir(work, config, seed=0):
    return osp.join(work, osp.basename(config)[:-3], f'seed{seed}')


def read_json(path):
    with open(path) as f:
        return json.load(f)


def train_attempts(folder):
    return [a for a in read_json(osp.join(folder, 'attempts.json'))
            if a['phase'] == 'train']


@pytest.fixture(scope='module')
def sweep(tiny_data, tmp_path_factory):
    user = tmp_path_factory.mktemp('user')
    (user / 'broken_shapes.py').write_text(BROKEN)
    work = str(user / 'sweep')
    command = [sys.executable, TOOL, PLAIN, 'broken_shapes.py', PRM,
               '--seeds', '1', '--work-dir', 'sweep'] + sweep_options(
                   tiny_data)
    prm_checkpoint = osp.join(run_dir(work, PRM), 'epoch_1.pth')
    with open(user / 'first.out', 'w') as out:
        first = subprocess.Popen(command, cwd=str(user), env=outside_env(),
                                 stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        deadline = time.time() + 300
        while (not osp.exists(prm_checkpoint) and first.poll() is None
               and time.time() < deadline):
            time.sleep(0.01)
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)  # the harness and its runs
        first.wait()
    first_out = (user / 'first.out').read_text()
    assert osp.exists(prm_checkpoint), first_out[-3000:]
    assert first.returncode == -signal.SIGKILL, first_out[-3000:]
    plain_result = osp.join(run_dir(work, PLAIN), 'result.json')
    with open(plain_result, 'rb') as f:
        plain_before = (f.read(), os.stat(plain_result).st_mtime_ns)
    killed_at = sorted(n for n in os.listdir(run_dir(work, PRM))
                       if n.endswith('.pth'))

    second = subprocess.run(command, cwd=str(user), env=outside_env(),
                            capture_output=True, text=True, timeout=400)
    return types.SimpleNamespace(
        work=work, first_out=first_out, plain_before=plain_before,
        killed_at=killed_at, returncode=second.returncode,
        out=second.stdout + second.stderr,
        table=read_json(osp.join(work, 'compare_backbones.json')),
        markdown=open(osp.join(work, 'compare_backbones.md')).read())


def rows_by_name(sweep):
    return {row['name']: row for row in sweep.table['configs']}


def model_parameters(config):
    return sum(p.numel() for p in MODELS.build(
        load_config(config).model).parameters())


def test_the_table_has_a_row_per_config_with_ap_time_and_parameters(sweep):
    rows = rows_by_name(sweep)
    assert list(rows) == ['retinanet_r18_shapes', 'broken_shapes',
                          'retinanet_prm_r18_shapes']
    for name, config, backbone in (
            ('retinanet_r18_shapes', PLAIN, 'ResNet'),
            ('retinanet_prm_r18_shapes', PRM, 'PRMResNet')):
        row = rows[name]
        assert row['backbone'] == backbone
        assert row['ok'] == [0] and row['failed'] == []
        for key in ('ap_mean', 'ap50_mean', 'ap75_mean', 'aps_mean',
                    'apm_mean'):
            assert math.isfinite(row[key]) and 0 <= row[key] <= 100, row
        assert row['ap_std'] is None  # one seed: no spread
        assert row['train_minutes'] > 0
        assert row['params'] == model_parameters(config)
    assert rows['retinanet_r18_shapes']['params'] != \
        rows['retinanet_prm_r18_shapes']['params']

    # the markdown: the machine, the command, one row per config
    md = sweep.markdown
    assert 'PRM_DET_BACKEND=' in md and 'CPUs' in md and 'threads' in md
    assert 'compare_backbones.py' in md and '--seeds 1' in md
    def cells(line):
        return [c.strip() for c in line.strip('|').split('|')]

    header = cells(next(line for line in md.splitlines()
                        if line.startswith('| config |')))
    assert header[2:9] == ['box AP', 'AP50', 'AP75', 'APs', 'APm', 'APl',
                           'train (min)']
    table = [line for line in md.splitlines() if line.startswith('| `')]
    assert len(table) == 3
    prm = dict(zip(header, cells(next(line for line in table
                                      if 'retinanet_prm' in line))))
    assert prm['backbone'] == 'PRMResNet'
    assert float(prm['box AP']) == pytest.approx(
        rows['retinanet_prm_r18_shapes']['ap_mean'], abs=0.05)
    assert float(prm['params (M)']) == pytest.approx(
        model_parameters(PRM) / 1e6, abs=1e-4)
    assert md in sweep.out  # printed as well

    with open(osp.join(sweep.work, 'ap_per_seed.png'), 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_a_killed_sweep_goes_on_where_it_stopped(sweep):
    # the run that had finished is kept as it was, not trained again
    plain = run_dir(sweep.work, PLAIN)
    result = osp.join(plain, 'result.json')
    with open(result, 'rb') as f:
        assert (f.read(), os.stat(result).st_mtime_ns) == sweep.plain_before
    assert 'retinanet_r18_shapes seed 0: finished earlier' in sweep.out
    assert len(train_attempts(plain)) == 1

    # the killed one resumed from the newest checkpoint it had written
    assert 'epoch_1.pth' in sweep.killed_at
    epoch = max(int(n[len('epoch_'):-len('.pth')]) for n in sweep.killed_at
                if n.startswith('epoch_'))
    prm = run_dir(sweep.work, PRM)
    killed, resumed = train_attempts(prm)
    assert killed['returncode'] is None and resumed['returncode'] == 0
    with open(osp.join(prm, 'train.log')) as f:
        second_attempt = f.read().split('\n=== ')[2]
    assert (f'resumed epoch: {epoch}, iter: {epoch * ITERS_PER_EPOCH}'
            in second_attempt)
    result = read_json(osp.join(prm, 'result.json'))
    assert result['status'] == 'ok' and result['train_attempts'] == 2
    assert result['train_seconds'] == pytest.approx(
        killed['seconds'] + resumed['seconds'])
    assert result['checkpoint'].endswith('epoch_2.pth')


def test_a_failing_run_is_reported_and_the_sweep_goes_on(sweep):
    assert sweep.returncode == 1
    assert 'broken_shapes seed 0: FAILED' in sweep.first_out
    # the runs after it finished; it was retried on the second command
    broken = run_dir(sweep.work, 'broken_shapes.py')
    result = read_json(osp.join(broken, 'result.json'))
    assert result['status'] == 'failed' and result['phase'] == 'train'
    assert result['returncode'] not in (0, None)
    assert result['train_attempts'] == 2
    assert 'failed earlier' in sweep.out and 'retrying' in sweep.out
    with open(osp.join(broken, 'failed.log')) as f:
        assert 'NoSuchResNet' in f.read()
    row = rows_by_name(sweep)['broken_shapes']
    assert row['ok'] == [] and row['failed'] == [0]
    assert row['ap_mean'] is None and row['params'] is None
    (line, ) = [x for x in sweep.markdown.splitlines()
                if x.startswith('| `broken_shapes.py`')]
    assert '0 of 1 ok, failed: seed 0' in line
    assert '1 of 3 runs failed' in sweep.out


@pytest.mark.parametrize('args,message', [
    (['missing_shapes.py'], 'config file not found: missing_shapes.py'),
    (['--seeds', '0'], '--seeds must be 1 or more, got 0'),
    (['--cfg-options', 'randomness.seed=3'], 'the seed is set by --seeds'),
], ids=['missing-config', 'no-seeds', 'seed-option'])
def test_bad_input_stops_before_any_run(tmp_path, args, message):
    proc = subprocess.run(
        [sys.executable, TOOL, PLAIN] + args + ['--work-dir', 'sweep'],
        cwd=str(tmp_path), env=outside_env(), capture_output=True,
        text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / 'sweep').exists()
