"""prm_det installs into an existing MMDetection environment as a package:
the wheel built from the repository holds every source file of prm_det
(kernel sources included), declares no torch or mmcv build, and, installed
outside the repository, runs PRM from a user's config with no fallback."""
import os
import os.path as osp
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging_helpers import (INSTALL_ROOT, REPO,
                               install_keeping_unchanged_files,
                               repository_files)

SOURCE_SUFFIXES = ('.py', '.cpp', '.h', '.cu', '.cuh')

USER_CONFIG = """\
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['prm_det'], allow_failed_imports=False)
model = dict(
    backbone=dict(type='PRMResNet', depth=18, init_cfg=None),
    neck=dict(in_channels=[64, 128, 256, 512]))
"""

# Run by a fresh interpreter in the user's own folder, prm_det on PYTHONPATH
# from the installed wheel only.
USER_SCRIPT = """\
import sys
import warnings

import mmdet.models  # noqa: F401  (the user's stack, its import notices)
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

installed = sys.argv[1]
# from here every warning fails the run (the kernel's fallback warning
# above all) but the deprecation notices of the libraries around prm_det
warnings.simplefilter('error')
warnings.filterwarnings('ignore', category=DeprecationWarning,
                        module=r'(?!prm_det)')
cfg = Config.fromfile('my_retinanet.py')  # custom_imports loads prm_det
import prm_det
assert prm_det.__file__.startswith(installed), prm_det.__file__
from mmdet.registry import MODELS
init_default_scope('mmdet')
detector = MODELS.build(cfg.model)
backbone = detector.backbone
x = torch.rand(2, 3, 64, 96)
with torch.no_grad():
    backbone.eval()
    shapes = [tuple(o.shape) for o in backbone(x)]
backbone.train()
sum(o.sum() for o in backbone(x)).backward()
assert all(p.grad is not None for n, p in backbone.named_parameters()
           if p.requires_grad and '.prm.' in n)
print('prm_det ran from', prm_det.__file__, shapes)
"""


@pytest.mark.slow
def test_wheel_holds_every_source_file_of_the_package(wheel):
    expected = {p for p in repository_files()
                if p.startswith('prm_det/') and p.endswith(SOURCE_SUFFIXES)}
    assert any(p.startswith('prm_det/ops/csrc/') for p in expected)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert expected - names == set()


@pytest.mark.slow
def test_wheel_holds_the_configs_tools_and_model_index_where_mim_looks(
        wheel):
    """As OpenMMLab wheels: prm_det/.mim/ holds tools/ (mim train/test run
    them), the configs under configs/ (``prm_det::configs/...``) and the
    model index (``mim list``)."""
    expected = {'prm_det/.mim/model-index.yml'}
    for path in repository_files():
        if path.startswith('tools/'):
            expected.add('prm_det/.mim/' + path)
        elif path.startswith('configs/'):
            expected.add('prm_det/.mim/configs/' + path)
    assert 'prm_det/.mim/tools/train.py' in expected
    assert 'prm_det/.mim/tools/slurm_train.sh' in expected
    assert 'prm_det/.mim/configs/configs/retinanet_prm_r50.py' in expected
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert expected - names == set()
    assert not [n for n in names if '__pycache__' in n]


def wheel_requirements(wheel):
    """Requires-Dist lines of the wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        (metadata, ) = [n for n in archive.namelist()
                        if n.endswith('.dist-info/METADATA')]
        lines = archive.read(metadata).decode().splitlines()
    return [line.split(':', 1)[1].strip() for line in lines
            if line.startswith('Requires-Dist:')]


@pytest.mark.slow
def test_wheel_declares_setuptools_with_pkg_resources_and_an_onnx_extra(
        wheel):
    requirements = [r.replace(' ', '') for r in wheel_requirements(wheel)]
    assert 'setuptools<80.9' in requirements
    onnx_extra = {r.split(';')[0].split('>')[0] for r in requirements
                  if 'extra=="onnx"' in r}
    assert onnx_extra == {'onnx', 'onnxruntime', 'onnxscript'}


@pytest.mark.slow
def test_wheel_declares_no_torch_or_mmcv_build(wheel):
    with zipfile.ZipFile(wheel) as archive:
        (metadata, ) = [n for n in archive.namelist()
                        if n.endswith('.dist-info/METADATA')]
        lines = archive.read(metadata).decode().splitlines()
    required = [line.split(':', 1)[1].strip() for line in lines
                if line.startswith('Requires-Dist:')
                and 'extra ==' not in line]
    names = {r.split(';')[0].split('<')[0].split('>')[0].split('=')[0]
             .strip().lower() for r in required}
    assert {'mmdet', 'ninja'} <= names  # ninja builds the kernel
    assert not names & {'torch', 'mmcv', 'mmcv-full', 'mmengine'}


@pytest.mark.slow
def test_installed_wheel_runs_prm_from_a_user_config_without_fallback(
        wheel, tmp_path):
    installed = Path(INSTALL_ROOT) / 'site'
    install_keeping_unchanged_files(wheel, installed)
    user = tmp_path / 'user'  # the user's project, not the repository
    user.mkdir()
    (user / 'my_retinanet.py').write_text(USER_CONFIG)
    (user / 'run.py').write_text(USER_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(installed),
               TORCH_EXTENSIONS_DIR=osp.join(INSTALL_ROOT,
                                             'torch_extensions'))
    result = subprocess.run(
        [sys.executable, 'run.py', str(installed)], cwd=user, env=env,
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'prm_det ran from ' + str(installed) in result.stdout
    # the kernel's sources came with it
    assert any(name.endswith('.cpp') for name in os.listdir(
        installed / 'prm_det' / 'ops' / 'csrc'))


def test_readme_install_section_names_what_a_user_needs():
    with open(osp.join(REPO, 'README.md')) as f:
        readme = f.read()
    section = readme.split('## Install into your own MMDetection '
                           'environment', 1)[1].split('\n## ', 1)[0]
    for needed in ('pip install -e .', 'pip install .', 'mim install -e .',
                   "custom_imports = dict(imports=['prm_det']",
                   "type='PRMResNet'", 'plugins=', 'configs/',
                   # every requirement of the own-environment path
                   'setuptools>=77.0.3,<80.9', 'C++ compiler', "'.[onnx]'",
                   # the configs from an install, mmdet's tools on them
                   'mim train prm_det', 'mim test prm_det',
                   "_base_ = 'prm_det::configs/", 'mim run mmdet',
                   'docs/install.md'):
        assert needed in section, needed
