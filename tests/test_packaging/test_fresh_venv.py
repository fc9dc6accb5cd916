"""``pip install`` of the wheel into a fresh virtual environment that has
current setuptools (no ``pkg_resources``), as into a user's own MMDetection
environment, then a user's config that inherits ours, run by mim.

The fresh environment sees this one's packages (torch, mmcv, mmdet, ...)
through a folder of links to them, without setuptools, pkg_resources, pip
and prm_det: a fresh venv would download a multi-GB CUDA torch and compile
mmcv for an hour. Its setuptools, openmim and openmim's requirements come
from PyPI (or pip's cache). PRM runs on torch ops here (PRM_DET_BACKEND):
the kernel built from an installed wheel is tested in test_wheel.py.
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from helpers import ok, tiny_options
from packaging_helpers import pip

pytestmark = pytest.mark.slow

# not linked into the fresh environment: it has its own (or none)
NOT_SHARED = re.compile(
    r'^(setuptools|pkg_resources|_distutils_hack|pip|prm_det|__editable__|'
    r'openmim|mim)([-_.].*)?$|\.pth$', re.IGNORECASE)
# openmim's imports at start-up (not its opendatalab requirement, which pins
# old versions of much of the stack and is used by no command here)
MIM_REQUIREMENTS = ['click', 'colorama', 'model-index', 'pandas',
                    'requests', 'rich', 'tabulate']

USER_CONFIG = """\
# a user's config in their own project: ours, one setting changed
_base_ = 'prm_det::configs/demo/retinanet_prm_r18_shapes.py'
model = dict(bbox_head=dict(stacked_convs=2))
"""


def run(args, cwd, env, timeout=300):
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def has_pkg_resources(python, env):
    return run([python, '-c', 'import pkg_resources'], '/', env).returncode == 0


@pytest.fixture(scope='module')
def fresh(wheel, tmp_path_factory):
    """The fresh environment, as a user's is after each step; returns what
    each step showed."""
    root = tmp_path_factory.mktemp('fresh_venv')
    venv = root / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
    python = venv / 'bin' / 'python'
    site = Path(subprocess.run(
        [str(python), '-c',
         'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
        check=True, capture_output=True, text=True).stdout.strip())
    shared = root / 'shared_site_packages'
    shared.mkdir()
    for entry in Path(sysconfig.get_paths()['purelib']).iterdir():
        if not NOT_SHARED.search(entry.name):
            (shared / entry.name).symlink_to(entry)
    (site / 'shared_site_packages.pth').write_text(f'{shared}\n')
    env = {k: v for k, v in os.environ.items()
           if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
    env.update(PATH=f'{venv / "bin"}{os.pathsep}{env.get("PATH", "")}',
               PRM_DET_BACKEND='torch', OMP_NUM_THREADS='2')

    # current setuptools, as a fresh venv gets it today
    pip('install', '--upgrade', 'setuptools>=81', python=python)
    steps = dict(venv=venv, python=python, site=site, env=env,
                 pkg_resources_before=has_pkg_resources(python, env))

    user = root / 'user'  # the user's project, not the repository
    user.mkdir()
    (user / 'my_shapes.py').write_text(USER_CONFIG)
    from prm_det.datasets.synthetic_shapes import generate
    data = root / 'data'
    generate(str(data), num_train=4, num_val=2, image_size=96, max_objects=2,
             min_size=16, max_size=48, seed=1)
    steps.update(user=user, data=data)

    # prm_det alone (--no-deps): current setuptools stays
    pip('install', '--no-deps', str(wheel), python=python)
    train = site / 'prm_det' / '.mim' / 'tools' / 'train.py'
    steps['without_pkg_resources'] = run(
        [python, train, 'my_shapes.py'] + tiny_options(data), user, env)

    # as a user installs it: with its requirements
    pip('install', str(wheel), python=python)
    steps['pkg_resources_after'] = has_pkg_resources(python, env)
    pip('install', '--no-deps', 'openmim', python=python)
    pip('install', *MIM_REQUIREMENTS, python=python)
    yield steps
    # gigabytes of packages: gone with the module, not at the session's end
    shutil.rmtree(root, ignore_errors=True)


def test_with_current_setuptools_the_tools_name_the_one_line_fix(fresh):
    assert not fresh['pkg_resources_before']  # the venv is current
    proc = fresh['without_pkg_resources']
    assert proc.returncode != 0
    assert "pip install 'setuptools>=77.0.3,<80.9'" in proc.stderr
    assert 'pkg_resources' in proc.stderr
    assert 'Traceback' not in proc.stderr


def test_pip_install_brings_the_setuptools_mmengine_needs(fresh):
    assert fresh['pkg_resources_after']


def test_mim_list_shows_prm_det(fresh):
    out = ok(run(['mim', 'list'], fresh['user'], fresh['env']))
    assert re.search(r'^prm[-_]det\s', out, re.MULTILINE), out


def test_mim_train_and_test_run_a_user_config_that_inherits_ours(fresh):
    user, env = fresh['user'], fresh['env']
    options = tiny_options(fresh['data'])
    work = user / 'work'
    out = ok(run(['mim', 'train', 'prm_det', 'my_shapes.py', '--work-dir',
                  work] + options, user, env, timeout=600))
    installed = str(fresh['site'] / 'prm_det' / '.mim' / 'tools' /
                    'train.py')
    assert installed in out  # mim ran the wheel's tools/train.py
    assert 'Epoch(train)' in out
    # every part of the inherited config built in its own registry
    assert 'Failed to search registry' not in out, out
    # the config inherited ours, with the user's change
    dumped = (work / 'my_shapes.py').read_text()
    assert 'PRMResNet' in dumped and 'stacked_convs=2' in dumped
    checkpoint = work / 'epoch_1.pth'
    assert checkpoint.is_file()
    out = ok(run(['mim', 'test', 'prm_det', 'my_shapes.py', '--checkpoint',
                  checkpoint, '--work-dir', work] + options, user, env,
                 timeout=600))
    assert '| AP | AP50 | AP75 | APs | APm | APl |' in out


def test_mim_train_finds_our_config_by_its_name(fresh):
    """``mim train prm_det retinanet_prm_r50.py`` takes the installed
    config and runs our train.py, which stops at the missing COCO."""
    proc = run(['mim', 'train', 'prm_det', 'retinanet_prm_r50.py'],
               fresh['user'], fresh['env'])
    config = (fresh['site'] / 'prm_det' / '.mim' / 'configs' / 'configs' /
              'retinanet_prm_r50.py')
    assert f'will use {config} instead' in proc.stdout, proc.stdout
    assert 'error: The dataset is not where the config says' in proc.stderr
    assert 'data/coco/annotations/instances_train2017.json' in proc.stderr
