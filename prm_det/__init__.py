"""prm_det: attention ResNet backbones (PRM and the systems it compares
with) for MMDetection 3.x.

``import prm_det`` registers the attention modules (``PRM``, ``SE``, ``GE``,
``SGE``, ``CBAM``, ``BAM``; GC and non-local are mmcv's ``ContextBlock`` and
``NonLocal2d``) and the backbones (``PRMResNet``, ``SEResNet``,
``GCResNet``, ``GEResNet``, ``SGEResNet``, ``CBAMResNet``, ``BAMResNet``,
``SKResNet``, ``NLResNet``, ``AttentionResNet``; ``LRResNet``, LR-Net's
local relation layers in place of the convs) into mmdet's ``MODELS``
registry, a model
wrapper for distributed CPU training and the ``prm_det::`` config scope.
It changes none of mmengine's checkpoint loaders: prm_det's, which load
every checkpoint as data (and ``torchvision://`` without torchvision), are
switched on by :func:`prm_det.engine.install_safe_loading`, which its tools
call, or by importing :mod:`prm_det.safe_loading`. Configs load both with::

    custom_imports = dict(imports=['prm_det', 'prm_det.safe_loading'],
                          allow_failed_imports=False)

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
