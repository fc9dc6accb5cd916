from .checkpoint import (CheckpointMismatch, IncompleteCheckpoint,
                         PretrainedWeightsUnavailable, UntrustedCheckpoint,
                         load_checkpoint_file, load_from_local_file,
                         load_from_torchvision_urls)
from .hooks import AtomicCheckpointHook, latest_complete_checkpoint
from .wrappers import DeviceAwareDDP

__all__ = [
    'AtomicCheckpointHook', 'CheckpointMismatch', 'DeviceAwareDDP',
    'IncompleteCheckpoint', 'PretrainedWeightsUnavailable',
    'UntrustedCheckpoint', 'latest_complete_checkpoint',
    'load_checkpoint_file', 'load_from_local_file',
    'load_from_torchvision_urls'
]
