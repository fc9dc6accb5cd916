from .checkpoint import (CheckpointMismatch, IncompleteCheckpoint,
                         PretrainedWeightsUnavailable, UntrustedCheckpoint,
                         load_checkpoint_file, load_from_local_file,
                         load_from_torchvision_urls)
from .configs import (ConfigLoaderUnavailable, load_config_file,
                      register_config_scope)
from .hooks import AtomicCheckpointHook, latest_complete_checkpoint
from .wrappers import DeviceAwareDDP

__all__ = [
    'AtomicCheckpointHook', 'CheckpointMismatch', 'ConfigLoaderUnavailable',
    'DeviceAwareDDP', 'IncompleteCheckpoint', 'PretrainedWeightsUnavailable',
    'UntrustedCheckpoint', 'latest_complete_checkpoint',
    'load_checkpoint_file', 'load_config_file', 'load_from_local_file',
    'load_from_torchvision_urls'
]

register_config_scope()  # `_base_ = 'prm_det::configs/...'` (configs.py)
