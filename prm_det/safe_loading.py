"""Importing this module switches on prm_det's safe checkpoint loading
(:func:`prm_det.engine.install_safe_loading`): name it in a config's
``custom_imports`` so that any tool reading the config, mmdet's own
included, loads checkpoints as data::

    custom_imports = dict(imports=['prm_det', 'prm_det.safe_loading'],
                          allow_failed_imports=False)
"""
from .engine.checkpoints.safe_loading import install_safe_loading

install_safe_loading()
