"""Configs as mmengine's loader reads them: the one-line fix when setuptools
no longer has pkg_resources, and ``prm_det::`` known to mmengine once
prm_det is imported."""
import sys

import pytest

from prm_det.engine import ConfigLoaderUnavailable
from prm_det.engine import load_config


def test_without_pkg_resources_loading_a_config_names_the_fix(
        monkeypatch, repo):
    # as with setuptools 82+: `import pkg_resources` fails
    monkeypatch.setitem(sys.modules, 'pkg_resources', None)
    with pytest.raises(ConfigLoaderUnavailable,
                       match=r"Fix: pip install 'setuptools>=77.0.3,<80.9'"):
        load_config('configs/retinanet_prm_r50.py')


def test_importing_prm_det_makes_its_configs_a_base_mmengine_resolves():
    from mmengine.config.utils import (MODULE2PACKAGE,
                                       _get_package_and_cfg_path)
    assert MODULE2PACKAGE['prm_det'] == 'prm_det'
    assert _get_package_and_cfg_path(
        'prm_det::configs/retinanet_prm_r50.py') == (
            'prm_det', 'configs/retinanet_prm_r50.py')
