from .checkpoint import (PretrainedWeightsUnavailable, load_from_local_file,
                         load_from_torchvision_urls)
from .wrappers import DeviceAwareDDP

__all__ = [
    'DeviceAwareDDP', 'PretrainedWeightsUnavailable',
    'load_from_torchvision_urls', 'load_from_local_file'
]
