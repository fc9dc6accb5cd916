"""From ImageNet to COCO, run as users run it: each classifier of
configs/pretrain/ trains through MMPretrain's own training entry point
(``mmpretrain/.mim/tools/train.py``, what ``mim train mmpretrain`` runs) on a
generated set in ImageNet's folder layout, in a folder outside the checkout,
and reports top-1; the PRM classifier's checkpoint then starts
configs/retinanet_prm_r50.py through prm_det's tools/train.py with every
backbone tensor loaded and equal; a wrong prefix stops before training.
"""
import importlib.util
import os
import os.path as osp
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from tool_runs import REPO, ok, outside_env

pytestmark = pytest.mark.slow

CLASSIFIERS = ('resnet50_8xb32_in1k', 'se_resnet50_8xb32_in1k',
               'gc_resnet50_8xb32_in1k', 'prm_resnet50_8xb32_in1k',
               'prm_mobilenet-v2_8xb32_in1k', 'prm_mnasnet_8xb32_in1k')
SHAPES = ('rectangle', 'ellipse', 'triangle', 'cross')


def mmpretrain_train_py():
    spec = importlib.util.find_spec('mmpretrain')
    return osp.join(spec.submodule_search_locations[0], '.mim', 'tools',
                    'train.py')


def run(args, cwd, timeout=900):
    return subprocess.run([sys.executable] + [str(a) for a in args],
                          cwd=cwd, env=outside_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    """ImageNet's layout: train/<class>/*.JPEG, val/..., meta/*.txt."""
    root = tmp_path_factory.mktemp('shape_classes')
    ok(run([osp.join(REPO, 'tools', 'make_shape_classes.py'), '--out',
            root, '--train', '8', '--val', '4', '--size', '32'], root))
    return root


def classifier_options(data_root, epochs=2):
    """The ImageNet recipe shrunk: 4 classes, 64x64 crops, batches of 8."""
    options = [f'{loader}.dataset.data_root={data_root}'
               for loader in ('train_dataloader', 'val_dataloader',
                              'test_dataloader')]
    options += [f'{loader}.{key}' for loader in
                ('train_dataloader', 'val_dataloader')
                for key in ('batch_size=8', 'num_workers=0',
                            'persistent_workers=False')]
    return ['--cfg-options', *options,
            'train_dataloader.dataset.pipeline.1.scale=64',
            'val_dataloader.dataset.pipeline.1.scale=72',
            'val_dataloader.dataset.pipeline.2.crop_size=64',
            'model.head.num_classes=4', 'data_preprocessor.num_classes=4',
            'val_evaluator.topk=(1,)', 'model.head.topk=(1,)',
            f'train_cfg.max_epochs={epochs}', 'default_hooks.logger.interval=1',
            'randomness.seed=0']


@pytest.fixture(scope='module')
def trained(folders, tmp_path_factory):
    """Every classifier trained 2 epochs: {name: (work_dir, log)}."""
    runs = {}
    for name in CLASSIFIERS:
        work = tmp_path_factory.mktemp(name)
        proc = run([mmpretrain_train_py(),
                    osp.join(REPO, 'configs', 'pretrain', f'{name}.py'),
                    '--work-dir', work] + classifier_options(folders), work)
        runs[name] = (work, ok(proc))
    yield runs
    # a checkpoint per epoch per classifier: gone with the module
    for work, _ in runs.values():
        shutil.rmtree(work, ignore_errors=True)


def docs_block(section='## Single node, multi-node'):
    """The lines of the first ``bash`` block of docs/pretrain.md's
    ``section``."""
    with open(osp.join(REPO, 'docs', 'pretrain.md')) as f:
        text = f.read()
    block = re.search(r'```bash\n(.*?)```', text.split(section, 1)[1], re.S)
    return text, block.group(1).splitlines()


def test_the_docs_lead_with_mmpretrains_train_py_and_it_trains(
        folders, tmp_path):
    """docs/pretrain.md's leading commands work in ``make setup``'s
    environment (no mim there): run as written, from the checkout with the
    environment's python first on the PATH, the training shrunk by options
    appended to its command line (one epoch on the generated set); the
    scripts the other commands name are where the first one points; mim
    is the alternative, with its install."""
    text, lines = docs_block()
    commands = [line for line in lines
                if line.strip() and not line.lstrip().startswith('#')]
    tools, train = commands[:2]
    assert tools.startswith('MMPRETRAIN_TOOLS=$(python -c '), commands
    assert train.startswith('python $MMPRETRAIN_TOOLS/train.py '
                            'configs/pretrain/'), commands
    assert re.search(r'pip install\s+openmim', text)  # mim: installed first
    named = sorted(set(re.findall(r'\$MMPRETRAIN_TOOLS/(\S+)', '\n'.join(
        lines))))
    assert named == ['dist_train.sh', 'train.py']
    work = tmp_path / 'work'
    script = '\n'.join(
        ['set -e', tools] +
        [f'test -f "$MMPRETRAIN_TOOLS/{name}"' for name in named] +
        [train + ' ' + shlex.join(['--work-dir', str(work)] +
                                  classifier_options(folders, epochs=1))])
    env = outside_env()
    env['PATH'] = osp.dirname(sys.executable) + os.pathsep + env['PATH']
    log = ok(subprocess.run(['bash', '-c', script], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900))
    assert len(re.findall(r'accuracy/top1: ([\d.]+)', log)) == 1, log[-3000:]
    assert (work / 'epoch_1.pth').is_file()


@pytest.mark.parametrize('name', CLASSIFIERS)
def test_each_classifier_trains_through_mmpretrain_and_reports_top1(
        trained, name):
    work, log = trained[name]
    top1 = re.findall(r'accuracy/top1: ([\d.]+)', log)
    assert len(top1) == 2, log[-3000:]  # one validation per epoch
    assert 0.0 <= float(top1[-1]) <= 100.0
    checkpoint = torch.load(osp.join(work, 'epoch_2.pth'), map_location='cpu',
                            weights_only=False)
    backbone = [k for k in checkpoint['state_dict'] if
                k.startswith('backbone.')]
    attention = {'resnet50_8xb32_in1k': None, 'se_resnet50_8xb32_in1k': '.se.',
                 'gc_resnet50_8xb32_in1k': '.context_block.',
                 'prm_resnet50_8xb32_in1k': '.prm.',
                 'prm_mobilenet-v2_8xb32_in1k': '.attention.theta',
                 'prm_mnasnet_8xb32_in1k': '.attention.theta'}[name]
    if attention is None:
        assert not any('.se.' in k or '.prm.' in k for k in backbone)
    else:
        assert any(attention in k for k in backbone), backbone[:20]


def detector_options(shapes_root, checkpoint):
    """configs/retinanet_prm_r50.py on the generated shapes (4 classes,
    128x128), 2 iterations, the whole backbone frozen (frozen_stages=4,
    norms in eval) so that its weights stay as loaded."""
    classes = '(' + ','.join(f"'{c}'" for c in SHAPES) + ',)'
    options = [
        '--cfg-options', f'data_root={shapes_root}/',
        f'model.backbone.init_cfg.checkpoint={checkpoint}',
        'model.backbone.frozen_stages=4', 'model.bbox_head.num_classes=4',
        'train_dataloader.dataset.pipeline.2.scale=(128,128)',
        'train_dataloader.batch_size=2',
        'train_cfg.max_epochs=1', 'train_cfg.val_interval=2',
        'default_hooks.logger.interval=1']
    for loader, split in (('train_dataloader', 'train'),
                          ('val_dataloader', 'val'),
                          ('test_dataloader', 'val')):
        options += [
            f'{loader}.dataset.ann_file=annotations/instances_{split}.json',
            f'{loader}.dataset.data_prefix.img={split}/',
            f'{loader}.dataset.metainfo.classes={classes}',
            f'{loader}.num_workers=0', f'{loader}.persistent_workers=False']
    for evaluator in ('val_evaluator', 'test_evaluator'):
        options.append(f'{evaluator}.ann_file='
                       f'{shapes_root}/annotations/instances_val.json')
    return options


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp('shapes')
    ok(run([osp.join(REPO, 'tools', 'make_shapes.py'), '--out', root,
            '--train', '4', '--val', '2', '--size', '128'], root))
    return root


def test_prm_classifier_starts_retinanet_with_every_backbone_tensor(
        trained, shapes, tmp_path):
    work, _ = trained['prm_resnet50_8xb32_in1k']
    classifier = osp.join(work, 'epoch_2.pth')
    proc = run([osp.join(REPO, 'tools', 'train.py'),
                osp.join(REPO, 'configs', 'retinanet_prm_r50.py'),
                '--work-dir', tmp_path / 'det']
               + detector_options(shapes, classifier), tmp_path)
    log = ok(proc)
    source = torch.load(classifier, map_location='cpu',
                        weights_only=False)['state_dict']
    source = {k[len('backbone.'):]: v for k, v in source.items()
              if k.startswith('backbone.')}
    assert f'init_cfg: loaded {len(source)} tensors of PRMResNet' in log
    assert 'attention tensors keep their initialization' not in log
    detector = torch.load(tmp_path / 'det' / 'epoch_1.pth',
                          map_location='cpu', weights_only=False)
    assert detector['meta']['iter'] == 2
    loaded = {k[len('backbone.'):]: v
              for k, v in detector['state_dict'].items()
              if k.startswith('backbone.')}
    assert loaded.keys() == source.keys()
    for name, tensor in source.items():
        if not name.endswith('num_batches_tracked'):
            assert torch.equal(loaded[name], tensor), name


def test_a_wrong_prefix_stops_before_training(trained, shapes, tmp_path):
    work, _ = trained['prm_resnet50_8xb32_in1k']
    classifier = osp.join(work, 'epoch_2.pth')
    proc = run([osp.join(REPO, 'tools', 'train.py'),
                osp.join(REPO, 'configs', 'retinanet_prm_r50.py'),
                '--work-dir', tmp_path / 'det']
               + detector_options(shapes, classifier)
               + ['model.backbone.init_cfg.prefix=head.'], tmp_path)
    assert proc.returncode != 0
    err = proc.stderr
    assert 'Traceback' not in err, err[-3000:]
    assert "error: init_cfg: the checkpoint" in err
    assert "prefix='head.'" in err and 'fills 0 of the backbone' in err
    assert "prefix='backbone.'" in err  # the fix
    assert 'Epoch(train)' not in proc.stdout + err  # no iteration ran
    assert not (tmp_path / 'det' / 'epoch_1.pth').exists()
