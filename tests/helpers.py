"""What several test files share: the checkout's path, the demo detectors'
configs and the options that shrink them to a few iterations, the check
that a subprocess succeeded, its tools loaded as modules, one narrow
backbone and the demo detector's weights in a file (``demo_checkpoint`` in
conftest.py writes it once a run). Helpers of one folder's tests live in
that folder (tool_runs.py, packaging_helpers.py, op_params.py,
se_state_dicts.py)."""
import os.path as osp

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO_CONFIG = osp.join(REPO, 'configs', 'demo', 'retinanet_prm_r18_shapes.py')
# the demo detectors, relative to the checkout, for the tools' command lines
RETINA = 'configs/demo/retinanet_prm_r18_shapes.py'
CASCADE = 'configs/demo/two_stage/cascade_rcnn_prm_r18_shapes.py'


def tiny_options(data_root, epochs=1, config=RETINA):
    """8 train images in batches of 2: 4 iterations an epoch. A detector
    trained 4 iterations scores every box low: keep all of them so that
    CocoMetric has detections to score."""
    score = ('model.test_cfg.score_thr=0.0' if config == RETINA else
             'model.test_cfg.rcnn.score_thr=0.0')
    return [
        '--cfg-options', score, f'data_root={data_root}',
        f'train_cfg.max_epochs={epochs}', f'train_cfg.val_interval={epochs}',
        'train_dataloader.batch_size=2', 'train_dataloader.num_workers=0',
        'train_dataloader.persistent_workers=False',
        'val_dataloader.num_workers=0',
        'val_dataloader.persistent_workers=False',
        'test_dataloader.num_workers=0',
        'test_dataloader.persistent_workers=False',
        'default_hooks.logger.interval=1',
    ]


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def tool_module(relative):
    """``tools/RELATIVE`` of this checkout as a module (its ``main(argv)``
    and helpers, in-process), imported once: prm_det's own ``load_tool``."""
    from prm_det.engine import load_tool
    return load_tool(osp.join(REPO, 'tools', relative))


def tiny_backbone(type_, depth=18, width=16, stages=4, groups=4, **kwargs):
    """A narrow ResNet (``width`` channels in the first stage instead of 64)
    built from mmdet's registry, no pretrained weights: ``type_`` is one of
    prm_det's ResNets (PRM and SGE with ``groups`` groups, SK's grouped conv
    with ``groups`` groups) or mmdet's 'ResNet'. ``stages`` < 4 keeps the
    first stages at strides 1, 2, ... with every one an output, and the
    class's own attention flags for them (GC: none in the first; BAM's and
    non-local's stage flags cut to ``stages``). ``kwargs`` go to the backbone as they
    are and override all of this."""
    from mmdet.registry import MODELS
    cfg = dict(type=type_, depth=depth, base_channels=width, init_cfg=None)
    if type_ in ('PRMResNet', 'SGEResNet'):
        cfg['attention'] = dict(groups=groups)
    if type_ == 'SKResNet':
        cfg['sk'] = dict(groups=groups)
    if type_ == 'LRResNet':  # local relation layers of 4 channels a group
        cfg['local_relation'] = dict(channels_per_group=groups)
    if stages != 4:
        cfg.update(num_stages=stages, strides=(1, 2, 2, 2)[:stages],
                   dilations=(1, ) * stages,
                   out_indices=tuple(range(stages)))
        flags = getattr(MODELS.get(type_), 'default_stages', None)
        if flags:
            cfg['attention_stages'] = tuple(flags[:stages])
        stage_attention = getattr(MODELS.get(type_),
                                  'default_stage_attention', None)
        if stage_attention:
            cfg['stage_attention'] = dict(
                stages=stage_attention['stages'][:stages])
    cfg.update(kwargs)
    return MODELS.build(cfg)


def write_demo_checkpoint(path):
    """The demo PRM-RetinaNet (``DEMO_CONFIG``) built under seed 0, its PRM
    parameters but the scales drawn from U(-2, 2) (a fresh PRM's gate is
    constant: sigmoid(xi) everywhere), saved as mmengine saves a
    checkpoint, with the shapes' classes in its meta."""
    import torch
    from mmdet.registry import MODELS
    from mmengine.config import Config

    from prm_det.datasets.synthetic_shapes import CLASSES
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(DEMO_CONFIG).model)
    for name, param in model.named_parameters():
        if '.prm.' in name and not name.endswith('scale'):
            param.data.uniform_(-2, 2)
    torch.save(dict(state_dict=model.state_dict(),
                    meta=dict(dataset_meta=dict(classes=CLASSES))), path)
    return path
