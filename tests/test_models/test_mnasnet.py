"""PRM-MnasNet: prm_det's MnasNet (torchvision's mnasnet1_0, MnasNet-B1,
written from the architecture's facts) and PRM at the end of each of its 16
inverted residual blocks, built from mmdet's and MMPretrain's registries."""
import pytest
import torch
from mmdet.registry import MODELS

from prm_det.models.backbones.attention_mobilenet_v2 import prm_heads
from prm_det.models.backbones.mnasnet import BN_MOMENTUM
from prm_det.models.layers import PRM

# (channels, stride) of out_indices 0 to 7: layer1 ... layer7, conv2
OUTPUTS = [(16, 2), (24, 4), (40, 8), (80, 16), (96, 16), (192, 32),
           (320, 32), (1280, 32)]
# widths of the 16 inverted residual blocks, layer2 to layer7
BLOCK_WIDTHS = [24] * 3 + [40] * 3 + [80] * 3 + [96] * 2 + [192] * 4 + [320]
TORCHVISION_PARAMETERS = 4_383_312  # mnasnet1_0, 1000 classes (its docs)


def build(type_='PRMMnasNet', **kwargs):
    return MODELS.build(dict(type=type_, init_cfg=None, **kwargs))


def blocks_of(model):
    return [block for name in model.layers[1:-1]
            for block in getattr(model, name)]


def tensors(module):
    """State-dict tensors in order, without BatchNorm's batch counters
    (torchvision keeps them too, but they are not weights)."""
    return [(k, v) for k, v in module.state_dict().items()
            if not k.endswith('num_batches_tracked')]


def test_mnasnet_is_torchvisions_mnasnet1_0():
    """Same layers in the same order (every tensor's shape), the same
    parameter count with a 1280 -> 1000 classifier (torchvision's published
    4,383,312), the same BatchNorm settings, and with torchvision's tensors
    copied in, the same features."""
    models = pytest.importorskip('torchvision.models')
    torch.manual_seed(0)
    theirs = models.mnasnet1_0(weights=None).eval()
    ours = build('MnasNet', out_indices=(7, )).eval()
    classifier = torch.nn.Linear(ours.out_channel, 1000)
    count = sum(p.numel() for m in (ours, classifier)
                for p in m.parameters())
    assert count == TORCHVISION_PARAMETERS
    assert count == sum(p.numel() for p in theirs.parameters())
    mine, tv = tensors(ours), tensors(theirs.layers)
    assert [v.shape for _, v in mine] == [v.shape for _, v in tv]
    norms = [m for m in ours.modules()
             if isinstance(m, torch.nn.BatchNorm2d)]
    tv_norms = [m for m in theirs.modules()
                if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == len(tv_norms) == 52
    for a, b in zip(norms, tv_norms):
        assert (a.momentum, a.eps) == pytest.approx((b.momentum, b.eps))
    assert BN_MOMENTUM == pytest.approx(1 - 0.9997)
    # torchvision's random weights and some running statistics, by order
    with torch.no_grad():
        for m in tv_norms:
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
        ours.load_state_dict({k: v_tv for (k, _), (_, v_tv) in
                              zip(mine, tv)}, strict=False)
        x = torch.randn(2, 3, 96, 96)
        torch.testing.assert_close(ours(x)[0], theirs.layers(x))


def test_outputs_per_index_have_mnasnets_widths_and_strides():
    model = build(out_indices=tuple(range(8))).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [
        (1, c, 64 // s, 96 // s) for c, s in OUTPUTS]
    detector_outputs = build(out_indices=(2, 4, 7)).eval()(
        torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in detector_outputs] == [40, 96, 1280]


def test_every_inverted_residual_ends_with_a_prm_sized_to_its_width():
    model = build()
    blocks = blocks_of(model)
    assert len(blocks) == 16  # MnasNet's inverted residual blocks
    for block, width in zip(blocks, BLOCK_WIDTHS):
        assert block.linear_conv.conv.out_channels == width
        assert isinstance(block.attention, PRM)
        assert block.attention.groups == prm_heads(width)
        assert width % block.attention.groups == 0
    assert [prm_heads(c) for c in (24, 40, 80, 96, 192, 320)] == [
        6, 10, 20, 24, 48, 64]
    # the separable conv is not an inverted residual: no attention
    assert isinstance(model.layer1[0].attention, torch.nn.Identity)
    assert not model.layer1[0].with_expand_conv


def test_prm_sits_after_the_projection_before_the_shortcut():
    """A block whose PRM gates everything to 0 returns its input (the
    shortcut alone) where it has a shortcut, and zeros where it has none:
    PRM is the last op of the branch, after the projection's norm."""
    model = build().eval()
    shortcut, strided = model.layer3[1], model.layer3[0]  # 40 -> 40; s 2
    assert shortcut.with_res_shortcut and not strided.with_res_shortcut
    assert shortcut.depthwise_conv.conv.kernel_size == (5, 5)
    with torch.no_grad():
        for block in (shortcut, strided):
            block.attention.weight.zero_()
            block.attention.bias.fill_(-1e4)  # gate = sigmoid(-1e4) = 0
        x = torch.randn(2, 40, 8, 8)
        torch.testing.assert_close(shortcut(x), x)
        y = strided(torch.randn(2, 24, 8, 8))
        assert y.shape == (2, 40, 4, 4)
        assert y.abs().max() < 1e-30  # the gate: denormals at most


def test_attention_mnasnet_without_attention_is_mnasnet():
    torch.manual_seed(0)
    ours = build('AttentionMnasNet', out_indices=(0, 3, 7))
    plain = build('MnasNet', out_indices=(0, 3, 7))
    assert ours.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(ours.eval()(x), plain.eval()(x)):
        torch.testing.assert_close(a, b)


def test_prm_adds_4g_plus_3_parameters_a_block():
    added = sum(4 * prm_heads(w) + 3 for w in BLOCK_WIDTHS)
    assert added == 1696
    count = [sum(p.numel() for p in build(t).parameters())
             for t in ('MnasNet', 'PRMMnasNet')]
    assert count[1] - count[0] == added


def test_se_and_gc_mnasnets_by_argument():
    se = build('AttentionMnasNet', attention='se')
    gc = build('AttentionMnasNet', attention='gc')
    for model in (se, gc):
        assert all(type(b.attention).__name__ != 'Identity'
                   for b in blocks_of(model))
        model.eval()(torch.randn(1, 3, 32, 32))


def test_prm_mnasnet_builds_from_mmpretrains_registry():
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS as PRETRAIN_MODELS
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = PRETRAIN_MODELS.build(dict(type='mmdet.PRMMnasNet',
                                           out_indices=(7, )))
    assert type(model).__name__ == 'PRMMnasNet'
    assert type(model).__module__.startswith('prm_det.')
    out = model.eval()(torch.randn(1, 3, 32, 32))
    assert [tuple(o.shape) for o in out] == [(1, 1280, 1, 1)]


def test_frozen_stages_freeze_the_stem_and_the_first_layers():
    model = build(frozen_stages=2)
    model.train()
    for name in ('conv1', 'layer1', 'layer2'):
        module = getattr(model, name)
        assert not any(p.requires_grad for p in module.parameters())
        assert not any(m.training for m in module.modules())
    assert all(p.requires_grad for p in model.layer3.parameters())
    assert model.layer3.training
    # PRM's parameters freeze with their stage
    assert not model.layer2[0].attention.weight.requires_grad


def test_norm_eval_keeps_every_norm_in_eval_mode():
    model = build(norm_eval=True).train()
    norms = [m for m in model.modules()
             if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert model.layer2.training  # the rest trains


def test_bad_indices_are_refused():
    with pytest.raises(ValueError, match='out_indices'):
        build(out_indices=(8, ))
    with pytest.raises(ValueError, match='frozen_stages'):
        build(frozen_stages=8)


def test_with_cp_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    plain = build(out_indices=(1, 7))
    checkpointed = build(out_indices=(1, 7), with_cp=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    results = []
    for model in (plain, checkpointed):
        model.train()
        inputs = x.clone().requires_grad_()
        sum(o.square().mean() for o in model(inputs)).backward()
        results.append((inputs.grad, {n: p.grad for n, p in
                                      model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name])
    for block in blocks_of(checkpointed):  # every PRM learns
        assert block.attention.weight.grad.abs().sum() > 0


def test_imagenet_mnasnet_weights_start_prm_mnasnet_with_prm_fresh(tmp_path):
    """The checked ``init_cfg`` load, as for PRM-MobileNetV2: a plain
    MnasNet classifier's weights fill every tensor but PRM's with
    ``allow_partial='attention'`` and stop the build without it."""
    from prm_det.models.backbones.pretrained import PretrainedLoadIncomplete
    plain = build('MnasNet')
    path = tmp_path / 'mnasnet.pth'
    torch.save({'state_dict': {f'backbone.{k}': v for k, v in
                               plain.state_dict().items()}}, path)
    init = dict(type='Pretrained', checkpoint=str(path))
    prm = MODELS.build(dict(type='PRMMnasNet', init_cfg=dict(
        init, allow_partial='attention')))
    prm.init_weights()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(prm.state_dict()[name], value)
    assert len(prm.attention_tensor_names()) == 16 * 6  # six a PRM
    strict = MODELS.build(dict(type='PRMMnasNet', init_cfg=init))
    with pytest.raises(PretrainedLoadIncomplete, match=r'\.attention\.'):
        strict.init_weights()
