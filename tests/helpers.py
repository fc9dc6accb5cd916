"""What several test files share: the checkout's path, its tools loaded as
modules, one narrow backbone and the demo detector's weights in a file
(``demo_checkpoint`` in conftest.py writes it once a run)."""
import os.path as osp

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO_CONFIG = osp.join(REPO, 'configs', 'demo', 'retinanet_prm_r18_shapes.py')


def tool_module(relative):
    """``tools/RELATIVE`` of this checkout as a module (its ``main(argv)``
    and helpers, in-process), imported once: prm_det's own ``load_tool``."""
    from prm_det.engine import load_tool
    return load_tool(osp.join(REPO, 'tools', relative))


def tiny_backbone(type_, depth=18, width=16, stages=4, groups=4, **kwargs):
    """A narrow ResNet (``width`` channels in the first stage instead of 64)
    built from mmdet's registry, no pretrained weights: ``type_`` is
    'PRMResNet' (PRM with ``groups`` groups), 'SEResNet', 'GCResNet' or
    mmdet's 'ResNet'. ``stages`` < 4 keeps the first stages at strides 1, 2,
    ... with every one an output, and the class's own attention flags for
    them (GC: none in the first). ``kwargs`` go to the backbone as they
    are and override all of this."""
    from mmdet.registry import MODELS
    cfg = dict(type=type_, depth=depth, base_channels=width, init_cfg=None)
    if type_ == 'PRMResNet':
        cfg['attention'] = dict(groups=groups)
    if stages != 4:
        cfg.update(num_stages=stages, strides=(1, 2, 2, 2)[:stages],
                   dilations=(1, ) * stages,
                   out_indices=tuple(range(stages)))
        flags = getattr(MODELS.get(type_), 'default_stages', None)
        if flags:
            cfg['attention_stages'] = tuple(flags[:stages])
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
