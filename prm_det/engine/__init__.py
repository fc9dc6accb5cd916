"""What prm_det's tools do around mmengine's Runner, as one API:
checkpoints (read as data, written whole, resumed), configs, the dataset
checks before a run, launchers and the process group, the work_dir lock,
the tools prm_det ships."""
from ..datasets.preflight import (DatasetInvalid, DatasetNotFound,
                                  check_dataset_files)
from ..models.backbones.pretrained import PretrainedLoadIncomplete
from .checkpoints.reading import (TRUST_ENV, CheckpointMismatch,
                                  IncompleteCheckpoint, NotACheckpoint,
                                  UnusableCheckpoint, UntrustedCheckpoint,
                                  check_checkpoint_fits, load_checkpoint_file,
                                  load_from_local_file, local_file_missing)
from .checkpoints.remote import (ChecksumMismatch,
                                 PretrainedWeightsUnavailable,
                                 load_from_http, load_from_torchvision_urls)
from .checkpoints.resume import checkpoint_problem, latest_complete_checkpoint
from .checkpoints.safe_loading import install_safe_loading
from .checkpoints.writing import (AtomicCheckpointHook, CheckpointDiskFull,
                                  remove_partials, write_text_atomically)
from .configs import (ConfigLoaderUnavailable, load_config,
                      load_config_file, register_config_scope)
from .distributed import (LauncherEnvironmentMissing, StoppedOnRank0,
                          collective_timeout, finish_distributed_if_ok,
                          init_distributed, on_rank_0, world_size)
from .shipped_tools import load_tool, shipped_tool
from .work_dir_lock import WorkDirBusy, lock_work_dir, work_dir_holder
from .wrappers import DeviceAwareDDP

__all__ = [
    'AtomicCheckpointHook', 'CheckpointDiskFull', 'CheckpointMismatch',
    'ChecksumMismatch', 'ConfigLoaderUnavailable', 'DatasetInvalid',
    'DatasetNotFound', 'DeviceAwareDDP', 'IncompleteCheckpoint',
    'LauncherEnvironmentMissing', 'NotACheckpoint',
    'PretrainedLoadIncomplete', 'PretrainedWeightsUnavailable',
    'StoppedOnRank0', 'TRUST_ENV',
    'UnusableCheckpoint', 'UntrustedCheckpoint', 'WorkDirBusy',
    'check_checkpoint_fits', 'check_dataset_files', 'checkpoint_problem',
    'collective_timeout',
    'finish_distributed_if_ok', 'init_distributed', 'install_safe_loading',
    'latest_complete_checkpoint', 'load_checkpoint_file', 'load_config',
    'load_config_file', 'load_from_http', 'load_from_local_file',
    'load_from_torchvision_urls', 'load_tool', 'local_file_missing',
    'lock_work_dir', 'on_rank_0', 'remove_partials', 'shipped_tool',
    'work_dir_holder', 'world_size', 'write_text_atomically'
]

register_config_scope()  # `_base_ = 'prm_det::configs/...'` (configs.py)
