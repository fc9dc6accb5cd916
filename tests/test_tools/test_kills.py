"""A kill at the wrong moment loses nothing, a stalled rank does not stall
the job: trainings killed and stopped for real (subprocesses)."""
import os
import os.path as osp
import signal
import subprocess
import sys
import time

import pytest
from tool_runs import (REPO, RETINA, checkpoint_meta, free_port, ok,
                       short_epochs, tool_env)

pytestmark = pytest.mark.slow


def freeze_while_writing(proc, work, deadline):
    """Stop ``proc`` (SIGSTOP) at a moment when a checkpoint after the first
    is being written (its ``.partial`` file exists); returns that file's
    name, or None if the training ended first."""
    while proc.poll() is None and time.time() < deadline:
        names = os.listdir(work) if osp.isdir(work) else []
        partial = [n for n in names if n.endswith('.pth.partial')
                   and n != 'epoch_1.pth.partial']
        if partial:
            proc.send_signal(signal.SIGSTOP)
            if osp.exists(osp.join(work, partial[0])):
                return partial[0]
            proc.send_signal(signal.SIGCONT)  # renamed before the stop
        time.sleep(0.001)
    return None


def test_kill_9_while_a_checkpoint_is_written_then_resume(tiny_data,
                                                          tmp_path):
    work = str(tmp_path / 'work')
    proc = subprocess.Popen(
        [sys.executable, 'tools/train.py', RETINA, '--work-dir', work] +
        short_epochs(tiny_data, epochs=8),
        cwd=REPO, env=tool_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    caught = freeze_while_writing(proc, work, time.time() + 240)
    proc.kill()  # SIGKILL, which a stopped process takes too
    _, err = proc.communicate()
    assert caught, 'no checkpoint write was caught: ' + err[-2000:]

    # the kill came in the middle of writing epoch_k: epoch_{k-1} is whole
    # and still there, and last_checkpoint names it
    k = int(caught[len('epoch_'):-len('.pth.partial')])
    previous = osp.join(work, f'epoch_{k - 1}.pth')
    assert sorted(n for n in os.listdir(work) if n.endswith('.pth')) == [
        f'epoch_{k - 1}.pth']
    with open(osp.join(work, 'last_checkpoint')) as f:
        assert f.read() == previous
    assert checkpoint_meta(previous)['epoch'] == k - 1

    # what mmengine's own hook leaves behind: a truncated newest checkpoint
    # under its real name and an empty last_checkpoint
    with open(previous, 'rb') as f:
        head = f.read(os.path.getsize(previous) // 6)
    with open(osp.join(work, f'epoch_{k}.pth'), 'wb') as f:
        f.write(head)
    open(osp.join(work, 'last_checkpoint'), 'w').close()

    out = ok(subprocess.run(
        [sys.executable, 'tools/train.py', RETINA, '--work-dir', work,
         '--resume'] + short_epochs(tiny_data, epochs=k),
        cwd=REPO, env=tool_env(), capture_output=True, text=True,
        timeout=300))
    assert 'last_checkpoint is empty' in out
    assert f'skipped {osp.join(work, f"epoch_{k}.pth")}: incomplete' in out
    assert f'resumed epoch: {k - 1}, iter: {k - 1}' in out
    assert checkpoint_meta(osp.join(work, f'epoch_{k}.pth'))['epoch'] == k
    assert not [n for n in os.listdir(work) if n.endswith('.partial')]


def test_a_stalled_rank_fails_the_job_after_the_collective_timeout(
        tiny_data, tmp_path):
    """Two ranks as torchrun starts them; rank 1 is stopped (SIGSTOP) in
    the middle of training: rank 0 fails after env_cfg.dist_cfg.timeout,
    saying why, instead of waiting 30 minutes."""
    timeout = 15
    work, port = str(tmp_path / 'work'), str(free_port())
    logs = [str(tmp_path / f'rank{rank}.log') for rank in (0, 1)]
    ranks = []
    for rank in (0, 1):
        env = tool_env(MASTER_ADDR='127.0.0.1', MASTER_PORT=port,
                       WORLD_SIZE='2', RANK=str(rank), LOCAL_RANK=str(rank),
                       OMP_NUM_THREADS='1')
        with open(logs[rank], 'w') as log:
            ranks.append(subprocess.Popen(
                [sys.executable, 'tools/train.py', RETINA, '--launcher',
                 'pytorch', '--work-dir', work] +
                short_epochs(tiny_data, epochs=100) +
                [f'env_cfg.dist_cfg.timeout={timeout}'],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        deadline = time.time() + 180
        while 'Epoch(train)' not in open(logs[0]).read():
            assert time.time() < deadline and ranks[0].poll() is None, \
                open(logs[0]).read()[-3000:]
            time.sleep(0.2)
        ranks[1].send_signal(signal.SIGSTOP)
        stopped = time.time()
        returncode = ranks[0].wait(timeout=timeout + 60)
        waited = time.time() - stopped
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait()
    log = open(logs[0]).read()
    assert returncode != 0
    assert waited < timeout + 20, waited
    assert f'no answer from another rank within {timeout} s' in log, \
        log[-3000:]
