"""A DistributedDataParallel wrapper that also runs on CPU (gloo).

mmengine 0.10.7's Runner hands every DDP-type wrapper
``device_ids=[LOCAL_RANK]``; torch refuses ``device_ids`` for a module whose
parameters are on the CPU. This wrapper keeps them for GPU modules (where it
is exactly ``MMDistributedDataParallel``) and drops them on CPU. It is
selected with ``model_wrapper_cfg=dict(type='DeviceAwareDDP')``, which
``tools/train.py`` sets for distributed CPU runs, together with the gloo
backend.
"""
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS


@MODEL_WRAPPERS.register_module()
class DeviceAwareDDP(MMDistributedDataParallel):

    def __init__(self, module, device_ids=None, **kwargs):
        first = next(module.parameters(), None)
        if first is None or first.device.type == 'cpu':
            device_ids = None
        kwargs.setdefault('broadcast_buffers', False)
        super().__init__(module=module, device_ids=device_ids, **kwargs)
