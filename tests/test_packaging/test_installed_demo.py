"""prm_det installed from its wheel, its tools run from the installed
package's ``prm_det/.mim/tools/`` in a folder of the user's: the stop on a
missing dataset points to the installed tools (demo.py, make_shapes.py),
never to ``make``, which only a checkout has; that demo.py trains and
reports box AP there; a user's config inherits ``prm_det::configs/...``."""
import os
import os.path as osp
import subprocess
import sys
from pathlib import Path

import pytest
from packaging_helpers import INSTALL_ROOT, install_keeping_unchanged_files

from prm_det.datasets.synthetic_shapes import generate

pytestmark = pytest.mark.slow

SHORT_DEMO = [
    '--cfg-options', 'train_cfg.max_epochs=1', 'train_cfg.val_interval=1',
    'train_dataloader.batch_size=2', 'train_dataloader.num_workers=0',
    'train_dataloader.persistent_workers=False',
    'val_dataloader.num_workers=0', 'val_dataloader.persistent_workers=False',
    'model.test_cfg.score_thr=0.0']


@pytest.fixture(scope='module')
def installed(wheel):
    """The wheel installed outside the repository (test_wheel.py's place,
    its kernel build cached there)."""
    site = Path(INSTALL_ROOT) / 'site'
    install_keeping_unchanged_files(wheel, site)
    return site


def run_installed(installed, args, cwd, timeout=300):
    """``python ARGS`` in the user's folder, prm_det from the installed
    wheel only."""
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env.update(PYTHONPATH=str(installed), OMP_NUM_THREADS='2',
               TORCH_EXTENSIONS_DIR=osp.join(INSTALL_ROOT,
                                             'torch_extensions'))
    return subprocess.run([sys.executable, *args], cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_installed_train_py_points_a_missing_coco_to_the_installed_demo(
        installed, tmp_path):
    tools = installed / 'prm_det' / '.mim' / 'tools'
    config = (installed / 'prm_det' / '.mim' / 'configs' / 'configs' /
              'retinanet_prm_r50.py')
    proc = run_installed(installed, [str(tools / 'train.py'), str(config)],
                         tmp_path)
    assert proc.returncode != 0
    assert 'data/coco/annotations/instances_train2017.json' in proc.stderr
    assert f'python {tools / "demo.py"}' in proc.stderr
    assert 'make' not in proc.stderr and 'Traceback' not in proc.stderr


def test_installed_demo_trains_and_reports_box_ap_from_the_users_folder(
        installed, tmp_path):
    """The command the message above gives, in a user's folder with a tiny
    dataset already written, on a short schedule."""
    tools = installed / 'prm_det' / '.mim' / 'tools'
    generate(str(tmp_path / 'data' / 'prm_demo'), num_train=4, num_val=2,
             image_size=96, max_objects=2, seed=1)
    proc = run_installed(installed, [str(tools / 'demo.py')] + SHORT_DEMO,
                         tmp_path, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    config = osp.join(installed, 'prm_det', '.mim', 'configs', 'configs',
                      'demo', 'retinanet_prm_r18_shapes.py')
    assert f'[demo] training {config} (work dir work_dirs/demo)' in out
    assert '4 train and 2 val images' in out
    # the way to the demo's own numbers, without `make clean-demo`
    assert 'removing data/prm_demo/ writes them' in out and 'make' not in out
    assert (tmp_path / 'work_dirs' / 'demo' / 'epoch_1.pth').is_file()
    assert '| AP | AP50 | AP75 | APs | APm | APl |' in out
    assert '[demo] PRM-RetinaNet' in out and 'box AP' in out
    assert str(tools / 'analysis_tools' / 'vis_prm.py') in out


def test_installed_train_py_reads_a_user_config_inheriting_a_prm_det_base(
        installed, tmp_path):
    """Past config loading to the dataset check, whose way out is the
    installed make_shapes.py."""
    (tmp_path / 'my_config.py').write_text(
        "_base_ = 'prm_det::configs/demo/retinanet_prm_r18_shapes.py'\n")
    tools = installed / 'prm_det' / '.mim' / 'tools'
    proc = run_installed(installed, [str(tools / 'train.py'),
                                     'my_config.py'], tmp_path)
    assert proc.returncode != 0
    assert 'The dataset is not where the config says' in proc.stderr
    assert (f'python {tools / "make_shapes.py"} --out data/prm_demo/'
            in proc.stderr)
    assert 'Traceback' not in proc.stderr
