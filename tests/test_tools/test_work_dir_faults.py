"""Faults around a work_dir, for real (subprocesses): a disk that fills up
at a checkpoint, a kill between a checkpoint's rename and the update of
``last_checkpoint``, two trainings in one work_dir. The faults are put in
by a small wrapper that runs tools/train.py as ``python tools/train.py``
would, after patching the one call that fails."""
import os
import os.path as osp
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from mmdet.registry import MODELS
from tool_runs import (REPO, RETINA, checkpoint_meta, ok, parse_ap_table,
                       short_epochs, tiny_options, tool_env)

from prm_det.engine import load_config
from prm_det.engine.work_dir_lock import (WorkDirBusy, lock_work_dir,
                                          unlock_work_dir)

TRAIN = osp.join(REPO, 'tools', 'train.py')


def wrapper(tmp_path, patch):
    """A script that applies ``patch`` (code) and runs tools/train.py with
    its own arguments."""
    script = tmp_path / 'faulty_train.py'
    script.write_text(textwrap.dedent(patch) + textwrap.dedent(f'''
        import runpy
        import sys
        sys.argv = [{TRAIN!r}] + sys.argv[1:]
        runpy.run_path({TRAIN!r}, run_name='__main__')
    '''))
    return str(script)


def train(args, script=TRAIN, cwd=None, timeout=300):
    return subprocess.run([sys.executable, script, osp.join(REPO, RETINA)] +
                          args, cwd=cwd, env=tool_env(),
                          capture_output=True, text=True, timeout=timeout)


def files(work, suffix):
    return sorted(n for n in os.listdir(work) if n.endswith(suffix))


@pytest.mark.slow
def test_disk_full_at_a_checkpoint_then_resume(tiny_data, tmp_path):
    """ENOSPC while epoch_2's checkpoint is written (max_keep_ckpts=1): the
    error names the file and the room two checkpoints need, and removes the
    part written. Parts a kill left are removed when the next training
    starts, which resumes from epoch_1."""
    work = str(tmp_path / 'work')
    full = wrapper(tmp_path, '''
        import errno
        from mmengine.fileio.backends.local_backend import LocalBackend
        put = LocalBackend.put

        def put_on_a_full_disk(self, obj, filepath):
            if str(filepath).endswith('epoch_2.pth.partial'):
                with open(filepath, 'wb') as f:
                    f.write(obj[:len(obj) // 2])
                raise OSError(errno.ENOSPC, 'No space left on device')
            return put(self, obj, filepath)

        LocalBackend.put = put_on_a_full_disk
    ''')
    proc = train(['--work-dir', work] + short_epochs(tiny_data, epochs=3),
                 script=full, cwd=str(tmp_path))
    assert proc.returncode != 0
    err = proc.stderr
    assert 'Traceback' not in err, err[-3000:]
    assert (f'error: No space left on the device to write the checkpoint '
            f'{work}/epoch_2.pth.partial (') in err, err[-3000:]
    size_mb = osp.getsize(osp.join(work, 'epoch_1.pth')) / 2**20
    assert (f'the disk needs room for two checkpoints: about '
            f'{size_mb:.0f} MB each, so about {2 * size_mb:.0f} MB') in err
    assert files(work, '.partial') == []
    assert files(work, '.pth') == ['epoch_1.pth']

    # what a kill while writing leaves: parts of a checkpoint and a pointer
    with open(osp.join(work, 'epoch_1.pth'), 'rb') as f:
        head = f.read(1 << 16)
    with open(osp.join(work, 'epoch_2.pth.partial'), 'wb') as f:
        f.write(head)
    with open(osp.join(work, 'last_checkpoint.partial'), 'w') as f:
        f.write(work)
    out = ok(train(['--work-dir', work, '--resume'] +
                   short_epochs(tiny_data, epochs=2), cwd=str(tmp_path)))
    assert (f'removed 2 part(s) of files a killed or failed training was '
            f'writing: {work}/epoch_2.pth.partial, '
            f'{work}/last_checkpoint.partial') in out
    assert 'resumed epoch: 1, iter: 1' in out
    assert files(work, '.partial') == []
    assert files(work, '.pth') == ['epoch_2.pth']


@pytest.mark.slow
def test_kill_between_the_rename_and_last_checkpoint(tiny_data, tmp_path):
    """SIGKILL after epoch_2.pth is renamed into place, before
    last_checkpoint names it: --resume takes epoch_2 (whole and newer than
    the epoch_1 the pointer names) and deletes epoch_1, as the killed
    training would have (max_keep_ckpts=1)."""
    work = str(tmp_path / 'work')
    killed = wrapper(tmp_path, '''
        import os
        import signal
        import prm_det.engine.checkpoints.writing as hooks
        write = hooks.write_text_atomically

        def die_before_the_pointer(path, text):
            if text.endswith('epoch_2.pth'):
                os.kill(os.getpid(), signal.SIGKILL)
            write(path, text)

        hooks.write_text_atomically = die_before_the_pointer
    ''')
    proc = train(['--work-dir', work] + short_epochs(tiny_data, epochs=3),
                 script=killed, cwd=str(tmp_path))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert files(work, '.pth') == ['epoch_1.pth', 'epoch_2.pth']
    with open(osp.join(work, 'last_checkpoint')) as f:
        assert f.read() == osp.join(work, 'epoch_1.pth')

    out = ok(train(['--work-dir', work, '--resume'] +
                   short_epochs(tiny_data, epochs=3), cwd=str(tmp_path)))
    assert (f'--resume: {work}/epoch_2.pth is whole and newer than '
            f'{work}/epoch_1.pth') in out
    assert 'resumed epoch: 2, iter: 2' in out
    assert files(work, '.pth') == ['epoch_3.pth']
    assert checkpoint_meta(osp.join(work, 'epoch_3.pth'))['epoch'] == 3


@pytest.mark.slow
def test_a_second_training_in_the_same_work_dir_is_refused(tiny_data,
                                                           tmp_path):
    """The second stops at once, naming the first, and writes nothing there
    (no log folder); the first trains on. An evaluation (tools/test.py) in
    that work_dir is not a training: it runs."""
    work = str(tmp_path / 'work')
    log = tmp_path / 'first.log'
    with open(log, 'w') as out:
        first = subprocess.Popen(
            [sys.executable, TRAIN, osp.join(REPO, RETINA), '--work-dir',
             work] + short_epochs(tiny_data, epochs=200),
            cwd=str(tmp_path), env=tool_env(), stdout=out,
            stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while 'Epoch(train)' not in log.read_text():
            assert time.time() < deadline and first.poll() is None, \
                log.read_text()[-3000:]
            time.sleep(0.2)
        before = sorted(os.listdir(work))
        second = train(['--work-dir', work] + short_epochs(tiny_data, 1),
                       cwd=str(tmp_path))
        assert second.returncode != 0
        assert (f'error: The work_dir {work} is in use by another training: '
                f'process {first.pid} on ') in second.stderr, \
            second.stderr[-3000:]
        assert 'Traceback' not in second.stderr
        assert 'Epoch(train)' not in second.stdout
        assert sorted(n for n in os.listdir(work) if osp.isdir(
            osp.join(work, n))) == sorted(n for n in before if osp.isdir(
                osp.join(work, n)))
        assert first.poll() is None  # still training
        # evaluating in that work_dir meanwhile is fine
        weights = str(tmp_path / 'weights.pth')
        torch.save({'meta': {}, 'state_dict': MODELS.build(load_config(
            osp.join(REPO, RETINA)).model).state_dict()}, weights)
        evaluation = subprocess.run(
            [sys.executable, osp.join(REPO, 'tools', 'test.py'),
             osp.join(REPO, RETINA), weights, '--work-dir', work] +
            tiny_options(tiny_data), cwd=str(tmp_path), env=tool_env(),
            capture_output=True, text=True, timeout=300)
        assert len(parse_ap_table(ok(evaluation))) == 6
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()


def test_the_work_dir_lock_names_its_holder_and_dies_with_it(tmp_path):
    work = str(tmp_path / 'work')
    holder = subprocess.Popen(
        [sys.executable, '-c', textwrap.dedent(f'''
            import sys, time
            from prm_det.engine.work_dir_lock import lock_work_dir
            lock_work_dir({work!r})
            print('held', flush=True)
            time.sleep(120)
        ''')], env=tool_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == 'held\n'
        with pytest.raises(WorkDirBusy) as info:
            lock_work_dir(work)
        assert f'in use by another training: process {holder.pid} on ' in \
            str(info.value)
        assert 'another --work-dir' in str(info.value)
    finally:
        holder.kill()  # SIGKILL: nothing runs to release the lock
        holder.wait()
    assert lock_work_dir(work) is True
    assert lock_work_dir(work) is False  # held already, by this process
    unlock_work_dir(work)
