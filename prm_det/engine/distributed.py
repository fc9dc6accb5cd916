"""Starting, using and ending a distributed job, whatever launched it.

torchrun, srun (slurm) and mpirun each describe a process's place in the
job with their own environment variables: torchrun sets torch's (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) before the
script starts, srun and mpirun do not (``SLURM_PROCID``,
``OMPI_COMM_WORLD_RANK``, ...). :func:`init_distributed` reads the
launcher's variables into torch's, as mmengine's ``init_dist`` does, and
starts the process group before the tools do anything rank-dependent, so
that every launcher gives the same job:

* :func:`on_rank_0` runs what one process must do for the whole job (take
  the work_dir lock, remove partial checkpoints, choose the checkpoint to
  resume, check the dataset) on rank 0 while the others wait, and hands its
  result, or its failure, to every rank;
* without CUDA (gloo, :class:`~prm_det.engine.wrappers.DeviceAwareDDP`) the
  process group is started here for every launcher: mmengine 0.10.7's
  ``init_dist`` calls ``torch.cuda.set_device``, which a CPU build of torch
  lacks. With CUDA mmengine's ``init_dist`` starts it, from torch's
  variables. The Runner skips ``init_dist`` when a group exists.
"""
import contextlib
import datetime
import gc
import os
import re
import shutil
import subprocess
from typing import Callable, Dict, Iterator, Mapping, Optional, TypeVar

import torch
from mmengine.config import Config

T = TypeVar('T')

DEFAULT_PORT = 29500  # torch's and mmengine's
# how long the other ranks wait for rank 0's work in on_rank_0 (the dataset
# check reads every image header of COCO train: longer than a collective)
RANK_0_WORK_TIMEOUT_S = 3600

LAUNCHER_HOW = {
    'pytorch': 'start it with torchrun (tools/dist_train.sh, '
               'tools/dist_test.sh)',
    'slurm': 'start it with srun (tools/slurm_train.sh, '
             'tools/slurm_test.sh), or use --launcher pytorch with torchrun',
    'mpi': 'start it with mpirun (OpenMPI or MPICH), or use --launcher '
           'pytorch with torchrun',
}


class LauncherEnvironmentMissing(RuntimeError):
    """``--launcher X`` in a process that X did not start."""


class StoppedOnRank0(RuntimeError):
    """Rank 0 failed the work :func:`on_rank_0` gave it."""


def _first(environ: Mapping[str, str], *names: str) -> Optional[str]:
    return next((environ[n] for n in names if environ.get(n)), None)


def _slurm_master(node_list: str) -> str:
    """The first host of a slurm node list (``node[1-4]``), as mmengine
    finds it: ``scontrol show hostnames``."""
    if shutil.which('scontrol') is None:
        raise LauncherEnvironmentMissing(
            '--launcher slurm: scontrol is not on the PATH, so the first '
            f'host of SLURM_NODELIST={node_list} (rank 0\'s, the master '
            'address) cannot be read. Run inside a slurm job, or set '
            'MASTER_ADDR to rank 0\'s host.')
    out = subprocess.run(['scontrol', 'show', 'hostnames', node_list],
                         capture_output=True, text=True)
    hosts = out.stdout.split()
    if out.returncode != 0 or not hosts:
        raise LauncherEnvironmentMissing(
            f'--launcher slurm: `scontrol show hostnames {node_list}` '
            f'failed ({(out.stderr or out.stdout).strip() or "no output"}); '
            'set MASTER_ADDR to rank 0\'s host.')
    return hosts[0]


def launcher_environment(launcher: str, environ: Mapping[str, str],
                         port: Optional[int] = None) -> Dict[str, str]:
    """torch's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``) for a process that ``launcher``
    started, from the launcher's own; ``MASTER_*`` already set are kept.

    slurm: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``, the master
    is the first host of ``SLURM_NODELIST``. MPI: OpenMPI's
    ``OMPI_COMM_WORLD_*`` or MPICH's ``PMI_RANK``/``PMI_SIZE``/
    ``MPI_LOCALRANKID``; the master is ``MASTER_ADDR``, or this host when
    every rank runs on it. The port: ``port`` (``env_cfg.dist_cfg.port``,
    as mmengine's), else ``MASTER_PORT``, else 29500.

    Raises:
        LauncherEnvironmentMissing: the launcher's variables are not set
            (the script was not started by it), naming what is missing.
    """
    if launcher == 'pytorch':
        names = {'RANK': ('RANK',), 'WORLD_SIZE': ('WORLD_SIZE',),
                 'LOCAL_RANK': ('LOCAL_RANK',)}
    elif launcher == 'slurm':
        names = {'RANK': ('SLURM_PROCID',), 'WORLD_SIZE': ('SLURM_NTASKS',),
                 'LOCAL_RANK': ('SLURM_LOCALID',),
                 'SLURM_NODELIST': ('SLURM_NODELIST', 'SLURM_JOB_NODELIST')}
    elif launcher == 'mpi':
        names = {'RANK': ('OMPI_COMM_WORLD_RANK', 'PMI_RANK'),
                 'WORLD_SIZE': ('OMPI_COMM_WORLD_SIZE', 'PMI_SIZE'),
                 'LOCAL_RANK': ('OMPI_COMM_WORLD_LOCAL_RANK',
                                'MPI_LOCALRANKID')}
    else:
        raise ValueError(f'unknown launcher {launcher!r}')
    values = {key: _first(environ, *options) for key, options in
              names.items()}
    missing = [' or '.join(names[k]) for k, v in values.items() if v is None]
    if missing:
        raise LauncherEnvironmentMissing(
            f'--launcher {launcher}: this process was not started by that '
            f'launcher ({", ".join(missing)} not set); '
            f'{LAUNCHER_HOW[launcher]}. One process alone: --launcher none.')
    env = {k: values[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
    master = environ.get('MASTER_ADDR')
    if master is None and launcher == 'slurm':
        master = _slurm_master(values['SLURM_NODELIST'])
    if master is None and launcher == 'mpi':
        local_size = _first(environ, 'OMPI_COMM_WORLD_LOCAL_SIZE',
                            'MPI_LOCALNRANKS')
        if local_size != values['WORLD_SIZE']:
            raise LauncherEnvironmentMissing(
                '--launcher mpi over several hosts: set MASTER_ADDR (and '
                'MASTER_PORT) to rank 0\'s host for every rank, e.g. '
                '`mpirun -x MASTER_ADDR=HOST -x MASTER_PORT=29500 ...`')
        master = '127.0.0.1'  # every rank is on this host
    if master is None:
        raise LauncherEnvironmentMissing(
            f'--launcher {launcher}: MASTER_ADDR is not set; '
            f'{LAUNCHER_HOW[launcher]}.')
    env['MASTER_ADDR'] = master
    env['MASTER_PORT'] = str(port if port is not None else
                             environ.get('MASTER_PORT', DEFAULT_PORT))
    return env


def configure_launcher(cfg: Config, launcher: str) -> None:
    """Set the launcher and, for distributed runs without CUDA, the
    settings that make them work on CPU the mmengine way (configuration and
    a registered wrapper, no patching): the gloo backend
    (``env_cfg.dist_cfg.backend``) instead of nccl, and
    ``model_wrapper_cfg=dict(type='DeviceAwareDDP')``, a DDP wrapper that
    drops the ``device_ids`` the Runner passes (torch refuses them for a CPU
    module) and makes SyncBN plain BatchNorm (torch's needs CUDA)."""
    cfg.launcher = launcher
    if launcher == 'none' or torch.cuda.is_available():
        return
    env_cfg = cfg.setdefault('env_cfg', {})
    dist_cfg = env_cfg.setdefault('dist_cfg', {})
    if dist_cfg.get('backend', 'nccl') == 'nccl':
        dist_cfg['backend'] = 'gloo'
    if cfg.get('model_wrapper_cfg') is None:
        cfg.model_wrapper_cfg = dict(
            type='DeviceAwareDDP',
            find_unused_parameters=cfg.get('find_unused_parameters', False))


def _timeout(seconds) -> Optional[datetime.timedelta]:
    return None if seconds is None else datetime.timedelta(seconds=seconds)


def init_distributed(cfg: Config) -> None:
    """Start the process group of ``cfg.launcher`` (nothing for 'none', or
    when one exists), with ``env_cfg.dist_cfg``'s backend and timeout.

    Raises:
        LauncherEnvironmentMissing: see :func:`launcher_environment`.
    """
    launcher = cfg.get('launcher', 'none')
    if launcher == 'none' or torch.distributed.is_initialized():
        return
    dist_cfg = dict((cfg.get('env_cfg') or {}).get('dist_cfg') or {})
    os.environ.update(launcher_environment(launcher, os.environ,
                                           dist_cfg.pop('port', None)))
    if torch.cuda.is_available():
        from mmengine.dist import init_dist

        # torch's variables are set now: mmengine's torchrun path reads them
        init_dist('pytorch', **dist_cfg)
        return
    dist_cfg.pop('init_backend', None)
    backend = dist_cfg.pop('backend', 'gloo')
    dist_cfg['timeout'] = _timeout(dist_cfg.get('timeout'))
    torch.distributed.init_process_group(
        backend=backend, **{k: v for k, v in dist_cfg.items()
                            if v is not None})


def rank() -> int:
    """This process's rank in the job (0 when not distributed)."""
    if torch.distributed.is_available() and \
            torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def world_size() -> int:
    """How many processes the job has (1 when not distributed)."""
    if torch.distributed.is_available() and \
            torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


_rank_0_group = None


def on_rank_0(work: Callable[[], T]) -> T:
    """``work()`` run once for the whole job, on rank 0; every rank returns
    its result (which must pickle). The other ranks wait for it (up to
    :data:`RANK_0_WORK_TIMEOUT_S`, on a gloo group of their own whatever the
    training's backend). Not distributed: ``work()``.

    Raises:
        whatever ``work`` raised, on rank 0;
        StoppedOnRank0: on the other ranks, when ``work`` raised.
    """
    global _rank_0_group
    if rank() == 0 and not torch.distributed.is_initialized():
        return work()
    if _rank_0_group is None:
        _rank_0_group = torch.distributed.new_group(
            backend='gloo', timeout=_timeout(RANK_0_WORK_TIMEOUT_S))
    message = [None, None]  # result, failure
    if rank() == 0:
        try:
            message[0] = work()
        except BaseException as error:
            message[1] = f'{type(error).__name__} on rank 0'
            torch.distributed.broadcast_object_list(message, src=0,
                                                    group=_rank_0_group)
            raise
    torch.distributed.broadcast_object_list(message, src=0,
                                            group=_rank_0_group)
    if message[1] is not None:
        raise StoppedOnRank0(
            f'rank {rank()}: stopped, rank 0 ended the job ({message[1]}; '
            f'its output says why)')
    return message[0]


def collective_timeout(error: BaseException, cfg: Config) -> Optional[str]:
    """A message for a distributed run whose collective timed out, naming
    the setting; None for any other error."""
    text = str(error)
    if not (torch.distributed.is_available()
            and torch.distributed.is_initialized()) or not re.search(
                r'timed? ?out', text, re.IGNORECASE):
        return None
    timeout = ((cfg.get('env_cfg') or {}).get('dist_cfg') or {}).get(
        'timeout', 1800)
    first = text.strip().splitlines()[0] if text.strip() else repr(error)
    return (f'no answer from another rank within {timeout} s '
            f'(env_cfg.dist_cfg.timeout): a rank stalled or died '
            f'({first}). The launcher (torchrun, srun --kill-on-bad-exit, '
            f'mpirun) stops the other ranks; --resume continues from the '
            f'last checkpoint. If one rank legitimately works that long '
            f'alone (evaluating a large split), raise the timeout: '
            f'--cfg-options env_cfg.dist_cfg.timeout=SECONDS')


@contextlib.contextmanager
def finish_distributed_if_ok() -> Iterator[None]:
    """Run a tool's work, then :func:`finish_distributed` if it succeeded.

    On an error nothing waits on the other ranks: a barrier there would
    hang on a rank that died or stalled (until the collective timeout,
    ``env_cfg.dist_cfg.timeout``). The process exits with the error and
    the launcher stops the other ranks.
    """
    yield
    finish_distributed()


def finish_distributed() -> None:
    """Tear the process group down before the interpreter exits, once every
    rank is done and the objects using it (the Runner, its DDP wrapper) are
    gone: a gloo group left to interpreter shutdown, or destroyed under a
    live DDP reducer, can abort the process ("terminate called without an
    active exception"), which the launcher reports as a failure."""
    global _rank_0_group
    if torch.distributed.is_available() and \
            torch.distributed.is_initialized():
        gc.collect()
        torch.distributed.barrier()
        _rank_0_group = None
        torch.distributed.destroy_process_group()
