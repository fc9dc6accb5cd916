"""PRM, SE and GC as registered plugins."""
import pytest
import torch
from mmdet.models.backbones import ResNet
from mmdet.registry import MODELS

from prm_det.models.layers import PRM, build_attention


def test_prm_builds_from_registry_with_official_parameters():
    layer = MODELS.build(dict(type='PRM', in_channels=256, groups=64,
                              mode='cosine'))
    assert isinstance(layer, PRM) and PRM._abbr_ == 'prm'
    shapes = {k: tuple(v.shape) for k, v in layer.named_parameters()}
    assert shapes == dict(weight=(1, 64, 1, 1), bias=(1, 64, 1, 1),
                          one=(1, 64, 1), zero=(1, 64, 1), theta=(1, 2, 1, 1),
                          scale=(1, ))
    assert sum(p.numel() for p in layer.parameters()) == 4 * 64 + 3
    assert (layer.weight == 0).all() and (layer.bias == 1).all()
    assert (layer.one == 1).all() and (layer.zero == 0).all()
    assert ((layer.theta >= 0) & (layer.theta < 1)).all()
    assert (layer.scale == 1).all()


def test_fresh_prm_gates_everything_at_sigmoid_one():
    layer = PRM(32, groups=8)
    x = torch.randn(2, 32, 5, 6)
    torch.testing.assert_close(layer(x), x * torch.sigmoid(torch.tensor(1.)))


@pytest.mark.parametrize('name', ['cpu', 'torch'])
def test_prm_module_reproduces_golden_vectors(golden, name):
    """(The Triton kernels run the golden vectors in tests/test_ops.)"""
    from prm_det.ops import use_backend
    with use_backend(name):
        _module_golden(golden)


def _module_golden(golden):
    for case in golden['cases']:
        layer = MODELS.build(dict(type='PRM', in_channels=case['x'].shape[1],
                                  groups=case['groups'], mode=case['mode']))
        layer = layer.double()
        layer.load_state_dict(case['params'])
        x = case['x'].clone().requires_grad_()
        y = layer(x)
        (y * case['upstream']).sum().backward()
        torch.testing.assert_close(y, case['y'], rtol=1e-9, atol=0)
        torch.testing.assert_close(x.grad, case['grad_x'], rtol=1e-9,
                                   atol=1e-12)
        for name, p in layer.named_parameters():
            torch.testing.assert_close(p.grad, case['grad_params'][name],
                                       rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('cfg,match', [
    (dict(in_channels=100, groups=64), 'divisible by groups'),
    (dict(in_channels=64, groups=0), 'groups must be a positive int'),
    (dict(in_channels=64, mode='gaussian'), 'mode must be one of'),
])
def test_prm_bad_configuration_raises_value_error(cfg, match):
    with pytest.raises(ValueError, match=match):
        PRM(**cfg)


def test_se_is_squeeze_excitation_with_ratio_one_sixteenth():
    se = build_attention('se', 256)
    assert se._abbr_ == 'se'
    assert se.conv1.conv.weight.shape == (16, 256, 1, 1)
    assert se.conv1.conv.bias is not None and se.conv2.conv.bias is not None
    x = torch.randn(2, 256, 4, 4)
    gate = torch.sigmoid(se.conv2.conv(torch.relu(se.conv1.conv(
        x.mean((2, 3), keepdim=True)))))
    torch.testing.assert_close(se(x), x * gate)
    with pytest.raises(ValueError, match='ratio'):
        build_attention(dict(type='SE', ratio=2.0), 16)


def test_gc_is_mmcv_context_block_ratio_sixteen():
    from mmcv.cnn import ContextBlock
    gc = build_attention('gc', 256)
    assert isinstance(gc, ContextBlock)
    assert gc.pooling_type == 'att' and gc.channel_add_conv is not None
    assert gc.channel_mul_conv is None and gc.planes == 16
    # last layer zero-initialized: a fresh block is the identity
    x = torch.randn(1, 256, 5, 5)
    torch.testing.assert_close(gc(x), x)


def test_gc_stays_zero_initialized_inside_a_backbone():
    """The backbone's own init (Kaiming over every conv) runs first; GC's
    last conv is then zero again, so a fresh GC adds nothing (it was
    Kaiming-initialized in GCResNet before)."""
    model = MODELS.build(dict(type='GCResNet', depth=50, base_channels=16))
    model.init_weights()
    for name, module in model.named_modules():
        if name.endswith('context_block'):
            assert (module.channel_add_conv[-1].weight == 0).all(), name
            assert (module.channel_add_conv[-1].bias == 0).all(), name


def test_unknown_attention_name_raises_value_error():
    with pytest.raises(ValueError, match="one of \\['bam', 'cbam', 'gc', "
                       "'ge', 'prm', 'se', 'sge'\\]"):
        build_attention('eca', 64)


@pytest.mark.parametrize('plugin,abbr', [
    (dict(type='PRM'), 'prm'), (dict(type='SE'), 'se'),
    (dict(type='ContextBlock', ratio=1. / 16), 'context_block'),
    (dict(type='GE'), 'ge'), (dict(type='SGE'), 'sge'),
    (dict(type='CBAM'), 'cbam'), (dict(type='BAM'), 'bam')])
def test_plugins_go_into_plain_mmdet_resnet(plugin, abbr):
    model = ResNet(depth=50, plugins=[
        dict(cfg=plugin, position='after_conv3')])
    assert hasattr(model.layer1[0], abbr) and hasattr(model.layer4[2], abbr)
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [256, 512, 1024, 2048]


def test_positions_matter_for_prm_but_not_for_se():
    torch.manual_seed(0)
    prm_layer, se_layer = PRM(64, groups=8), build_attention('se', 64)
    with torch.no_grad():  # move PRM away from its init: alpha, lambda != 0
        for p in prm_layer.parameters():
            p.add_(torch.randn_like(p).abs() * 0.5)
    x = torch.randn(2, 64, 6, 7)
    perm = torch.randperm(42)

    def shuffle(t):
        return t.flatten(2)[:, :, perm].view_as(t)

    with torch.no_grad():
        torch.testing.assert_close(se_layer(shuffle(x)), shuffle(se_layer(x)))
        diff = (prm_layer(shuffle(x)) - shuffle(prm_layer(x))).abs().max()
    assert diff > 1e-3


def test_prm_plugin_goes_into_mmdet_resnext():
    from mmdet.models.backbones import ResNeXt
    model = ResNeXt(depth=50, groups=32, base_width=4, plugins=[
        dict(cfg=dict(type='PRM'), position='after_conv3')])
    assert isinstance(model.layer3[0].prm, PRM)
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [256, 512, 1024, 2048]
