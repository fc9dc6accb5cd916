"""LR-ResNet (Hu et al., ICCV 2019): every spatial conv of mmdet's ResNet a
local relation layer, the paper's widths rounded to whole groups, the stem a
1x1 conv and a strided local relation layer. The mmdet ResNet promises
(shapes, out_indices, norm_eval, with_cp, empty batches, gradients) are the
family's, in test_backbones.py; edges and bad options in
test_attention_edges.py; sizes in test_pretrain_configs.py."""
import copy

import pytest
import torch
from helpers import tiny_backbone
from mmdet.registry import MODELS
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from prm_det.models.backbones.lr_resnet import LRBottleneck, lr_width
from prm_det.models.layers import LocalRelation2d


@pytest.mark.parametrize('planes,multiplier,per_group,width', [
    (64, 1.5625, 8, 104),    # the paper's 100: no multiple of 8, halves up
    (128, 1.5625, 8, 200), (256, 1.5625, 8, 400), (512, 1.5625, 8, 800),
    (16, 1.5625, 4, 24),     # 25: the nearest multiple of 4
    (64, 1, 8, 64), (4, 1, 8, 8),  # at least one group
])
def test_block_widths_are_the_papers_to_the_nearest_whole_group(
        planes, multiplier, per_group, width):
    assert lr_width(planes, multiplier, per_group) == width


def test_lr_resnet50_has_the_papers_layers_at_the_rounded_widths():
    model = MODELS.build(dict(type='LRResNet', depth=50))
    # the stem: 1x1 conv 3 -> 64, BN, ReLU, 7x7 local relation at stride 2
    conv, _, _, relation, _, _ = model.stem
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == \
        (3, 64, (1, 1))
    assert isinstance(relation, LocalRelation2d)
    assert (relation.kernel_size, relation.stride, relation.groups) == \
        (7, 2, 8)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    for i, width in enumerate((104, 200, 400, 800)):
        for j, block in enumerate(getattr(model, f'layer{i + 1}')):
            assert isinstance(block, LRBottleneck)
            lr = block.conv2
            assert isinstance(lr, LocalRelation2d)
            assert (lr.in_channels, lr.out_channels, lr.groups) == \
                (width, width, width // 8)
            assert lr.stride == (2 if i > 0 and j == 0 else 1)
            assert block.conv1.out_channels == width
            assert block.conv3.in_channels == width
            assert block.conv3.out_channels == 256 * 2**i
    # no spatial conv left: every Conv2d is 1x1
    assert all(m.kernel_size == (1, 1) for m in model.modules()
               if isinstance(m, nn.Conv2d))


def test_basicblock_depths_replace_both_convs():
    model = tiny_backbone('LRResNet', 18)
    block = model.layer2[0]
    assert isinstance(block.conv1, LocalRelation2d)
    assert isinstance(block.conv2, LocalRelation2d)
    assert (block.conv1.stride, block.conv2.stride) == (2, 1)
    # 32 * 1.5625 = 50 -> 52: 12.5 groups of 4, halves up
    assert block.conv1.out_channels == block.conv2.in_channels == 52
    assert block.conv2.out_channels == 32


def test_block_is_the_bottleneck_with_the_relation_as_its_conv2():
    torch.manual_seed(0)
    model = tiny_backbone('LRResNet', 26)
    model.eval()
    block = model.layer2[0]
    x = torch.randn(2, block.conv1.in_channels, 9, 7)
    with torch.no_grad():
        out = block.relu(block.norm1(block.conv1(x)))
        out = block.relu(block.norm2(block.conv2(out)))
        expected = block.relu(block.norm3(block.conv3(out)) +
                              block.downsample(x))
        torch.testing.assert_close(block(x), expected)


def test_lr_stem_false_keeps_mmdets_7x7_stem():
    model = tiny_backbone('LRResNet', 26, lr_stem=False)
    assert not hasattr(model, 'stem') and not model.deep_stem
    assert model.conv1.kernel_size == (7, 7)
    model.eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 32))
    assert outs[0].shape == (1, 64, 16, 8)


@pytest.mark.parametrize('train', [False, True])
def test_frozen_stages_freeze_the_stem_relation_and_stage_one(train):
    model = tiny_backbone('LRResNet', 26, frozen_stages=1, norm_eval=False)
    if train:
        model.train()
    frozen = list(model.stem.parameters()) + list(model.layer1.parameters())
    assert frozen and not any(p.requires_grad for p in frozen)
    assert not any(p.requires_grad for p in model.stem[3].parameters())
    assert all(not m.training for m in model.stem.modules()
               if isinstance(m, _BatchNorm))
    assert all(p.requires_grad for p in model.layer2.parameters())
    if train:
        assert all(m.training for m in model.layer2.modules()
                   if isinstance(m, _BatchNorm))


def test_caffe_style_puts_the_stride_in_the_first_1x1():
    model = tiny_backbone('LRResNet', 26, style='caffe')
    block = model.layer2[0]
    assert block.conv1.stride == (2, 2) and block.conv2.stride == 1
    model.eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 32))
    assert [o.shape[2:] for o in outs] == [
        (16 // 2**i, 8 // 2**i) for i in range(4)]


def test_plugins_after_conv1_and_conv2_get_the_widened_channels():
    plugin = dict(type='ContextBlock', ratio=1. / 4)
    model = tiny_backbone('LRResNet', 26, plugins=[
        dict(cfg=dict(plugin, postfix=1), position='after_conv1'),
        dict(cfg=dict(plugin, postfix=2), position='after_conv2')])
    block = model.layer1[0]
    names = block.after_conv1_plugin_names + block.after_conv2_plugin_names
    assert len(names) == 2
    for name in names:
        assert getattr(block, name).in_channels == block.width == 24
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))


def test_attention_tensor_names_are_the_relation_layers_tensors():
    model = tiny_backbone('LRResNet', 26)
    expected = {name for name in model.state_dict()
                if '.conv2.' in name or name.startswith('stem.3.')}
    assert set(model.attention_tensor_names()) == expected


def _stem_calls(stem):
    """Counts the forward calls of the stem's 1x1 conv (0: folded)."""
    calls = []
    stem[0].register_forward_hook(lambda *_: calls.append(1))
    return calls


def _modules_one_after_another(stem, x):
    for module in stem:
        x = module(x)
    return x


@pytest.mark.parametrize('norm_options', [
    dict(), dict(momentum=None), dict(affine=False),
    dict(track_running_stats=False)])
def test_stem_folds_its_conv_norm_and_relu_exactly(norm_options):
    """The stem's 1x1 conv, BN and ReLU run as one matmul (in training with
    the batch's statistics from the input's covariance) and give what the
    modules do one after another: output, every gradient (the input's
    too), the running statistics over steps (momentum or cumulative), then
    the output in evaluation, float64 to 1e-10."""
    torch.manual_seed(0)
    model = tiny_backbone('LRResNet', 26).double()
    stem = model.stem
    stem[1] = nn.BatchNorm2d(stem[1].num_features, **norm_options).double()
    stem.train()
    reference = copy.deepcopy(stem)
    calls = _stem_calls(stem)
    for step in range(3):
        x = (torch.randn(2, 3, 12, 10, dtype=torch.float64) * 2 + step
             ).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        out = stem(x)
        expected = _modules_one_after_another(reference, x_ref)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        grad = torch.randn_like(out)
        out.backward(grad)
        expected.backward(grad)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10,
                                   atol=1e-10)
    assert not calls  # the conv module never ran: folded
    for (name, p), q in zip(stem.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-10,
                                   msg=name)
    for (name, b), c in zip(stem.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-10, msg=name)
    # evaluation: the running statistics (or the batch's, untracked)
    stem.eval()
    reference.eval()
    x = torch.randn(2, 3, 12, 10, dtype=torch.float64) + 1
    with torch.no_grad():
        torch.testing.assert_close(
            stem(x), _modules_one_after_another(reference, x), rtol=1e-10,
            atol=1e-10)
    assert not calls


def test_stem_folds_under_bf16_autocast_as_the_modules_compute():
    torch.manual_seed(0)
    stem = tiny_backbone('LRResNet', 26).stem.train()
    reference = copy.deepcopy(stem)
    x = torch.randn(2, 3, 16, 12)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = stem(x)
        expected = _modules_one_after_another(reference, x)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out.float(), expected.float(), rtol=0.05,
                               atol=0.05)
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in stem.parameters())


@pytest.mark.parametrize('case', ['SyncBN', 'GN', 'one value', 'tracing'])
def test_stem_runs_its_modules_where_the_fold_does_not_hold(case):
    """A norm other than nn.BatchNorm2d, a batch BN refuses (one value a
    channel), tracing (get_flops, ONNX export): the modules run, with
    their results and errors."""
    torch.manual_seed(0)
    norm_cfg = dict(type=case, num_groups=4) if case == 'GN' else (
        dict(type=case) if case == 'SyncBN' else dict(type='BN'))
    stem = tiny_backbone('LRResNet', 26, norm_cfg=norm_cfg).stem
    stem.train(case != 'tracing')
    calls = _stem_calls(stem)
    if case == 'tracing':
        x = torch.randn(1, 3, 12, 10)
        with torch.no_grad():
            traced = torch.jit.trace(stem, x)
            assert calls
            torch.testing.assert_close(traced(x), stem(x))
        return
    if case == 'one value':
        with pytest.raises(ValueError, match='more than 1 value per channel'):
            stem(torch.randn(1, 3, 1, 1))
        assert calls
        return
    x = torch.randn(2, 3, 12, 10)
    reference = copy.deepcopy(stem)
    torch.testing.assert_close(stem(x),
                               _modules_one_after_another(reference, x))
    assert calls
