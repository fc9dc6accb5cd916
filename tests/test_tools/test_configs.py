"""Every config loads and builds with the backbone its name says, and the
detectors' trainable parameters equal the paper's Table 4."""
import glob
import os.path as osp

import pytest
import torch
from mmdet.registry import HOOKS, MODELS

from prm_det.engine import load_config

CONFIG_DIR = osp.join(osp.dirname(osp.dirname(osp.dirname(
    osp.abspath(__file__)))), 'configs')
# configs/demo/ and its subfolders (two_stage/), less the shared parts (_*)
CONFIGS = sorted(glob.glob(osp.join(CONFIG_DIR, '*.py')) + glob.glob(
    osp.join(CONFIG_DIR, 'demo', '**', '[!_]*.py'), recursive=True))
EXPECTED_BACKBONE = {'prm': 'PRMResNet', 'se': 'SEResNet', 'gc': 'GCResNet',
                     'ge': 'GEResNet', 'sge': 'SGEResNet',
                     'cbam': 'CBAMResNet', 'bam': 'BAMResNet',
                     'sk': 'SKResNet', 'nl': 'NLResNet', 'lr': 'LRResNet'}
NEW_R50 = ('ge_r50', 'sge_r50', 'cbam_r50', 'bam_r50', 'sk_r50', 'nl_r50',
           'lr_r50')


def expected_backbone(path):
    parts = osp.basename(path)[:-3].split('_')
    if 'mobilenetv2' in parts:
        return 'PRMMobileNetV2'
    for key, backbone in EXPECTED_BACKBONE.items():
        if key in parts:
            return backbone
    # the plain configs: prm_det's AttentionResNet without attention (mmdet's
    # ResNet with the checked init_cfg); the demo's plain one is mmdet's
    return 'ResNet' if 'demo' in path else 'AttentionResNet'


def build_detector(path, **cfg_options):
    cfg = load_config(path, cfg_options)
    cfg.model.backbone.init_cfg = None  # no ImageNet download in tests
    return cfg, MODELS.build(cfg.model)


def test_there_are_the_configs_the_issue_lists():
    names = {osp.basename(p)[:-3] for p in CONFIGS}
    for det in ('retinanet', 'cascade_rcnn'):
        for bb in ('r50', 'se_r50', 'gc_r50', 'prm_r50', 'prm_r101',
                   *NEW_R50):
            assert f'{det}_{bb}' in names


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_config_loads_builds_and_has_the_backbone_its_name_says(path):
    cfg, model = build_detector(path)
    name = osp.basename(path)
    assert cfg.custom_imports.imports == ['prm_det', 'prm_det.safe_loading']
    assert type(model.backbone).__name__ == expected_backbone(path)
    if name.startswith('ssdlite'):  # mmdet's SSDLite, trained from scratch
        assert type(model).__name__ == 'SingleStageDetector'
        src = load_config(path).model.backbone.init_cfg
        assert src.type == 'TruncNormal'
        return
    depth = 101 if 'r101' in name else 18 if 'r18' in name else 50
    assert model.backbone.depth == depth
    kind = 'CascadeRCNN' if name.startswith('cascade') else 'RetinaNet'
    assert type(model).__name__ == kind
    if 'r18' not in name and expected_backbone(path) == 'LRResNet':
        # no ResNet weights fit LR-Net: its own ImageNet classifier's,
        # every tensor (configs/pretrain/lr_resnet50_8xb32_in1k.py)
        src = load_config(path).model.backbone.init_cfg
        assert src.type == 'Pretrained'
        assert src.checkpoint == (f'work_dirs/lr_resnet{depth}_8xb32_in1k/'
                                  f'epoch_100.pth')
        assert not src.get('allow_partial', False)
    elif 'r18' not in name:
        # the real configs start from ImageNet weights, as mmdet's do; the
        # attention alone may be missing from them
        src = load_config(path).model.backbone.init_cfg
        assert src.type == 'Pretrained'
        assert src.checkpoint == f'torchvision://resnet{depth}'
        assert src.get('allow_partial', False) == (
            'attention' if expected_backbone(path) != 'AttentionResNet'
            else False)


def test_demo_shapes_configs_differ_only_in_the_backbone():
    """configs/demo/*_shapes.py is the backbone comparison of
    tools/analysis_tools/compare_backbones.py: the PRM demo and the same
    detector, recipe and schedule with mmdet's ResNet, the eight other
    attentions and LR-Net's local relation layers."""
    paths = sorted(glob.glob(osp.join(CONFIG_DIR, 'demo', '*_shapes.py')))
    assert [osp.basename(p) for p in paths] == [
        f'retinanet_{a}r18_shapes.py' for a in (
            'bam_', 'cbam_', 'gc_', 'ge_', 'lr_', 'nl_', 'prm_', '', 'se_',
            'sge_', 'sk_')]
    prm = load_config(osp.join(CONFIG_DIR, 'demo',
                               'retinanet_prm_r18_shapes.py'))
    for path in paths:
        _, model = build_detector(path)  # building changes its config
        assert type(model.backbone).__name__ == expected_backbone(path)
        cfg = load_config(path)
        backbone = cfg.model.backbone
        # everything but the type and the attention is the PRM demo's
        for key, value in prm.model.backbone.items():
            if key not in ('type', 'attention', 'sk'):
                assert backbone[key] == value, (path, key)
        if backbone.type == 'ResNet':
            assert 'attention' not in backbone
        for key in ('neck', 'bbox_head', 'train_cfg', 'test_cfg'):
            assert cfg.model[key] == prm.model[key], (path, key)
        for key in ('train_dataloader', 'val_dataloader', 'test_dataloader',
                    'train_cfg', 'param_scheduler', 'optim_wrapper',
                    'default_hooks', 'randomness', 'auto_scale_lr'):
            assert cfg[key] == prm[key], (path, key)


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# PRM paper, Table 4 (M): trainable parameters, 80 classes, frozen_stages=1;
# PRM's own parameters counted (the paper's counter misses them, see spec).
@pytest.mark.parametrize('config,millions', [
    ('retinanet_r50', 37.74), ('retinanet_se_r50', 40.25),
    ('retinanet_prm_r50', 37.75), ('cascade_rcnn_r50', 69.17),
    ('cascade_rcnn_gc_r50', 71.69), ('cascade_rcnn_prm_r50', 69.17),
])
def test_trainable_parameters_match_paper_table4(config, millions):
    _, model = build_detector(osp.join(CONFIG_DIR, config + '.py'))
    assert round(trainable(model) / 1e6, 2) == millions


# The README's rows for the other attentions (no paper prints them): the
# trainable parameters, exactly, with the first stage frozen; the attention
# after stage 1 (BAM's bam1) and in it (CBAM, SGE, SK) frozen with it.
@pytest.mark.parametrize('config,count', [
    ('retinanet_ge_r50', 37_743_348), ('retinanet_sge_r50', 37_745_012),
    ('retinanet_cbam_r50', 40_250_248), ('retinanet_bam_r50', 38_084_054),
    ('retinanet_sk_r50', 38_334_644), ('retinanet_nl_r50', 39_843_060),
    ('cascade_rcnn_ge_r50', 69_169_422), ('cascade_rcnn_sge_r50', 69_171_086),
    ('cascade_rcnn_cbam_r50', 71_676_322),
    ('cascade_rcnn_bam_r50', 69_510_128), ('cascade_rcnn_sk_r50', 69_760_718),
    ('cascade_rcnn_nl_r50', 71_269_134),
    # LR-ResNet-50's stem (1x1 conv and local relation) and stage 1 frozen
    ('retinanet_lr_r50', 35_586_456), ('cascade_rcnn_lr_r50', 67_012_530),
])
def test_trainable_parameters_of_the_other_attentions(config, count):
    _, model = build_detector(osp.join(CONFIG_DIR, config + '.py'))
    assert trainable(model) == count


def test_prm_adds_259_parameters_per_trainable_block():
    _, plain = build_detector(osp.join(CONFIG_DIR, 'retinanet_r50.py'))
    _, prm = build_detector(osp.join(CONFIG_DIR, 'retinanet_prm_r50.py'))
    assert trainable(prm) - trainable(plain) == 259 * 13  # stages 2-4


def test_detector_with_prm_backbone_gives_finite_losses():
    from mmdet.testing import demo_mm_inputs
    _, model = build_detector(osp.join(CONFIG_DIR, 'retinanet_prm_r50.py'))
    packed = demo_mm_inputs(2, [[3, 96, 96], [3, 64, 96]], num_items=[2, 1])
    data = model.data_preprocessor(packed, True)
    losses = model(**data, mode='loss')
    total = sum(sum(v) if isinstance(v, list) else v for v in losses.values())
    assert torch.isfinite(total)


@pytest.mark.parametrize('path', CONFIGS, ids=osp.basename)
def test_config_writes_kill_safe_checkpoints_and_times_out_a_stalled_rank(
        path):
    cfg = load_config(path)
    hook = cfg.default_hooks.checkpoint
    assert hook.type == 'AtomicCheckpointHook'
    assert cfg.env_cfg.dist_cfg.timeout == 300  # seconds; gloo waits 1800
    assert cfg.env_cfg.dist_cfg.backend == 'nccl'  # mmdet's, kept
    # the other CheckpointHook settings still come from mmdet's config
    assert hook.interval == 1
    assert HOOKS.build(dict(hook)).__class__.__name__ == hook.type


@pytest.mark.parametrize('backbone', sorted(set(EXPECTED_BACKBONE.values())))
def test_one_line_swaps_each_backbone_into_an_mmdet_zoo_config(
        backbone, tmp_path):
    """A user's pipeline: a config over mmdet's own Mask R-CNN that imports
    prm_det and changes the backbone's ``type`` (and, here, downloads no
    ImageNet weights) trains a step with finite losses."""
    from mmdet.testing import demo_mm_inputs
    path = tmp_path / 'my_mask_rcnn.py'
    path.write_text(
        "_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'\n"
        "custom_imports = dict(imports=['prm_det'])\n"
        f"model = dict(backbone=dict(type='{backbone}', init_cfg=None))\n")
    model = MODELS.build(load_config(str(path)).model)
    assert type(model.backbone).__name__ == backbone
    packed = demo_mm_inputs(2, [[3, 64, 96], [3, 96, 64]], num_items=[2, 1],
                            with_mask=True)
    data = model.data_preprocessor(packed, True)
    losses = model(**data, mode='loss')
    total = sum(sum(v) if isinstance(v, list) else v for v in losses.values())
    assert torch.isfinite(total)


@pytest.mark.parametrize('name', ['retinanet_se_r50', 'retinanet_ge_r50',
                                  'retinanet_gc_r50', 'retinanet_sge_r50',
                                  'retinanet_cbam_r50',
                                  'cascade_rcnn_cbam_r50'])
def test_detection_configs_run_the_fused_gate_tail_by_default(
        name, monkeypatch):
    """The configs' attention ResNets run every attention block's tail on
    the gate tail op (prm_det::gate_tail), with no option to set: frozen
    stage 1 included."""
    from prm_det.models.layers.fused_tail import FusedGateTail
    from prm_det.ops import gate_tail
    calls = []
    op = gate_tail._tail_impl  # what eager mode calls

    def counting(*args):
        calls.append(args[-1])  # the backend
        return op(*args)

    monkeypatch.setattr(gate_tail, '_tail_impl', counting)
    _, model = build_detector(osp.join(CONFIG_DIR, f'{name}.py'))
    backbone = model.backbone
    backbone.train()  # (mmdet's ResNet.train() returns None)
    attention_blocks = sum(isinstance(m, FusedGateTail)
                           for m in backbone.modules())
    backbone(torch.randn(2, 3, 64, 64))
    assert attention_blocks >= 12
    assert calls == ['cpu'] * attention_blocks
