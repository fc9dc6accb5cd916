"""``_base_ = 'prm_det::configs/...'`` in a user's config, from every way
prm_det can be on the path: a checkout's tools (which put their checkout's
prm_det first), an editable install (``pip install -e .``, as this
repository's .venv has it) and, when neither has the config, an error that
says what to write instead. The installed wheel's case:
tests/test_packaging/test_installed_demo.py and test_fresh_venv.py."""
import json
import os.path as osp
import shutil
import sys
from importlib import metadata

import pytest
from mmengine.config import Config
from tool_runs import REPO, checkpoint_meta, ok, outside_env, run_tool, \
    tiny_options

import prm_det
from prm_det.engine import configs

USER_CONFIG = """\
_base_ = 'prm_det::configs/demo/retinanet_prm_r18_shapes.py'
optim_wrapper = dict(optimizer=dict(lr=0.0123))  # the user's own change
"""


def write_user_config(folder, text=USER_CONFIG, name='my_config.py'):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return name


def dumped_config(work_dir):
    """The config the run dumped into its work_dir (mmengine's Runner)."""
    (path, ) = [p for p in work_dir.iterdir() if p.suffix == '.py']
    return Config.fromfile(str(path))


@pytest.mark.slow
def test_checkouts_train_py_trains_a_user_config_that_inherits_a_prm_det_base(
        tiny_data, tmp_path):
    user = tmp_path / 'user'
    config = write_user_config(user)
    work = user / 'work'
    out = ok(run_tool([sys.executable, osp.join(REPO, 'tools', 'train.py'),
                       config, '--work-dir', str(work)] +
                      tiny_options(tiny_data), cwd=str(user),
                      env=outside_env()))
    assert '.mim' not in out
    assert 'Epoch(train)' in out
    assert checkpoint_meta(str(work / 'epoch_1.pth'))['iter'] == 4
    cfg = dumped_config(work)
    # the base's detector, with the user's change on top
    assert cfg.model.backbone.type == 'PRMResNet'
    assert cfg.optim_wrapper.optimizer.lr == 0.0123


@pytest.mark.slow
def test_a_checkouts_tools_inherit_from_that_checkout_not_the_installed_one(
        tmp_path):
    """A second checkout (a copy of this one, prm_det not installed from
    it): its tools/train.py resolves ``prm_det::`` in the copy; a config
    only the copy has gets past config loading to the dataset check."""
    checkout = tmp_path / 'checkout'
    ignore = shutil.ignore_patterns('__pycache__', '*.pyc')
    for folder in ('prm_det', 'tools', 'configs'):
        shutil.copytree(osp.join(REPO, folder), checkout / folder,
                        ignore=ignore)
    shutil.copy(osp.join(REPO, 'model-index.yml'), checkout)
    (checkout / 'configs' / 'demo' / 'only_in_this_checkout.py').write_text(
        "_base_ = './retinanet_prm_r18_shapes.py'\n")
    user = tmp_path / 'user'
    config = write_user_config(
        user, "_base_ = 'prm_det::configs/demo/only_in_this_checkout.py'\n")
    proc = run_tool([sys.executable, str(checkout / 'tools' / 'train.py'),
                     config], cwd=str(user), env=outside_env())
    assert proc.returncode != 0
    assert 'The dataset is not where the config says' in proc.stderr
    assert 'data/prm_demo/annotations/instances_train.json' in proc.stderr
    assert 'Traceback' not in proc.stderr and '.mim' not in proc.stderr


def installed_editable():
    """Whether prm_det is installed with ``pip install -e`` from REPO."""
    try:
        direct_url = metadata.distribution('prm_det').read_text(
            'direct_url.json')
    except metadata.PackageNotFoundError:
        return False
    info = json.loads(direct_url or '{}')
    return (info.get('dir_info', {}).get('editable', False) and
            osp.samefile(info.get('url', '').replace('file://', ''), REPO))


USER_SCRIPT = """\
import prm_det
from mmengine.config import Config

print('prm_det from', prm_det.__file__)
cfg = Config.fromfile('my_config.py')
print('loaded', cfg.model.backbone.type, cfg.optim_wrapper.optimizer.lr)
"""


@pytest.mark.slow
@pytest.mark.skipif(not installed_editable(),
                    reason='prm_det is not installed editable from here')
def test_a_users_script_under_the_editable_install_loads_a_prm_det_base(
        tmp_path):
    write_user_config(tmp_path)
    (tmp_path / 'run.py').write_text(USER_SCRIPT)
    out = ok(run_tool([sys.executable, 'run.py'], cwd=str(tmp_path),
                      env=outside_env()))
    assert f'prm_det from {osp.join(REPO, "prm_det", "__init__.py")}' in out
    assert 'loaded PRMResNet 0.0123' in out


def test_a_prm_det_base_without_the_configs_folder_names_the_right_path(
        tmp_path):
    config = tmp_path / 'my_config.py'
    config.write_text("_base_ = 'prm_det::retinanet_prm_r50.py'\n")
    with pytest.raises(configs.ConfigBaseNotFound,
                       match=r"Fix: _base_ = "
                       r"'prm_det::configs/retinanet_prm_r50\.py'"):
        Config.fromfile(str(config))


def test_a_prm_det_base_that_does_not_exist_names_the_problem_and_the_fix(
        tmp_path):
    config = tmp_path / 'my_config.py'
    config.write_text("_base_ = 'prm_det::configs/retinanet_prm_r5.py'\n")
    with pytest.raises(FileNotFoundError) as error:
        Config.fromfile(str(config))
    message = str(error.value)
    assert "'prm_det::configs/retinanet_prm_r5.py': no such config" in message
    assert "Fix: name a file under prm_det's configs/" in message


def test_a_prm_det_without_configs_anywhere_says_how_to_get_them(
        tmp_path, monkeypatch):
    """A prm_det package with neither the wheel's .mim/ nor a checkout
    around it (copied somewhere by hand)."""
    package = tmp_path / 'site' / 'prm_det'
    package.mkdir(parents=True)
    monkeypatch.setattr(configs, '_package_dir', lambda: str(package))
    config = tmp_path / 'my_config.py'
    config.write_text(
        "_base_ = 'prm_det::configs/demo/retinanet_prm_r18_shapes.py'\n")
    with pytest.raises(configs.ConfigBaseNotFound) as error:
        Config.fromfile(str(config))
    message = str(error.value)
    assert f'the prm_det imported ({package}) has neither' in message
    assert 'pip install prm_det-*.whl' in message
    assert "_base_ = '/path/to/checkout/configs/demo/" in message


def test_other_packages_bases_still_go_to_mmengine():
    import mmdet
    path, scope = Config._get_cfg_path(
        'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', 'my_config.py')
    assert path == osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs',
                            'retinanet', 'retinanet_r50_fpn_1x_coco.py')
    assert scope == 'mmdet'


def test_prm_det_bases_come_from_the_imported_package_with_its_scope():
    path, scope = Config._get_cfg_path(
        'prm_det::configs/retinanet_prm_r50.py', 'my_config.py')
    assert path == osp.join(osp.dirname(osp.dirname(prm_det.__file__)),
                            'configs', 'retinanet_prm_r50.py')
    assert scope == 'prm_det'
