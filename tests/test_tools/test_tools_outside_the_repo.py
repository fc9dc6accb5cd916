"""Each tool run as a user runs it: a subprocess started in a folder of the
user's (not the repository), the tool and config named by path, no
PYTHONPATH, in a process that has not imported mmdet's modules first.
train.py, test.py, dist_train.sh and dist_test.sh: test_end_to_end.py;
export_onnx.py: test_export_onnx.py; setup_env.sh: test_setup.py."""
import json
import os.path as osp
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from mmdet.registry import MODELS
from se_state_dicts import timm_state_dict
from tool_runs import REPO, RETINA, ok, outside_env, parse_ap_table, run_tool

from prm_det.datasets.synthetic_shapes import generate

pytestmark = pytest.mark.slow


def tool(*parts):
    return osp.join(REPO, 'tools', *parts)


def test_make_shapes_writes_the_dataset_where_it_is_told(tmp_path):
    out = ok(run_tool([sys.executable, tool('make_shapes.py'), '--out',
                       'data/shapes', '--train', '3', '--val', '2', '--size',
                       '96'], cwd=str(tmp_path), env=outside_env()))
    ann = tmp_path / 'data' / 'shapes' / 'annotations'
    assert str(osp.join('data', 'shapes', 'annotations')) in out
    for split, count in (('train', 3), ('val', 2)):
        coco = json.loads((ann / f'instances_{split}.json').read_text())
        assert len(coco['images']) == count
        assert all((tmp_path / 'data' / 'shapes' / split / i['file_name'])
                   .is_file() for i in coco['images'])


def test_seresnet2prm_det_writes_a_file_that_loads_strictly(tmp_path):
    """The converter on a timm seresnet50 state dict from the command line:
    it builds SEResNet to check the keys, in a process where nothing
    registered mmdet's modules."""
    src, dst = tmp_path / 'seresnet50_timm.pth', tmp_path / 'se_r50.pth'
    source = timm_state_dict(50)
    torch.save(source, src)
    out = ok(run_tool([sys.executable,
                       tool('model_converters', 'seresnet2prm_det.py'),
                       src.name, dst.name], cwd=str(tmp_path),
                      env=outside_env()))
    assert 'timm layout, SE-ResNet-50' in out and f'saved {dst.name}' in out
    state_dict = torch.load(dst, weights_only=True)['state_dict']
    model = MODELS.build(dict(type='SEResNet', depth=50))
    result = model.load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model.layer4[2].se.conv1.conv.weight,
                       source['layer4.2.se.fc1.weight'])


def test_get_flops_gives_a_small_models_attention_in_its_own_unit(tmp_path):
    out = ok(run_tool([sys.executable, tool('analysis_tools', 'get_flops.py'),
                       osp.join(REPO, RETINA), '--shape', '128', '128'],
                      cwd=str(tmp_path), env=outside_env()))
    (line, ) = [x for x in out.splitlines() if x.startswith('PRM (')]
    # the demo detector's 8 PRMs: some MFLOPs, with the exact count
    assert line.startswith('PRM (8 modules, every op counted): ')
    mflops = re.search(r'FLOPs \(([\d.]+) MFLOPs, [\d.]+% of the model\)',
                       line)
    assert mflops and float(mflops.group(1)) >= 1, line


def test_vis_prm_writes_titled_pictures(tmp_path, demo_checkpoint):
    import cv2
    import matplotlib.image
    checkpoint = tmp_path / 'random.pth'  # in the user's folder
    shutil.copy(demo_checkpoint, checkpoint)
    image = np.full((100, 140, 3), 90, np.uint8)
    image[30:60, 50:100] = 220
    cv2.imwrite(str(tmp_path / 'image.png'), image)
    out = ok(run_tool([sys.executable, tool('analysis_tools', 'vis_prm.py'),
                       osp.join(REPO, RETINA), checkpoint.name, 'image.png',
                       '--out-dir', 'vis'], cwd=str(tmp_path),
                      env=outside_env()))
    assert out.count('[vis_prm] layer') == 4
    for name in ('layer4_1_queries.png', 'layer4_1_gate.png', 'grid.png'):
        picture = matplotlib.image.imread(str(tmp_path / 'vis' / name))
        assert picture.shape[0] > 100 and picture.shape[1] >= 140


def test_demo_trains_and_reports_box_ap_from_the_users_folder(tmp_path):
    """tools/demo.py where the user is: its data (here a tiny set, already
    written) and work dir under the working directory, the config found
    beside the tool."""
    generate(str(tmp_path / 'data' / 'prm_demo'), num_train=4, num_val=2,
             image_size=96, max_objects=2, min_size=16, max_size=48, seed=1)
    out = ok(run_tool(
        [sys.executable, tool('demo.py'), '--cfg-options',
         'train_cfg.max_epochs=1', 'train_cfg.val_interval=1',
         'train_dataloader.batch_size=2', 'train_dataloader.num_workers=0',
         'train_dataloader.persistent_workers=False',
         'val_dataloader.num_workers=0',
         'val_dataloader.persistent_workers=False',
         'model.test_cfg.score_thr=0.0'],
        cwd=str(tmp_path), env=outside_env(), timeout=600))
    assert f'[demo] training {osp.join(REPO, RETINA)}' in out
    # a set other than the demo's size is used, and the user is told
    assert '[demo] data: data/prm_demo/, 4 train and 2 val images' in out
    assert '`make clean-demo`' in out
    assert (tmp_path / 'work_dirs' / 'demo' / 'epoch_1.pth').is_file()
    assert len(parse_ap_table(out)) == 6
    assert '[demo] PRM-RetinaNet' in out and 'box AP' in out
