"""PRM's Triton kernels compiled for NVIDIA targets on this machine (Triton's
compiler and its bundled ptxas; no GPU): every launch a PRM-ResNet-50 block
tail makes at a detection batch spills nothing and keeps at least 8 warps
resident per SM.

The whole matrix (2x3x800x1216, 2x3x800x1344 and 32x3x224x224; fp32, bf16
and fp16; sm_80 and sm_90a) is ``benchmarks/kernel_report.py --check``'s
default run, its tables in ``benchmarks/results/kernel_report_*.md``; this
test compiles a representative part of it in a minute or two: both
targets, each in one dtype, at the detection size, every stage, kernel and
task (compiled kernels are cached in Triton's cache directory)."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
from helpers import REPO

KERNELS = {'channel_partial', 'fwd_sums', 'fwd_stats', 'fwd_out',
           'bwd_sums', 'bwd_out', 'bn_backward'}


@pytest.mark.slow
@pytest.mark.parametrize('target,dtype', [('sm_90a', 'fp32'),
                                          ('sm_80', 'bf16')])
def test_every_launch_at_a_detection_batch_spills_nothing_and_fills_sms(
        tmp_path, target, dtype):
    rows_file = tmp_path / 'rows.json'
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
    proc = subprocess.run(
        [sys.executable, osp.join(REPO, 'benchmarks', 'kernel_report.py'),
         '--sizes', '2x3x800x1216', '--dtypes', dtype, '--targets', target,
         '--check', '--json', str(rows_file), '--out',
         str(tmp_path / 'report.md')],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    rows = json.loads(rows_file.read_text())
    # every stage map, both tasks, every kernel the op launches
    assert {r['shape'] for r in rows} == {
        '2x256x200x304', '2x512x100x152', '2x1024x50x76', '2x2048x25x38'}
    assert {(r['task'], r['kernel']) for r in rows} == {
        ('train', k) for k in KERNELS} | {
        ('inference', k) for k in ('fwd_sums', 'fwd_stats', 'fwd_out')}
    for r in rows:
        assert r['spills'] == 0, r
        assert r['resident'] >= 8, r
        assert 0 < r['registers'] <= 255, r
    # a detection batch's 128 (sample, group) pairs are split over programs
    assert all(int(r['grid'].split('x')[1]) > 1 for r in rows
               if r['kernel'].startswith(('fwd', 'bwd')))
    table = (tmp_path / 'report.md').read_text()
    assert f'### 2x3x800x1216, {dtype}, {target}' in table
    assert '| training step (forward + backward) |' in table
