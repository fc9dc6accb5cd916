"""tools/analysis_tools/get_flops.py counts PRM's, SE's, GC's and LR-Net's
local relation layers' own operations and parameters, and nothing else
changes."""
import pytest
import torch
from helpers import tool_module
from mmdet.registry import MODELS
from torch import nn

GET_FLOPS = 'analysis_tools/get_flops.py'


def prm_flops(b, c, h, w, groups, use_position=True, use_norm=True):
    """PRM's operations on a [b, c, h, w] map, step by step from its
    definition (PRM_SPEC.md section 1; dot-product similarity), counted as
    the tool counts: a multiply-add is one, every other arithmetic op one per
    result, a reduction one per element it reads."""
    n, cg, p = b * groups, c // groups, h * w  # n: (sample, group) pairs
    steps = {
        'channel sum of each group, for the query': n * cg * p,
        'argmax over positions: the query position': n * p,
        'z: mean over positions': n * cg * p,
        'phi(x_p, q) and phi(x_p, z): two dot products': 2 * n * cg * p,
        'S = alpha * phi_q * D + beta * phi_z': 3 * n * p,
        'gate = sigmoid(lambda * S + xi)': 3 * n * p,
        'y = x * gate': n * cg * p,
    }
    if use_position:
        steps.update({
            'query row and column from its flat index (//, *, -)': 3 * n,
            # per axis a of length L: |i - i_q| (2 ops), then
            # G(theta_a * d) = exp(-0.5 * (theta_a * d / sigma)^2) /
            # (sigma sqrt(2 pi)): theta*, /sigma, ^2, *-0.5, exp, * (6 ops),
            # and 1 / (sigma sqrt(2 pi)) once (2 ops)
            'row and column Gaussian tables': 8 * n * (h + w) + 2 * 2,
            'D = (G_row + G_col) / 2 at every position': 2 * n * p,
            'phi_q * D': n * p,
        })
    if use_norm:
        steps.update({
            'mean, S - mean, square, sum over positions, divide by std':
                5 * n * p,
            'std = sqrt(max(var / (P - 1), tiny)) + eps': 4 * n,
        })
    return sum(steps.values())


def se_flops(b, c, h, w):
    """mmdet's SELayer (r=16): pool, conv c -> c/16 (multiply-adds), ReLU,
    conv c/16 -> c, sigmoid, scale."""
    hidden = c // 16
    return (b * c * h * w + b * c * hidden + b * hidden + b * hidden * c +
            b * c + b * c * h * w)


def local_relation_flops(b, c, out_c, h, w, k, stride, per_group,
                         similarity):
    """A LocalRelation2d's operations on a [b, c, h, w] map, as the tool
    counts them: its 1x1 convs and prior network (multiply-adds), and for
    every output position, group and window offset (all k * k) the logit
    phi(q, k) + prior, its softmax, and per channel one multiply-add of the
    weighted sum."""
    groups, taps = c // per_group, k * k
    hidden = max(groups // 2, 1)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    out = b * ho * wo
    logit = {'squared_difference': 3,  # q - k, its square, prior - that
             'absolute_difference': 3, 'dot_product': 2}[similarity]
    steps = {
        'query 1x1 conv at the output positions': out * c * groups,
        'key 1x1 conv': b * h * w * c * groups,
        'prior network: 2 -> hidden, ReLU, hidden -> groups': (
            taps * 2 * hidden + taps * hidden + taps * hidden * groups),
        'logits': logit * out * groups * taps,
        'softmax over the window': out * groups * taps,
        'weighted sums': out * c * taps,
        'final 1x1 conv': out * c * out_c,
    }
    return sum(steps.values())


class One(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize('use_position,use_norm', [
    (True, True), (False, True), (True, False)])
def test_prm_operations_on_a_small_map_equal_the_analytic_count(
        use_position, use_norm):
    from prm_det.models.layers import PRM
    tool = tool_module(GET_FLOPS)
    b, c, h, w, groups = 2, 32, 5, 7, 8
    model = One(PRM(c, groups=groups, use_position=use_position,
                    use_norm=use_norm))
    complexity = tool.count_flops(model, (torch.randn(b, c, h, w), ))
    expected = prm_flops(b, c, h, w, groups, use_position, use_norm)
    assert complexity.attention_flops == {'PRM': expected}
    assert complexity.flops == expected


def test_se_operations_equal_the_analytic_count():
    from prm_det.models.layers.se import SE
    tool = tool_module(GET_FLOPS)
    complexity = tool.count_flops(One(SE(64)), (torch.randn(2, 64, 6, 5), ))
    assert complexity.attention_flops == {'SE': se_flops(2, 64, 6, 5)}


@pytest.mark.parametrize('backbone', ['PRMResNet', 'SEResNet', 'GCResNet'])
def test_an_attention_backbone_counts_a_plain_resnet_plus_its_attention(
        backbone):
    """Nothing else in the network changes its count (BatchNorm, convs):
    what the attention adds is exactly what it computes."""
    tool = tool_module(GET_FLOPS)
    x = torch.randn(1, 3, 64, 96)
    models = {}
    for name in ('ResNet', backbone):
        models[name] = MODELS.build(dict(type=name, depth=18))
        models[name].eval()  # mmdet's ResNet.train() returns None
    plain = tool.count_flops(models['ResNet'], (x, ))
    model = models[backbone]
    complexity = tool.count_flops(model, (x, ))
    kind = backbone[:-len('ResNet')]
    assert complexity.attention_flops[kind] > 0
    assert complexity.flops == plain.flops + complexity.attention_flops[kind]
    if kind == 'PRM':  # 2 blocks a stage, groups=64, maps 16x24 ... 2x3
        expected = sum(2 * prm_flops(1, 64 * 2**s, 16 // 2**s, 24 // 2**s,
                                     64) for s in range(4))
        assert complexity.attention_flops['PRM'] == expected


def test_counting_leaves_the_model_as_it_was():
    from prm_det.models.layers import PRM
    tool = tool_module(GET_FLOPS)
    model = MODELS.build(dict(type='PRMResNet', depth=18))
    model.eval()
    tool.count_flops(model, (torch.randn(1, 3, 64, 64), ))
    assert isinstance(model.layer1[0].prm, PRM)


@pytest.mark.slow
def test_command_line_on_the_retinanet_configs(capsys, repo):
    """PRM-RetinaNet = RetinaNet + 16 PRMs, operations and parameters; the
    output is mmdet's."""
    tool = tool_module(GET_FLOPS)
    plain = tool.main(['configs/retinanet_r50.py', '--shape', '64', '96'])
    prm = tool.main(['configs/retinanet_prm_r50.py', '--shape', '64', '96'])
    maps = [(16, 24), (8, 12), (4, 6), (2, 3)]
    blocks = (3, 4, 6, 3)
    expected = sum(blocks[s] * prm_flops(1, 256 * 2**s, *maps[s], 64)
                   for s in range(4))
    assert prm['attention_flops'] == {'PRM': expected}
    assert prm['flops'] - plain['flops'] == expected
    assert prm['params']['total'] - plain['params']['total'] == 259 * 16
    assert prm['params']['trainable'] - plain['params']['trainable'] == \
        259 * 13  # frozen_stages=1
    out = capsys.readouterr().out
    assert 'Input shape: (64, 96)' in out
    assert 'PRM (16 modules, every op counted)' in out
    assert out.count('Flops: ') == 2 and out.count('Params: ') == 2


def test_two_stage_detectors_keep_a_fixed_1000_proposals(repo):
    from prm_det.engine import load_config
    tool = tool_module(GET_FLOPS)
    cfg = load_config('configs/cascade_rcnn_prm_r50.py')
    assert tool.keep_all_proposals(cfg)
    assert cfg.model.test_cfg.rpn.nms.iou_threshold == 1.0
    assert cfg.model.test_cfg.rpn.max_per_img == 1000
    assert not tool.keep_all_proposals(load_config(
        'configs/retinanet_prm_r50.py'))


@pytest.mark.slow
def test_dataset_images_count_as_a_random_image_of_their_size(tiny_data,
                                                               repo):
    """Without --shape (mmdet 3.x's way) the val images are traced: the
    demo pipeline makes the 96 px images 128x128, which --shape 128 128
    counts the same."""
    tool = tool_module(GET_FLOPS)
    config = 'configs/demo/retinanet_prm_r18_shapes.py'
    options = ['--cfg-options', f'data_root={tiny_data}',
               'val_dataloader.num_workers=0',
               'val_dataloader.persistent_workers=False']
    images = tool.main([config, '--num-images', '2'] + options)
    shape = tool.main([config, '--shape', '128', '128'])
    assert images['compute_type'].startswith('dataloader')
    assert images['pad_shape'] == (128, 128)
    assert images['flops'] == shape['flops']
    assert images['attention_flops'] == shape['attention_flops']


def test_a_small_models_attention_share_is_given_in_its_own_unit():
    """Not '0.001 GFLOPs': the exact count, the largest unit it reaches
    with 4 digits, and the share of the model."""
    tool = tool_module(GET_FLOPS)
    text = tool.report(dict(
        pad_shape=(128, 128), ori_shape=(128, 128), compute_type='direct',
        flops=2_000_000_000, params=dict(total=10, trainable=10, PRM=2072),
        attention_modules={'PRM': 8}, attention_flops={'PRM': 1_234_567}))
    assert ('PRM (8 modules, every op counted): 1,234,567 FLOPs (1.235 '
            'MFLOPs, 0.06% of the model), params 2,072') in text


@pytest.mark.parametrize('stride,similarity', [
    (1, 'squared_difference'), (2, 'squared_difference'),
    (2, 'dot_product'), (1, 'absolute_difference')])
def test_local_relation_operations_equal_the_analytic_count(stride,
                                                            similarity):
    from prm_det.models.layers import LocalRelation2d
    tool = tool_module(GET_FLOPS)
    b, c, out_c, h, w, k = 2, 16, 24, 7, 5, 5
    model = One(LocalRelation2d(c, out_c, k, stride=stride,
                                channels_per_group=4, similarity=similarity))
    complexity = tool.count_flops(model.eval(), (torch.randn(b, c, h, w), ))
    expected = local_relation_flops(b, c, out_c, h, w, k, stride, 4,
                                    similarity)
    assert complexity.attention_flops == {'LR': expected}
    assert complexity.flops == expected


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('similarity', ['squared_difference', 'dot_product',
                                        'absolute_difference'])
def test_the_counted_local_relation_is_the_op(stride, similarity):
    """What the tool traces computes what the op does (float64)."""
    from prm_det.ops.local_relation_op import local_relation
    tool = tool_module(GET_FLOPS)
    generator = torch.Generator().manual_seed(0)
    h, w = 9, 6
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    args = [torch.randn(*shape, generator=generator, dtype=torch.float64)
            for shape in ((2, 3, ho, wo), (2, 3, h, w), (2, 12, h, w),
                          (3, 5, 5))]
    torch.testing.assert_close(
        tool.counted_local_relation(*args, 5, stride, similarity),
        local_relation(*args, 5, stride, similarity), rtol=1e-12,
        atol=1e-12)


def test_an_lr_resnet_counts_its_layers_and_keeps_the_op():
    """LR-ResNet: every local relation layer counted (the stem's and each
    block's), and afterwards the layers run the fused op again."""
    from prm_det.ops import local_relation_layer as layer_module
    from prm_det.ops import local_relation_op
    tool = tool_module(GET_FLOPS)
    model = MODELS.build(dict(type='LRResNet', depth=26, base_channels=16,
                              local_relation=dict(kernel_size=3)))
    model.eval()
    x = torch.randn(1, 3, 32, 48)
    complexity = tool.count_flops(model, (x, ))
    assert layer_module.local_relation is local_relation_op.local_relation
    # the stem's layer: 16 channels of 32x48 to 16x24 (stride 2, 8 a group)
    stem = local_relation_flops(1, 16, 16, 32, 48, 3, 2, 8,
                                'squared_difference')
    blocks = 0
    size = (8, 12)
    for stage in range(4):
        width = (24, 48, 104, 200)[stage]  # 16 * 2**s * 1.5625, rounded
        for index in range(2):
            stride = 2 if stage and not index else 1
            blocks += local_relation_flops(1, width, width, *size, 3,
                                           stride, 8, 'squared_difference')
            size = tuple((s - 1) // stride + 1 for s in size)
    assert complexity.attention_flops == {'LR': stem + blocks}
    assert tool.parameter_counts(model)['LR'] == sum(
        p.numel() for m in model.modules()
        if type(m).__name__ == 'LocalRelation2d' for p in m.parameters())
