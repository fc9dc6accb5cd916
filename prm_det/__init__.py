"""prm_det: PRM, SE and GC attention ResNet backbones for MMDetection 3.x.

``import prm_det`` registers the attention modules (``PRM``, ``SE``; GC is
mmcv's ``ContextBlock``) and the backbones (``PRMResNet``, ``SEResNet``,
``GCResNet``, ``AttentionResNet``) into mmdet's ``MODELS`` registry, a model
wrapper for distributed CPU training, and a ``torchvision://`` checkpoint
loader that needs no torchvision. Configs load it with::

    custom_imports = dict(imports=['prm_det'], allow_failed_imports=False)

The PRM tensor math in :mod:`prm_det.ops` needs torch alone; registration is
skipped only when mmdet is not installed at all (an mmdet that is installed
but broken raises as usual).
"""
import importlib.util

from .compat import MIN_TORCH, check_torch
from .version import __version__

check_torch()

if importlib.util.find_spec('mmdet') is not None:
    from . import engine, models  # noqa: F401  (registration side effects)

__all__ = ['MIN_TORCH', '__version__', 'check_torch']
