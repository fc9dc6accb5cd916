"""PRM-MobileNetV2: PRM at the end of every inverted residual block of
mmdet's MobileNetV2, in mmdet's SSDLite (configs/ssdlite_prm_mobilenetv2.py)."""
import os.path as osp

import pytest
import torch
from helpers import REPO
from mmdet.registry import MODELS
from mmengine.config import Config

from prm_det.models.backbones.attention_mobilenet_v2 import prm_heads
from prm_det.models.layers import PRM


def test_every_block_ends_with_a_prm_sized_to_its_width():
    model = MODELS.build(dict(type='PRMMobileNetV2', init_cfg=None))
    blocks = [b for name in model.layers[:-1] for b in getattr(model, name)]
    assert len(blocks) == 17  # MobileNetV2's inverted residual blocks
    for block in blocks:
        width = block.linear_conv.conv.out_channels
        assert isinstance(block.attention, PRM)
        assert block.attention.groups == prm_heads(width)
        assert width % block.attention.groups == 0
    assert [prm_heads(c) for c in (16, 24, 32, 64, 96, 160, 320)] == [
        4, 6, 8, 16, 24, 40, 64]


def test_prm_sits_after_the_projection_before_the_shortcut():
    """A block whose PRM gates everything to 0 returns its input (the
    shortcut alone); with PRM removed it would not."""
    model = MODELS.build(dict(type='PRMMobileNetV2', init_cfg=None)).eval()
    block = model.layer3[1]  # stride 1, 32 -> 32: a shortcut
    assert block.with_res_shortcut
    with torch.no_grad():
        block.attention.weight.zero_()
        block.attention.bias.fill_(-1e4)  # gate = sigmoid(-1e4) = 0
    x = torch.randn(2, 32, 8, 8)
    torch.testing.assert_close(block(x), x)


def test_mobilenet_v2_without_attention_is_mmdets():
    torch.manual_seed(0)
    ours = MODELS.build(dict(type='AttentionMobileNetV2', init_cfg=None))
    theirs = MODELS.build(dict(type='MobileNetV2', init_cfg=None))
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 64, 64)
    theirs.eval()  # mmdet's train() returns None: no chaining
    for a, b in zip(ours.eval()(x), theirs(x)):
        torch.testing.assert_close(a, b)


def test_prm_adds_4g_plus_3_parameters_a_block():
    plain = MODELS.build(dict(type='MobileNetV2', init_cfg=None))
    prm = MODELS.build(dict(type='PRMMobileNetV2', init_cfg=None))
    widths = [16] + [24] * 2 + [32] * 3 + [64] * 4 + [96] * 3 + [160] * 3 + [
        320]
    added = sum(4 * prm_heads(w) + 3 for w in widths)
    assert added == 1491
    count = [sum(p.numel() for p in m.parameters()) for m in (plain, prm)]
    assert count[1] - count[0] == added


@pytest.mark.parametrize('with_cp', [False, True])
def test_ssdlite_prm_mobilenetv2_trains_a_step(with_cp):
    cfg = Config.fromfile(osp.join(REPO, 'configs',
                                   'ssdlite_prm_mobilenetv2.py'))
    assert cfg.model.backbone.type == 'PRMMobileNetV2'
    cfg.model.backbone.with_cp = with_cp
    cfg.model.bbox_head.num_classes = 4
    detector = MODELS.build(cfg.model)
    detector.init_weights()
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    samples = []
    for box in ([10., 12., 50., 60.], [30., 5., 90., 40.]):
        sample = DetDataSample(metainfo=dict(img_shape=(96, 96),
                                             pad_shape=(96, 96),
                                             batch_input_shape=(96, 96),
                                             scale_factor=(1.0, 1.0)))
        sample.gt_instances = InstanceData(bboxes=torch.tensor([box]),
                                           labels=torch.tensor([2]))
        samples.append(sample)
    # two images: SSDLite's last levels are 1x1, and BatchNorm needs more
    # than one value a channel
    losses = detector.loss(torch.randn(2, 3, 96, 96), samples)
    total = sum(v.sum() if isinstance(v, torch.Tensor) else sum(v)
                for v in losses.values())
    assert torch.isfinite(total)
    total.backward()
    prm = detector.backbone.layer7[0].attention
    assert prm.weight.grad is not None and torch.isfinite(prm.weight.grad).all()
