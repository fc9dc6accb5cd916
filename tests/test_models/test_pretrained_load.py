"""A backbone's ``init_cfg`` checkpoint loads completely, or training stops.

Each test saves a checkpoint in one of the layouts users bring (an
MMPretrain classifier, the official PRM code's DataParallel file, a bare
ResNet state dict), builds a backbone from mmdet's registry with
``init_cfg=dict(type='Pretrained', ...)`` and calls ``init_weights()``, as
mmengine's Runner does before the first iteration.
"""
import glob
import os.path as osp

import pytest
import torch
from mmdet.registry import MODELS

from prm_det.models.backbones.pretrained import (PretrainedLoadIncomplete,
                                                 compare_state_dicts)

TINY = dict(depth=18, base_channels=8, attention=dict(groups=4))


def build(init_cfg=None, **kwargs):
    cfg = dict(type='PRMResNet', **TINY, init_cfg=init_cfg)
    cfg.update(kwargs)
    return MODELS.build(cfg)


def trained(**kwargs):
    """A backbone whose every tensor differs from a fresh one's."""
    model = build(**kwargs)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor))
    return model


def assert_equal_weights(model, source, skip=()):
    got, want = model.state_dict(), source
    for name, tensor in got.items():
        if name in skip or name.endswith('num_batches_tracked'):
            continue
        assert torch.equal(tensor, want[name]), name


def pretrained(path, **options):
    return dict(type='Pretrained', checkpoint=str(path), **options)


def test_mmpretrain_classifier_checkpoint_loads_every_tensor(tmp_path):
    source = trained().state_dict()
    classifier = {f'backbone.{k}': v for k, v in source.items()}
    classifier['head.fc.weight'] = torch.randn(10, 64)
    path = tmp_path / 'epoch_1.pth'
    torch.save({'meta': {'epoch': 1}, 'state_dict': classifier}, path)

    model = build(pretrained(path))
    model.init_weights()
    assert_equal_weights(model, source)


def test_official_dataparallel_checkpoint_loads_with_its_head_left_out(
        tmp_path):
    source = trained().state_dict()
    official = {f'module.{k}': v for k, v in source.items()}
    official['module.fc.weight'] = torch.randn(1000, 64)
    official['module.fc.bias'] = torch.randn(1000)
    path = tmp_path / 'prm_resnet18.pth.tar'
    torch.save({'epoch': 100, 'state_dict': official}, path)

    model = build(pretrained(path))
    model.init_weights()
    assert_equal_weights(model, source)


def test_wrong_prefix_stops_naming_the_count_and_the_fix(tmp_path):
    source = trained().state_dict()
    path = tmp_path / 'classifier.pth'
    torch.save({'state_dict': {f'backbone.{k}': v
                               for k, v in source.items()}}, path)
    model = build(pretrained(path, prefix='neck.'))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PretrainedLoadIncomplete) as error:
        model.init_weights()
    message = str(error.value)
    total = sum(not k.endswith('num_batches_tracked') for k in source)
    assert f'fills 0 of the backbone\'s {total} tensors' in message
    assert "prefix='neck.'" in message
    assert 'missing' in message and 'conv1.weight, bn1.weight' in message
    assert "prefix='backbone.'" in message  # the fix
    assert 'backbone.' in message.split('keys start with')[1]
    # nothing was changed
    assert all(torch.equal(v, before[k])
               for k, v in model.state_dict().items())


def test_resnet_weights_into_an_attention_resnet_need_allow_partial(tmp_path):
    plain = MODELS.build(dict(type='ResNet', depth=18, base_channels=8))
    source = plain.state_dict()
    path = tmp_path / 'resnet18.pth'
    torch.save(dict(source, **{'fc.weight': torch.randn(1000, 64)}), path)

    with pytest.raises(PretrainedLoadIncomplete, match=r'\.prm\.theta'):
        build(pretrained(path)).init_weights()

    model = build(pretrained(path, allow_partial='attention'))
    fresh_theta = model.layer1[0].prm.theta.clone()
    model.init_weights()
    assert_equal_weights(model, source, skip=model.attention_tensor_names())
    # the attention keeps its initialization (theta is random at build)
    assert torch.equal(model.layer1[0].prm.theta, fresh_theta)


def test_allow_partial_attention_still_refuses_another_attention(tmp_path):
    se = MODELS.build(dict(type='SEResNet', depth=18, base_channels=16))
    path = tmp_path / 'se_resnet18.pth'
    torch.save(se.state_dict(), path)
    model = build(pretrained(path, allow_partial='attention'),
                  base_channels=16)
    with pytest.raises(PretrainedLoadIncomplete) as error:
        model.init_weights()
    assert 'not in the backbone' in str(error.value)
    assert '.se.' in str(error.value)
    assert 'another architecture' in str(error.value)


def test_another_depth_stops(tmp_path):
    deeper = trained(depth=34).state_dict()
    path = tmp_path / 'prm_resnet34.pth'
    torch.save(deeper, path)
    with pytest.raises(PretrainedLoadIncomplete,
                       match=r'not in the backbone \(\d+\): layer1\.2\.'):
        build(pretrained(path)).init_weights()


def test_allow_partial_true_loads_what_matches(tmp_path):
    source = trained().state_dict()
    partial = {k: v for k, v in source.items() if not k.startswith('layer4')}
    path = tmp_path / 'partial.pth'
    torch.save(partial, path)
    model = build(pretrained(path, allow_partial=True))
    model.init_weights()
    assert torch.equal(model.layer1[0].conv1.weight,
                       source['layer1.0.conv1.weight'])
    assert not torch.equal(model.layer4[0].conv1.weight,
                           source['layer4.0.conv1.weight'])


def test_bad_allow_partial_value_is_refused(tmp_path):
    path = tmp_path / 'w.pth'
    torch.save(trained().state_dict(), path)
    with pytest.raises(ValueError, match='allow_partial must be one of'):
        build(pretrained(path, allow_partial='yes')).init_weights()


def test_other_init_cfgs_still_run_before_the_load(tmp_path):
    source = trained().state_dict()
    path = tmp_path / 'w.pth'
    torch.save(source, path)
    model = build([dict(type='Constant', val=0.5, layer='Conv2d'),
                   pretrained(path)])
    model.init_weights()
    assert_equal_weights(model, source)


def test_compare_counts_missing_mismatched_unexpected():
    expected = {'a': torch.Size([2]), 'b': torch.Size([3]),
                'bn.num_batches_tracked': torch.Size([]),
                'att': torch.Size([1])}
    given = {'a': torch.zeros(2), 'b': torch.zeros(4), 'x': torch.zeros(1)}
    report = compare_state_dicts(expected, given, optional=['att'])
    assert report.loaded == ['a']
    assert report.mismatched == ['b']
    assert report.unexpected == ['x']
    assert report.missing == []  # num_batches_tracked and att are allowed
    assert report.optional_missing == ['att']
    assert not report.complete


DETECTION_CONFIGS = sorted(
    osp.basename(path) for path in glob.glob(
        osp.join(osp.dirname(osp.dirname(osp.dirname(
            osp.abspath(__file__)))), 'configs', '*.py')))
LAYOUTS = {
    # MMPretrain's classifier checkpoint
    'classifier': lambda state: {'meta': {}, 'state_dict': {
        **{f'backbone.{k}': v for k, v in state.items()},
        'head.fc.weight': torch.zeros(10, 8)}},
    # the official PRM code's DataParallel checkpoint, with its head
    'official': lambda state: {'epoch': 90, 'state_dict': {
        **{f'module.{k}': v for k, v in state.items()},
        'module.fc.weight': torch.zeros(1000, 8)}},
    'state_dict': lambda state: dict(state),
}


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
@pytest.mark.parametrize('config', [
    name if name == 'retinanet_prm_r50.py' else
    pytest.param(name, marks=pytest.mark.slow)
    for name in DETECTION_CONFIGS])
def test_every_detection_config_loads_each_layout_with_one_override(
        config, layout, tmp_path):
    """``--cfg-options model.backbone.init_cfg.checkpoint=FILE`` alone (SSDLite,
    from scratch: the three keys its comment gives): every tensor of the
    config's backbone loaded from the file."""
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(osp.dirname(osp.dirname(osp.dirname(
        osp.abspath(__file__)))), 'configs', config))
    override = {'model.backbone.init_cfg.checkpoint':
                str(tmp_path / 'weights.pth')}
    if cfg.model.backbone.init_cfg['type'] != 'Pretrained':
        assert config.startswith('ssdlite')  # the one from scratch
        override.update({'model.backbone.init_cfg._delete_': True,
                         'model.backbone.init_cfg.type': 'Pretrained'})
    cfg.merge_from_dict(override)
    source = MODELS.build(dict(cfg.model.backbone, init_cfg=None))
    with torch.no_grad():
        for tensor in source.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor))
    state = source.state_dict()
    torch.save(LAYOUTS[layout](state), tmp_path / 'weights.pth')
    model = MODELS.build(cfg.model.backbone)
    model.init_weights()
    assert_equal_weights(model, state)


def test_leftover_initializer_settings_are_named_with_the_fix(tmp_path):
    path = tmp_path / 'w.pth'
    torch.save(trained().state_dict(), path)
    model = build(dict(type='Pretrained', checkpoint=str(path),
                       layer='Conv2d', std=0.03))
    with pytest.raises(ValueError, match=r'also has layer, std.*'
                       r'init_cfg\._delete_=True'):
        model.init_weights()


@pytest.mark.parametrize('type_', ['GEResNet', 'SGEResNet', 'CBAMResNet',
                                   'BAMResNet', 'SKResNet', 'NLResNet'])
def test_resnet_weights_start_the_other_attentions_with_only_them_fresh(
        type_, tmp_path):
    """ImageNet ResNet weights (a plain ResNet-50's tensors) fill every
    tensor but the attention's; the attention keeps its own (official)
    initialization, and without ``allow_partial`` the load stops naming it
    (GE has no tensors: its load is complete as it is)."""
    narrow = dict(depth=50, base_channels=16, attention=None)
    if type_ == 'SGEResNet':
        narrow['attention'] = dict(type='SGE', groups=4)
    if type_ == 'SKResNet':
        narrow['sk'] = dict(groups=4)
    plain = MODELS.build(dict(type='ResNet', depth=50, base_channels=16))
    with torch.no_grad():
        for tensor in plain.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor))
    source = plain.state_dict()
    path = tmp_path / 'resnet50.pth'
    torch.save(dict(source, **{'fc.weight': torch.randn(1000, 512)}), path)
    cfg = dict(narrow, type=type_, init_cfg=pretrained(path))
    if type_ == 'GEResNet':
        model = MODELS.build(cfg)
        model.init_weights()
        assert_equal_weights(model, source)
        return
    with pytest.raises(PretrainedLoadIncomplete, match='allow_partial'):
        MODELS.build(cfg).init_weights()
    model = MODELS.build(
        dict(cfg, init_cfg=pretrained(path, allow_partial='attention')))
    model.init_weights()
    attention = model.attention_tensor_names()
    assert attention
    assert set(model.state_dict()) - set(attention) == set(source)
    assert_equal_weights(model, source, skip=attention)
    # the tensors the initialization sets to values (zeros, ones: those
    # equal in two fresh builds under other seeds) have them
    fresh = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        built = MODELS.build(dict(cfg, init_cfg=None))
        built.init_weights()  # the backbone's own init, then the modules'
        fresh.append(built.state_dict())
    state = model.state_dict()
    fixed = [name for name in attention
             if torch.equal(fresh[0][name], fresh[1][name])]
    assert fixed
    for name in fixed:
        assert torch.equal(state[name], fresh[0][name]), name
