"""One job, whatever launched it: slurm (srun, sbatch, preemption and
requeue), mpirun and torchrun over two "nodes", each training and testing
the demo detector on CPU (gloo) with two ranks, run as a user runs them
(subprocesses from a folder outside the repository, no PYTHONPATH).

slurm is this host's: tests/test_tools/cluster_stubs.py's srun starts the
tasks with slurm's variables only, as srun does."""
import json
import os
import os.path as osp
import shutil
import signal
import subprocess
import sys
import time

import pytest
from cluster_stubs import write_cluster_stubs
from tool_runs import (REPO, RETINA, checkpoint_meta, free_port, ok,
                       outside_env, parse_ap_table, short_epochs,
                       tiny_options)

from prm_det.engine.work_dir_lock import LOCK_NAME

pytestmark = pytest.mark.slow

CONFIG = osp.join(REPO, RETINA)
REFUSAL = 'is in use by another training'


def tool(name):
    return osp.join(REPO, 'tools', name)


@pytest.fixture
def slurm_env(tmp_path):
    """A user's environment on a slurm login node of 2-task CPU jobs."""
    stubs = write_cluster_stubs(str(tmp_path / 'bin'), sys.executable)
    return outside_env(
        PATH=stubs + os.pathsep + os.environ['PATH'], PYTHON=sys.executable,
        GPUS='2', GPUS_PER_NODE='2', GRES='', CPUS_PER_TASK='1',
        OMP_NUM_THREADS='1', MASTER_PORT=str(free_port()),
        STUB_SRUN_LOG=str(tmp_path / 'srun.log'))


def run(args, tmp_path, env, timeout=600):
    return subprocess.run([str(a) for a in args], cwd=str(tmp_path),
                          env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_slurm_train_and_test_two_ranks_one_work_dir(tiny_data, tmp_path,
                                                     slurm_env):
    work = str(tmp_path / 'work')
    out = ok(run(['bash', tool('slurm_train.sh'), 'cpu', 'prm', CONFIG,
                  work] + tiny_options(tiny_data), tmp_path, slurm_env))
    # srun got mmdet's interface: 2 tasks, 2 per node, 1 core each
    opts = json.loads(open(slurm_env['STUB_SRUN_LOG']).readline())
    assert opts['--partition'] == 'cpu' and opts['--job-name'] == 'prm'
    assert (opts['--ntasks'], opts['--ntasks-per-node'],
            opts['--cpus-per-task']) == ('2', '2', '1')
    assert opts['--kill-on-bad-exit'] == '1' and '--gres' not in opts
    assert "Distributed launcher: slurm" in out and "backend='gloo'" in out
    # one lock, taken once, by rank 0; one preflight
    assert out.count('[prm_det] rank 0 of 2 holds the work_dir') == 1, out
    assert REFUSAL not in out
    # 8 images over 2 ranks in batches of 2: 2 iterations an epoch
    ckpt = osp.join(work, 'epoch_1.pth')
    assert checkpoint_meta(ckpt)['iter'] == 2
    out = ok(run(['bash', tool('slurm_test.sh'), 'cpu', 'prm-test', CONFIG,
                  ckpt, '--work-dir', work] + tiny_options(tiny_data),
                 tmp_path, slurm_env))
    assert len(parse_ap_table(out)) == 6
    assert out.count('COCO box AP') == 1  # printed by rank 0 alone


def wait_for(predicate, proc, deadline, what):
    while not predicate():
        assert proc.poll() is None, f'ended before {what}: ' + \
            proc.stdout.read()[-3000:]
        assert time.time() < deadline, f'no {what} in time'
        time.sleep(0.2)


def test_slurm_second_job_refused_once_preempted_job_resumes_on_requeue(
        tiny_data, tmp_path, slurm_env):
    """A second job on a running job's work_dir is refused once, naming the
    holder; slurm then preempts the first (SIGTERM to every task) and
    requeues it through the sbatch script: it resumes from the newest
    complete checkpoint."""
    work = str(tmp_path / 'work')
    args = short_epochs(tiny_data, epochs=60)
    first = subprocess.Popen(
        ['bash', tool('slurm_train.sh'), 'cpu', 'first', CONFIG, work] + args,
        cwd=str(tmp_path), env=slurm_env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        lock = osp.join(work, LOCK_NAME)
        deadline = time.time() + 300
        wait_for(lambda: osp.isfile(osp.join(work, 'epoch_2.pth')), first,
                 deadline, 'epoch_2.pth')
        holder = open(lock).read().strip()
        assert holder.startswith('process ') and 'tools/train.py' in holder

        second = run(['bash', tool('slurm_train.sh'), 'cpu', 'second',
                      CONFIG, work] + args,
                     tmp_path, dict(slurm_env, MASTER_PORT=str(free_port())),
                     timeout=300)
        out = second.stdout + second.stderr
        assert second.returncode != 0
        assert out.count(REFUSAL) == 1, out[-3000:]
        assert holder in out  # names the first job's rank 0
        assert 'rank 1: stopped, rank 0 ended the job' in out
        assert first.poll() is None  # the first job trains on

        first.send_signal(signal.SIGTERM)  # preemption: srun passes it on
        assert first.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        first.kill()
        first.wait()
    done = sorted(int(n[len('epoch_'):-len('.pth')]) for n in os.listdir(work)
                  if n.startswith('epoch_') and n.endswith('.pth'))
    newest = done[-1]
    assert newest >= 2

    # the requeued batch job: same script, SLURM_RESTART_COUNT=1
    requeued = dict(slurm_env, SLURM_RESTART_COUNT='1', SLURM_NTASKS='2',
                    SLURM_SUBMIT_DIR=REPO, SLURM_JOB_ID='4243',
                    MASTER_PORT=str(free_port()))
    out = ok(run(['bash', tool('slurm_train.sbatch'), CONFIG, work] +
                 short_epochs(tiny_data, epochs=newest + 1), tmp_path,
                 requeued))
    assert 'start 1:' in out  # the script's own line
    assert 'slurm requeued this job (restart 1)' in out
    assert f'resumed epoch: {newest}' in out
    assert checkpoint_meta(osp.join(work, f'epoch_{newest + 1}.pth'))[
        'epoch'] == newest + 1


def test_a_process_not_started_by_its_launcher_says_how_to_start_it(
        tmp_path):
    env = outside_env()
    for name in ('SLURM_PROCID', 'OMPI_COMM_WORLD_RANK', 'PMI_RANK'):
        env.pop(name, None)
    proc = run([sys.executable, tool('train.py'), CONFIG, '--launcher',
                'slurm'], tmp_path, env, timeout=300)
    assert proc.returncode != 0
    assert 'SLURM_PROCID' in proc.stderr and 'srun' in proc.stderr
    assert 'Traceback' not in proc.stderr


@pytest.mark.skipif(shutil.which('mpirun') is None,
                    reason='no mpirun (Debian: apt-get install openmpi-bin; '
                    '.ci/run installs it)')
def test_mpirun_two_ranks_train_and_test(tiny_data, tmp_path):
    work = str(tmp_path / 'work')
    env = outside_env(OMP_NUM_THREADS='1', MASTER_PORT=str(free_port()))
    mpirun = ['mpirun', '-np', '2', '--oversubscribe', '--bind-to', 'none']
    if os.geteuid() == 0:
        mpirun.append('--allow-run-as-root')
    out = ok(run(mpirun + [sys.executable, tool('train.py'), CONFIG,
                           '--launcher', 'mpi', '--work-dir', work] +
                 tiny_options(tiny_data), tmp_path, env))
    assert "Distributed launcher: mpi" in out
    assert out.count('[prm_det] rank 0 of 2 holds the work_dir') == 1, out
    ckpt = osp.join(work, 'epoch_1.pth')
    assert checkpoint_meta(ckpt)['iter'] == 2
    out = ok(run(mpirun + [sys.executable, tool('test.py'), CONFIG, ckpt,
                           '--launcher', 'mpi', '--work-dir', work] +
                 tiny_options(tiny_data), tmp_path, env))
    assert len(parse_ap_table(out)) == 6


def test_torchrun_two_nodes_on_localhost_with_syncbn(tiny_data, tmp_path):
    """dist_train.sh as each of two nodes runs it (NNODES=2, NODE_RANK),
    one process each, with a SyncBN backbone: on CPU it trains with plain
    BatchNorm, saying so once."""
    work = str(tmp_path / 'work')
    port = str(free_port())
    nodes = []
    for node in (0, 1):
        env = outside_env(NNODES='2', NODE_RANK=str(node), PORT=port,
                          PYTHON=sys.executable, OMP_NUM_THREADS='1')
        nodes.append(subprocess.Popen(
            ['bash', tool('dist_train.sh'), CONFIG, '1', '--work-dir', work]
            + tiny_options(tiny_data) + [
                'model.backbone.norm_cfg.type=SyncBN',
                'model.backbone.norm_eval=False'],
            cwd=str(tmp_path), env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [proc.communicate(timeout=600)[0] for proc in nodes]
    for proc, out in zip(nodes, outs):
        assert proc.returncode == 0, out[-3000:]
    out = ''.join(outs)
    assert out.count('[prm_det] rank 0 of 2 holds the work_dir') == 1
    assert out.count('SyncBN needs CUDA: on this CPU run its') == 1
    assert checkpoint_meta(osp.join(work, 'epoch_1.pth'))['iter'] == 2
