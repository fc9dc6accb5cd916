"""Where prm_det's models are registered.

Into mmdet's ``MODELS``, so that detector configs name them as mmdet's own
(``type='PRMResNet'``, ``mmdet.PRMResNet``), and into mmengine's root
``MODELS``, the registry mmcv registers its bricks in (``ContextBlock``,
``ConvModule``'s layers). mmcv builds a block's plugins from the root
registry switched to the current default scope: with no scope set (a script
that never called ``register_all_modules()`` or ``init_default_scope``) or
another package's scope, a module in mmdet's registry alone is not found
there ("Cannot find None in registry under scope name mmengine"). Every
registry reaches the root, so from both places PRM, SE and the backbones
build whatever scope is current, as ``ContextBlock`` does.
"""
from mmdet.registry import MODELS
from mmengine.registry import MODELS as ROOT_MODELS


def register_model(cls):
    """Class decorator: register ``cls`` in mmdet's and mmengine's root
    ``MODELS`` under its class name."""
    MODELS.register_module(module=cls)
    ROOT_MODELS.register_module(module=cls)
    return cls
