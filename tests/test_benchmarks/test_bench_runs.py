"""The benchmark scripts run and report every variant (no timing asserted:
speed is measured by hand with benchmarks/, never in tests)."""
import os
import os.path as osp
import platform
import subprocess
import sys

import pytest
from helpers import REPO

from prm_det.ops.backends import cpu as cpu_backend


@pytest.mark.slow  # a benchmark run as a subprocess
def test_benchmark_script_reports_all_variants_with_ratios(tmp_path):
    out = tmp_path / 'bench.md'
    proc = subprocess.run(
        [sys.executable, 'benchmarks/bench_backbones.py', '--reps', '1',
         '--inference-reps', '2', '--sizes', '1x64x64', '--no-detector',
         '--out', str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    for name in ('ResNet-50', 'SE-ResNet-50', 'GE-ResNet-50', 'GC-ResNet-50',
                 'SGE-ResNet-50', 'CBAM-ResNet-50', 'PRM-ResNet-50',
                 'SE-ResNet-50 (modules)', 'GC-ResNet-50 (modules)',
                 'CBAM-ResNet-50 (modules)', 'PRM-ResNet-50 (torch backend)',
                 'PRM-ResNet-50 (reference PRM)'):
        assert f'| {name} |' in table
    assert '| train step | 1x3x64x64 | fp32 | ResNet-50 | - |' in table
    # each PRM variant names the backend it ran on, as the op chose it
    default = 'cpu' if cpu_backend.available() else 'torch'
    for task in ('train step', 'inference'):
        row = f'| {task} | 1x3x64x64 | fp32 | PRM-ResNet-50'
        assert f'{row} | {default} (float32) |' in table
        assert f'{row} (torch backend) | torch (float32) |' in table
        assert f'{row} (reference PRM) | reference (float32) |' in table
        # the gate tails on the op's backend, or as modules
        gate = f'| {task} | 1x3x64x64 | fp32 | CBAM-ResNet-50'
        assert f'{gate} | {default} (float32) |' in table
        assert f'{gate} (modules) | reference (float32) |' in table
    assert '1.000x' in table and 'Machine:' in table
    assert 'medians of 1 interleaved runs, 2 for inference' in table
    if platform.libc_ver()[0] == 'glibc':  # re-ran itself with malloc tuned
        assert 'glibc malloc keeping freed memory' in table


@pytest.mark.slow  # a benchmark run as a subprocess
def test_block_tail_benchmark_reports_every_stage_and_task(tmp_path):
    out = tmp_path / 'tail.md'
    proc = subprocess.run(
        [sys.executable, 'benchmarks/bench_block_tail.py', '--reps', '1',
         '--size', '1x64x64', '--out', str(out), '--default-malloc'],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    for task in ('train step', 'train step, BN frozen', 'inference'):
        for where in ('1x256x16x16', '1x2048x2x2', 'whole backbone'):
            assert f'| {task} | {where} | fp32 |' in table, (task, where)
    backends = ['torch'] + (['cpu'] if cpu_backend.available() else [])
    for name in backends:
        assert f'| PRM, {name} | added |' in table
    for column in ('| copy | copy GB/s | PRM limit | passes |',
                   f'| PRM, {backends[-1]} / limit |'):
        assert column in table
    # passes the PRM kernels make: training 6 + 8, BN frozen 5 + 8,
    # inference 5
    for task, passes in (('train step', 14), ('train step, BN frozen', 13),
                         ('inference', 5)):
        row = next(line for line in table.splitlines()
                   if line.startswith(f'| {task} | whole backbone |'))
        assert row.split(' | ')[-2] == str(passes), row
    assert 'default malloc' in table


@pytest.mark.slow  # a benchmark run as a subprocess
def test_profile_times_the_tails_of_every_stage_inside_whole_passes():
    proc = subprocess.run(
        [sys.executable, 'benchmarks/profile_prm.py', '--tails', '--reps',
         '1', '--size', '1x64x64', '--task', 'inference',
         '--default-malloc'],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines()
            if line.startswith('| ') and line[2].isdigit() or
            line.startswith('| all 16 blocks')]
    assert [row.split(' | ')[0] for row in rows] == [
        '| 256', '| 512', '| 1024', '| 2048', '| all 16 blocks'], rows
    for row in rows:  # every stage's tails took time in both backbones
        plain, prm = (float(v) for v in row.split(' | ')[1:3])
        assert plain > 0 and prm > 0, row


def test_gpu_script_is_valid_bash():
    """benchmarks/gpu_run.sh runs on a lent GPU only; here, its syntax."""
    for script in ('benchmarks/gpu_run.sh', 'benchmarks/gpu_pack.sh'):
        proc = subprocess.run(['bash', '-n', script], cwd=REPO,
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0, (script, proc.stderr)
        assert os.access(osp.join(REPO, script), os.X_OK), script


@pytest.mark.slow  # a benchmark run as a subprocess
def test_image_check_benchmark_reports_its_rate(tmp_path):
    out = tmp_path / 'images.md'
    proc = subprocess.run(
        [sys.executable, 'benchmarks/bench_image_check.py', '--images', '20',
         '--out', str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = out.read_text()
    assert '20 JPEGs of 640x480' in table
    assert '| images | time (best of 2) | per image | COCO train 2017 ' \
        '(118,287 images) at that rate |' in table
    assert '| 20 | ' in table


@pytest.mark.slow
def test_demo_stability_sweeps_threads_and_backends_into_one_table(tmp_path):
    """benchmarks/demo_stability.py on a tiny set: one run per (threads,
    backend), 1-thread sweeps side by side, a row each and the spread."""
    from prm_det.datasets.synthetic_shapes import generate
    generate(str(tmp_path / 'data' / 'prm_demo'), num_train=4, num_val=2,
             image_size=96, max_objects=2, min_size=16, max_size=48, seed=1)
    proc = subprocess.run(
        [sys.executable, osp.join(REPO, 'benchmarks', 'demo_stability.py'),
         '--threads', '1', '--backends', 'cpu', 'torch', '--seeds', '1',
         '--jobs', '2', '--work-dir', 'sweep', '--cfg-options',
         'train_cfg.max_epochs=1', 'train_cfg.val_interval=1',
         'train_dataloader.batch_size=2', 'train_dataloader.num_workers=0',
         'train_dataloader.persistent_workers=False',
         'val_dataloader.num_workers=0',
         'val_dataloader.persistent_workers=False',
         'model.test_cfg.score_thr=0.0'],
        cwd=str(tmp_path), capture_output=True, text=True, timeout=900,
        env={k: v for k, v in os.environ.items() if k != 'PYTHONPATH'})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (tmp_path / 'sweep' / 'demo_stability.md').read_text()
    rows = [line for line in table.splitlines() if line.startswith('| 1 |')]
    assert [row.split(' | ')[1] for row in rows] == ['cpu', 'torch']
    for row in rows:
        ap = float(row.split(' | ')[3])
        assert 0 <= ap <= 100 and row.endswith('| 2 sweeps at once |')
    assert '2 runs: box AP mean' in table and 'spread' in table
    for backend in ('cpu', 'torch'):  # each sweep ran under its backend
        header = (tmp_path / 'sweep' / f'{backend}_1t' /
                  'compare_backbones.md').read_text()
        assert f'PRM_DET_BACKEND={backend}' in header
        assert 'with 1 threads' in header
