from .checkpoint import (CheckpointMismatch, IncompleteCheckpoint,
                         NotACheckpoint, UnusableCheckpoint,
                         UntrustedCheckpoint, load_checkpoint_file,
                         load_from_local_file)
from .configs import (ConfigLoaderUnavailable, load_config_file,
                      register_config_scope)
from .hooks import AtomicCheckpointHook, latest_complete_checkpoint
from .remote_checkpoints import (ChecksumMismatch,
                                 PretrainedWeightsUnavailable,
                                 load_from_http, load_from_torchvision_urls)
from .safe_loading import install_safe_loading
from .wrappers import DeviceAwareDDP

__all__ = [
    'AtomicCheckpointHook', 'CheckpointMismatch', 'ChecksumMismatch',
    'ConfigLoaderUnavailable', 'DeviceAwareDDP', 'IncompleteCheckpoint',
    'NotACheckpoint', 'PretrainedWeightsUnavailable', 'UnusableCheckpoint',
    'UntrustedCheckpoint', 'install_safe_loading',
    'latest_complete_checkpoint',
    'load_checkpoint_file', 'load_config_file', 'load_from_http',
    'load_from_local_file', 'load_from_torchvision_urls'
]

register_config_scope()  # `_base_ = 'prm_det::configs/...'` (configs.py)
