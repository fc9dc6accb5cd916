"""GE, SGE, CBAM, BAM, SK, non-local and LR-Net's local relation layers
where the official code fails (or, LR-Net, where there is none):
1x1 maps, batch 1, maps that are not square, float16/bfloat16 autocast,
options that cannot work; and the hooks users put on them."""
import pytest
import torch
from helpers import tiny_backbone
from mmdet.registry import MODELS

from prm_det.models.layers import BAM, CBAM, SGE, GateBatchNorm1d

NEW = ['GEResNet', 'SGEResNet', 'CBAMResNet', 'SKResNet', 'BAMResNet',
       'NLResNet', 'LRResNet']


def finite_step(model, x):
    """One training forward and backward: every output and gradient
    finite (the NaN rule: none anywhere)."""
    x = x.clone().requires_grad_()
    outs = model(x)
    for o in outs:
        assert torch.isfinite(o).all()
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    assert torch.isfinite(x.grad).all()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    return outs


@pytest.mark.parametrize('type_', NEW)
@pytest.mark.parametrize('shape,norm_eval', [
    ((1, 3, 32, 32), True), ((1, 3, 64, 64), False), ((2, 3, 32, 32), False),
    ((2, 3, 20, 52), False)], ids=[
        'batch 1, c5 1x1, frozen norms (the detectors)',
        'batch 1, c5 2x2, norms training (gate norms see one value)',
        'batch 2, c5 1x1, norms training', 'batch 2, not square'])
def test_training_is_finite_on_one_pixel_maps_batch_one_and_any_shape(
        type_, shape, norm_eval):
    """(A plain ResNet cannot train its own BatchNorms on one 1x1 c5 map:
    that case runs with the detectors' frozen norms.)"""
    torch.manual_seed(0)
    model = tiny_backbone(type_, 50, norm_eval=norm_eval, frozen_stages=-1)
    model.init_weights()
    _move_away_from_init(model)
    model.train()
    outs = finite_step(model, torch.randn(*shape))
    h, w = shape[2:]
    assert [tuple(o.shape[2:]) for o in outs] == [
        (-(-h // 2**(i + 2)), -(-w // 2**(i + 2))) for i in range(4)]


def _move_away_from_init(model):
    """Fresh SGE and CBAM have constant gates; make every term matter."""
    with torch.no_grad():
        for name in model.attention_tensor_names():
            tensor = model.state_dict()[name]
            if tensor.is_floating_point() and 'running' not in name:
                tensor.add_(torch.randn_like(tensor) * 0.3)


@pytest.mark.parametrize('type_', NEW)
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_is_finite_and_close_to_float32(type_, dtype):
    torch.manual_seed(0)
    model = tiny_backbone(type_, 50)
    model.init_weights()
    _move_away_from_init(model)
    model.eval()
    x = torch.randn(2, 3, 64, 48) * 3
    with torch.no_grad():
        reference = model(x)
        with torch.autocast('cpu', dtype=dtype):
            outs = model(x)
    for out, ref in zip(outs, reference):
        assert torch.isfinite(out).all()
        rel = (out.float() - ref).norm() / ref.norm()
        assert rel < 5e-2, rel


def test_sge_on_one_position_gates_at_sigmoid_bias_where_official_is_nan():
    sge = SGE(32, groups=8)
    with torch.no_grad():
        sge.weight.normal_()
        sge.bias.normal_()
    x = torch.randn(2, 32, 1, 1, requires_grad=True)
    y = sge(x)
    gate = torch.sigmoid(sge.bias).reshape(1, 8, 1, 1, 1)
    expected = (x.reshape(2, 8, 4, 1, 1) * gate).reshape_as(x)
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_sge_statistics_do_not_overflow_in_float16():
    sge = SGE(64, groups=2)
    with torch.no_grad():
        sge.weight.fill_(1.)
    x = torch.randn(1, 64, 8, 8) * 40  # squared deviations beyond 65504
    y = sge(x.half())
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), sge(x), rtol=2e-2, atol=2e-1)


def test_bam_pools_the_whole_map_when_it_is_not_square():
    torch.manual_seed(0)
    bam = BAM(32).eval()
    x = torch.randn(2, 32, 6, 10)
    pooled = []
    bam.channel_fc1.register_forward_pre_hook(
        lambda m, args: pooled.append(args[0]))
    with torch.no_grad():
        bam(x)
    torch.testing.assert_close(pooled[0], x.mean((2, 3)))


@pytest.mark.parametrize('combine', ['multiply', 'add'])
def test_bam_combines_its_branches_as_asked(combine):
    torch.manual_seed(0)
    bam = BAM(32, combine=combine).eval()
    x = torch.randn(2, 32, 6, 6)
    seen = {}
    bam.channel_fc2.register_forward_hook(
        lambda m, a, out: seen.update(channel=out[:, :, None, None]))
    bam.spatial_out.register_forward_hook(
        lambda m, a, out: seen.update(spatial=out))
    with torch.no_grad():
        y = bam(x)
    c, s = seen['channel'], seen['spatial']
    logits = c * s if combine == 'multiply' else c + s
    torch.testing.assert_close(y, x * (1 + torch.sigmoid(logits)))


def test_a_gate_norm_on_one_value_uses_its_running_statistics():
    """The rule for BatchNorm over pooled vectors at batch 1: running
    statistics, left unchanged; two values or more: torch's BatchNorm."""
    norm = GateBatchNorm1d(4)
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2)
        norm.weight.normal_()
    before = norm.running_mean.clone()
    x = torch.randn(1, 4)
    expected = ((x - norm.running_mean) / (norm.running_var + norm.eps)
                .sqrt() * norm.weight + norm.bias)
    torch.testing.assert_close(norm.train()(x), expected)
    torch.testing.assert_close(norm.running_mean, before)
    plain = torch.nn.BatchNorm1d(4)
    plain.load_state_dict(norm.state_dict())
    x = torch.randn(3, 4)
    torch.testing.assert_close(norm(x), plain.train()(x))
    torch.testing.assert_close(norm.running_mean, plain.running_mean)


@pytest.mark.parametrize('cfg,match', [
    (dict(type='SGEResNet', depth=50, attention=dict(groups=48)),
     'in_channels=256 is not divisible by groups=48'),
    (dict(type='CBAMResNet', depth=18, base_channels=8),
     'CBAM: ratio=0.0625 leaves 0 hidden channels for in_channels=8'),
    (dict(type='CBAMResNet', depth=18, attention=dict(ratio=2)),
     'use a ratio in'),
    (dict(type='BAMResNet', depth=18, base_channels=8),
     'BAM: ratio=0.0625 leaves 0 hidden channels'),
    (dict(type='BAMResNet', depth=50,
          stage_attention=dict(cfg=dict(type='BAM', combine='max'))),
     "combine must be one of \\('multiply', 'add'\\)"),
    (dict(type='BAMResNet', depth=50, num_stages=3, strides=(1, 2, 2),
          dilations=(1, 1, 1), out_indices=(0, 1, 2)),
     'stage_attention.stages .*num_stages=3.* needs one flag per stage'),
    (dict(type='SKResNet', depth=50, sk=dict(groups=48)),
     'SK: groups=48 does not divide in_channels=64'),
    (dict(type='SKResNet', depth=50, sk=dict(ratio=1. / 128)),
     'SK: ratio=0.0078125 leaves 0 hidden channels'),
    (dict(type='SKResNet', depth=50, sk=dict(group=4)),
     "sk takes \\['groups', 'ratio'\\]"),
    (dict(type='NLResNet', depth=50,
          stage_attention=dict(position='after_block')),
     'stage_attention.position must be one of'),
    (dict(type='LRResNet', depth=50,
          local_relation=dict(channels_per_group=48)),
     r"channels_per_group=48 must divide the stem's stem_channels=64; "
     r'pick one of \[1, 2, 4, 8, 16, 32, 64\]'),
    (dict(type='LRResNet', depth=18, base_channels=36, stem_channels=64),
     r'channels_per_group=8 must divide base_channels=36; pick one of '
     r'\[1, 2, 3, 4, 6, 9, 12, 18, 36\]'),
    (dict(type='LRResNet', depth=50, local_relation=dict(kernel_size=6)),
     'local_relation.kernel_size must be a positive odd int .* got 6'),
    (dict(type='LRResNet', depth=50,
          local_relation=dict(similarity='cosine')),
     'local_relation.similarity must be one of'),
    (dict(type='LRResNet', depth=50, local_relation=dict(groups=8)),
     r'local_relation takes \[.*channels_per_group.*\], got \[.groups.\]'),
    (dict(type='LRResNet', depth=50, width_multiplier=0),
     'width_multiplier must be a positive number'),
    (dict(type='LRResNet', depth=50, dilations=(1, 1, 2, 2)),
     'no dilation; dilations must all be 1'),
    (dict(type='LRResNet', depth=50, deep_stem=True),
     'choose one .lr_stem=False for the deep stem.'),
    (dict(type='LRResNet', depth=50,
          dcn=dict(type='DCN', deform_groups=1),
          stage_with_dcn=(False, True, True, True)),
     'dcn has no 3x3 conv to deform'),
])
def test_options_that_cannot_work_stop_the_build_naming_them(cfg, match):
    with pytest.raises(ValueError, match=match):
        MODELS.build(cfg)


@pytest.mark.parametrize('type_,abbr', [('GEResNet', 'ge'),
                                        ('SGEResNet', 'sge'),
                                        ('CBAMResNet', 'cbam'),
                                        ('SKResNet', 'sk')])
def test_a_hook_on_the_attention_fires_and_sees_its_output(type_, abbr):
    model = tiny_backbone(type_, 50)
    model.eval()
    block = model.layer2[1]
    module = getattr(block, abbr)
    seen = []
    module.register_forward_hook(lambda m, args, out: seen.append(out))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert len(seen) == 1 and seen[0].shape[1] in (32, 128)


@pytest.mark.parametrize('train', [False, True])
def test_frozen_stages_freeze_the_stage_attention_after_them(train):
    """Frozen when built (what a parameter count sees) and in training."""
    model = tiny_backbone('BAMResNet', 50, frozen_stages=1, norm_eval=False)
    if train:
        model.train()
    assert not any(p.requires_grad for p in model.bam1.parameters())
    assert not model.bam1.training
    assert all(p.requires_grad for p in model.bam2.parameters())
    assert model.bam2.training


def test_fresh_cbam_is_the_official_initialization_inside_a_backbone():
    """The backbone's own init (every BatchNorm weight 1) runs first; CBAM
    then takes the official values: spatial norm weight 0, biases 0."""
    model = tiny_backbone('CBAMResNet', 50)
    model.init_weights()
    for name, module in model.named_modules():
        if isinstance(module, CBAM):
            assert (module.spatial_norm.weight == 0).all(), name
            assert (module.channel_fc1.bias == 0).all(), name
    nl = tiny_backbone('NLResNet', 50)
    nl.init_weights()
    assert (nl.nonlocal_block3.conv_out.conv.weight == 0).all()
