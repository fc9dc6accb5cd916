"""A slurm cluster on one host, for tests: ``srun`` and ``scontrol``
stand-ins written into a folder that goes first on the PATH.

The ``srun`` here does what slurm's does for a job step on the CPUs of this
host: it starts the command ``--ntasks`` times (else ``$SLURM_NTASKS``), each
task with slurm's variables (``SLURM_PROCID``, ``SLURM_NTASKS``,
``SLURM_LOCALID``, ``SLURM_NODELIST``, ``SLURM_JOB_ID``; never torch's
``RANK``), passes SIGTERM on to every task (what slurm does when it preempts
a job), and with ``--kill-on-bad-exit=1`` stops the others when one fails.
Its exit status is the first failure's (signal N: 128 + N), else 0. The
options it was given are appended, as JSON, to ``$STUB_SRUN_LOG``.
"""
import os
import os.path as osp
import stat

NODE_LIST = 'cpu-node[01-02]'

SRUN = r'''#!{python}
import json, os, signal, subprocess, sys, time
args = sys.argv[1:]
opts = {{}}
while args and args[0].startswith('-'):
    arg = args.pop(0)
    if '=' in arg:
        key, value = arg.split('=', 1)
    elif arg in ('-p', '-J', '-n', '-N', '-c'):
        key, value = arg, args.pop(0)
    else:
        key, value = arg, ''
    opts[key] = value
if os.environ.get('STUB_SRUN_LOG'):
    with open(os.environ['STUB_SRUN_LOG'], 'a') as log:
        log.write(json.dumps(opts) + '\n')
ntasks = int(opts.get('--ntasks', opts.get('-n',
                                           os.environ.get('SLURM_NTASKS', 1))))
per_node = int(opts.get('--ntasks-per-node', ntasks))
tasks = []
for task in range(ntasks):
    env = {{k: v for k, v in os.environ.items()
           if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR')}}
    env.update(SLURM_PROCID=str(task), SLURM_NTASKS=str(ntasks),
               SLURM_LOCALID=str(task % per_node),
               SLURM_NODELIST='{node_list}',
               SLURM_JOB_ID=os.environ.get('SLURM_JOB_ID', '4242'),
               SLURM_JOB_NAME=opts.get('--job-name', 'stub'))
    tasks.append(subprocess.Popen(args, env=env))


def forward(signum, frame):
    for proc in tasks:
        if proc.poll() is None:
            proc.send_signal(signum)


signal.signal(signal.SIGTERM, forward)
status = 0
while any(proc.poll() is None for proc in tasks):
    failed = [p.returncode for p in tasks if p.returncode not in (None, 0)]
    if failed and not status:
        status = failed[0]
        if opts.get('--kill-on-bad-exit') == '1':
            forward(signal.SIGTERM, None)
    time.sleep(0.05)
if not status:
    status = next((p.returncode for p in tasks if p.returncode), 0)
sys.exit(128 - status if status < 0 else status)
'''

SCONTROL = r'''#!/bin/sh
# scontrol show hostnames LIST: every host of the list is this one
[ "$1" = show ] && [ "$2" = hostnames ] && [ -n "$3" ] || exit 1
echo localhost
echo localhost
'''


def write_cluster_stubs(folder, python):
    """``srun`` and ``scontrol`` in ``folder`` (the first runs ``python``);
    returns ``folder``."""
    os.makedirs(folder, exist_ok=True)
    for name, text in (('srun', SRUN.format(python=python,
                                            node_list=NODE_LIST)),
                       ('scontrol', SCONTROL)):
        path = osp.join(folder, name)
        with open(path, 'w') as f:
            f.write(text)
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
    return str(folder)
