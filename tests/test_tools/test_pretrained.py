"""Starting from ImageNet weights without torchvision, and saying what to do
when they cannot be fetched."""
import urllib.error

import pytest
import torch
from mmdet.registry import MODELS
from mmengine.runner.checkpoint import CheckpointLoader

import prm_det.engine.checkpoints.remote as ckpt_module
from prm_det.engine import PretrainedWeightsUnavailable


def test_torchvision_scheme_resolves_urls_without_torchvision(monkeypatch):
    seen = {}

    def fake_http(url, map_location=None):
        seen['url'] = url
        return {'conv1.weight': torch.zeros(1)}

    monkeypatch.setattr(ckpt_module, 'load_from_http', fake_http)
    out = CheckpointLoader.load_checkpoint('torchvision://resnet50')
    assert seen['url'].endswith('/resnet50-0676ba61.pth')
    assert set(out) == {'conv1.weight'}


def test_offline_error_says_how_to_use_a_local_checkpoint(monkeypatch):

    def offline(url, map_location=None):
        raise urllib.error.URLError('Temporary failure in name resolution')

    monkeypatch.setattr(ckpt_module, 'load_from_http', offline)
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        CheckpointLoader.load_checkpoint('torchvision://resnet101')
    message = str(info.value)
    assert 'resnet101-63fe2227.pth' in message
    assert 'model.backbone.init_cfg.checkpoint=' in message
    assert 'prm_resnet50.pth.tar' in message
    with pytest.raises(PretrainedWeightsUnavailable, match='known names'):
        CheckpointLoader.load_checkpoint('torchvision://resnet51')


def test_official_prm_imagenet_checkpoint_loads_through_init_cfg(tmp_path):
    """An official-format checkpoint (DataParallel prefix, classifier,
    training state) starts a PRMResNet-50 through init_cfg, every key."""
    torch.manual_seed(0)
    source = MODELS.build(dict(type='PRMResNet', depth=50))
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    state = {'module.' + k: v for k, v in source.state_dict().items()}
    state['module.fc.weight'] = torch.zeros(1000, 2048)
    state['module.fc.bias'] = torch.zeros(1000)
    path = tmp_path / 'prm_resnet50.pth.tar'
    torch.save({'epoch': 100, 'arch': 'prm_resnet50', 'state_dict': state,
                'best_prec1': torch.tensor(77.65)}, path)
    model = MODELS.build(dict(type='PRMResNet', depth=50, init_cfg=dict(
        type='Pretrained', checkpoint=str(path))))
    model.init_weights()
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key)
