"""A DistributedDataParallel wrapper that also runs on CPU (gloo).

mmengine 0.10.7's Runner hands every DDP-type wrapper
``device_ids=[LOCAL_RANK]``; torch refuses ``device_ids`` for a module whose
parameters are on the CPU. This wrapper keeps them for GPU modules (where it
is exactly ``MMDistributedDataParallel``) and drops them on CPU. It is
selected with ``model_wrapper_cfg=dict(type='DeviceAwareDDP')``, which
``tools/train.py`` sets for distributed CPU runs, together with the gloo
backend.

SyncBN (``norm_cfg=dict(type='SyncBN')``) needs CUDA: torch's SyncBatchNorm
refuses a CPU module under DDP. On CPU its layers become plain BatchNorm
(statistics of each rank's own batch), with one warning saying so, as
mmengine does for a run that is not distributed.
"""
import logging

import torch.nn as nn
from mmengine.logging import print_log
from mmengine.model import MMDistributedDataParallel, revert_sync_batchnorm
from mmengine.registry import MODEL_WRAPPERS


def sync_batch_norms(module: nn.Module) -> int:
    """How many SyncBN layers (torch's or mmcv's) ``module`` holds."""
    return sum(1 for m in module.modules()
               if type(m).__name__ == 'SyncBatchNorm')


@MODEL_WRAPPERS.register_module()
class DeviceAwareDDP(MMDistributedDataParallel):

    def __init__(self, module, device_ids=None, **kwargs):
        first = next(module.parameters(), None)
        if first is None or first.device.type == 'cpu':
            device_ids = None
            synced = sync_batch_norms(module)
            if synced:
                print_log(
                    f'SyncBN needs CUDA: on this CPU run its {synced} layers '
                    f'are plain BatchNorm, each rank normalizing with its own '
                    f'batch\'s statistics (not synchronized across ranks). '
                    f'To train as configured, run on GPUs; to silence this, '
                    f'use norm_cfg=dict(type=\'BN\').',
                    logger='current', level=logging.WARNING)
                module = revert_sync_batchnorm(module)
        kwargs.setdefault('broadcast_buffers', False)
        super().__init__(module=module, device_ids=device_ids, **kwargs)
