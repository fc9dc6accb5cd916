"""What each launcher's environment gives a process (prm_det.engine.
distributed), SyncBN on CPU, and which path PRM takes with each norm:
in-process, no training."""
import datetime
import logging
import os
import os.path as osp
import tempfile

import pytest
import torch
import torch.nn as nn
from cluster_stubs import write_cluster_stubs
from helpers import tiny_backbone
from mmengine.logging import MMLogger
from mmengine.model import revert_sync_batchnorm

from prm_det.engine.distributed import (LauncherEnvironmentMissing,
                                        launcher_environment, on_rank_0)
from prm_det.engine.wrappers import DeviceAwareDDP
from prm_det.models.layers.prm import batch_norm_of

SLURM = dict(SLURM_PROCID='3', SLURM_NTASKS='16', SLURM_LOCALID='3',
             SLURM_NODELIST='gpu[01-02]')


@pytest.fixture
def scontrol_on_path(tmp_path, monkeypatch):
    stubs = write_cluster_stubs(str(tmp_path), 'python')
    monkeypatch.setenv('PATH', stubs + os.pathsep + os.environ['PATH'])


def test_slurm_task_gets_torch_variables_and_first_host_as_master(
        scontrol_on_path):
    env = launcher_environment('slurm', SLURM)
    assert env == dict(RANK='3', WORLD_SIZE='16', LOCAL_RANK='3',
                       MASTER_ADDR='localhost', MASTER_PORT='29500')


def test_master_port_from_dist_cfg_then_environment_then_default(
        scontrol_on_path):
    assert launcher_environment('slurm', dict(SLURM, MASTER_PORT='1234'))[
        'MASTER_PORT'] == '1234'
    assert launcher_environment('slurm', dict(SLURM, MASTER_PORT='1234'),
                                port=4321)['MASTER_PORT'] == '4321'
    assert launcher_environment('slurm', dict(SLURM, MASTER_ADDR='head'))[
        'MASTER_ADDR'] == 'head'


def test_slurm_without_scontrol_says_to_set_master_addr(monkeypatch):
    monkeypatch.setenv('PATH', tempfile.mkdtemp())
    with pytest.raises(LauncherEnvironmentMissing, match='MASTER_ADDR'):
        launcher_environment('slurm', SLURM)


@pytest.mark.parametrize('launcher,missing,how', [
    ('slurm', 'SLURM_PROCID', 'srun'),
    ('mpi', 'OMPI_COMM_WORLD_RANK or PMI_RANK', 'mpirun'),
    ('pytorch', 'RANK', 'torchrun'),
])
def test_a_process_the_launcher_did_not_start_is_told_how(launcher, missing,
                                                         how):
    with pytest.raises(LauncherEnvironmentMissing) as error:
        launcher_environment(launcher, {})
    assert missing in str(error.value) and how in str(error.value)
    assert '--launcher none' in str(error.value)


def test_openmpi_on_one_host_needs_no_master_address():
    env = launcher_environment('mpi', dict(
        OMPI_COMM_WORLD_RANK='1', OMPI_COMM_WORLD_SIZE='2',
        OMPI_COMM_WORLD_LOCAL_RANK='1', OMPI_COMM_WORLD_LOCAL_SIZE='2'))
    assert env == dict(RANK='1', WORLD_SIZE='2', LOCAL_RANK='1',
                       MASTER_ADDR='127.0.0.1', MASTER_PORT='29500')


def test_mpi_over_hosts_without_master_address_says_how_to_pass_it():
    with pytest.raises(LauncherEnvironmentMissing,
                       match='mpirun -x MASTER_ADDR'):
        launcher_environment('mpi', dict(
            OMPI_COMM_WORLD_RANK='5', OMPI_COMM_WORLD_SIZE='16',
            OMPI_COMM_WORLD_LOCAL_RANK='5', OMPI_COMM_WORLD_LOCAL_SIZE='8'))


def test_mpich_variables():
    env = launcher_environment('mpi', dict(
        PMI_RANK='2', PMI_SIZE='4', MPI_LOCALRANKID='0', MASTER_ADDR='h0'))
    assert (env['RANK'], env['WORLD_SIZE'], env['LOCAL_RANK'],
            env['MASTER_ADDR']) == ('2', '4', '0', 'h0')


def test_torchrun_variables_pass_through():
    env = launcher_environment('pytorch', dict(
        RANK='1', WORLD_SIZE='2', LOCAL_RANK='1', MASTER_ADDR='10.0.0.1',
        MASTER_PORT='29600'))
    assert env == dict(RANK='1', WORLD_SIZE='2', LOCAL_RANK='1',
                       MASTER_ADDR='10.0.0.1', MASTER_PORT='29600')


def test_rank_0_work_without_a_process_group_runs_here():
    assert on_rank_0(lambda: 'done') == 'done'


@pytest.fixture
def one_rank_group():
    """A gloo process group of this process alone."""
    store = osp.join(tempfile.mkdtemp(), 'store')
    torch.distributed.init_process_group(
        'gloo', init_method=f'file://{store}', rank=0, world_size=1,
        timeout=datetime.timedelta(seconds=30))
    yield
    torch.distributed.destroy_process_group()


class Collect(logging.Handler):

    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_syncbn_on_cpu_ddp_becomes_batchnorm_with_one_warning(
        one_rank_group):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.SyncBatchNorm(8),
                          nn.Sequential(nn.Conv2d(8, 8, 1),
                                        nn.SyncBatchNorm(8)))
    weight = model[1].weight
    logger = MMLogger.get_current_instance()
    seen = Collect()
    logger.addHandler(seen)
    try:
        wrapped = DeviceAwareDDP(model)
    finally:
        logger.removeHandler(seen)
    synced = [m for m in wrapped.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert not synced
    assert wrapped.module[1].weight is weight  # the optimizer's parameter
    warnings = [m for m in seen.messages if 'SyncBN needs CUDA' in m]
    assert len(warnings) == 1 and 'its 2 layers' in warnings[0]
    wrapped(torch.rand(2, 3, 8, 8)).sum().backward()  # trains on CPU


def test_prm_fuses_batchnorm_but_runs_syncbn_as_a_module():
    """SyncBN's statistics come from every rank: PRM leaves the norm to it
    (unfused). BatchNorm2d, and mmengine's BatchNorm in SyncBN's place
    (a run that is not distributed, or on CPU), go into PRM's op."""
    c = torch.rand(2, 8, 5, 5)
    sync = nn.SyncBatchNorm(8)
    assert batch_norm_of(sync, c) is None
    reverted = revert_sync_batchnorm(nn.Sequential(nn.SyncBatchNorm(8)))[0]
    assert type(reverted) is not nn.BatchNorm2d  # mmengine's _BatchNormXd
    assert batch_norm_of(reverted, c) is not None
    assert batch_norm_of(nn.BatchNorm2d(8), c) is not None
    assert batch_norm_of(nn.GroupNorm(2, 8), c) is None


def _prm_block_norm_calls(norm_cfg):
    """How many times the PRM block's last norm runs as a module in one
    training step of a PRM-ResNet-18 stage."""
    backbone = tiny_backbone('PRMResNet', 18, width=8, stages=1,
                             norm_cfg=norm_cfg, norm_eval=False)
    norm = backbone.layer1[0].norm2
    calls = []
    forward = norm.forward

    def counted(x):  # not a hook: a hooked norm is never fused
        calls.append(1)
        return forward(x)

    norm.forward = counted
    backbone.train()
    backbone(torch.rand(2, 3, 32, 32))[0].sum().backward()
    return len(calls)


def test_prm_block_with_syncbn_takes_the_unfused_path():
    """The block under SyncBN calls the norm (whose forward synchronizes the
    statistics on CUDA); under BN the op applies it."""
    assert _prm_block_norm_calls(dict(type='BN')) == 0
    assert _prm_block_norm_calls(dict(type='SyncBN')) == 1
