"""tools/analysis_tools/vis_prm.py: the query points it draws are the argmax
positions of the groups' channel sums, its gate is PRM's, and the pictures
are written at the image's size."""
import os.path as osp

import numpy as np
import pytest
import torch
from helpers import DEMO_CONFIG as CONFIG
from helpers import tool_module

IMAGE_HW = (130, 190)  # resized to 88x128 by the demo pipeline, padded to 96


@pytest.fixture(scope='module')
def drawn(tmp_path_factory, demo_checkpoint):
    """vis_prm on a generated gray image, with the demo-config detector
    whose PRM parameters are random (a fresh PRM's gate is constant)."""
    import cv2
    tmp = tmp_path_factory.mktemp('vis_prm')
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 120, IMAGE_HW, dtype=np.uint8)
    gray[40:80, 100:150] = 230  # a bright block
    image = str(tmp / 'image.png')
    cv2.imwrite(image, np.stack([gray] * 3, -1))
    tool = tool_module('analysis_tools/vis_prm.py')
    rows = tool.main([CONFIG, demo_checkpoint, image, '--out-dir',
                      str(tmp / 'out')])
    return tool, rows, tmp / 'out'


def test_one_row_per_stage_the_last_block_of_each(drawn):
    _, rows, _ = drawn
    assert [r['block'] for r in rows] == [
        'layer1.1', 'layer2.1', 'layer3.1', 'layer4.1']
    # the demo backbone: half-width ResNet-18, 16 PRM groups; input 96x128
    for stage, row in enumerate(rows):
        assert row['features'].shape == (32 * 2**stage, 24 // 2**stage,
                                         32 // 2**stage)
        assert row['query_xy'].shape == (16, 2)


def test_drawn_query_points_are_the_argmax_of_each_groups_channel_sum(drawn):
    _, rows, _ = drawn
    # mmdet's Resize keeps the ratio: 190x130 -> 128x88 (scale per axis)
    scale_x, scale_y = 128 / 190, 88 / 130
    for row in rows:
        c, h, w = row['features'].shape
        sums = row['features'].reshape(16, c // 16, h * w).sum(1)
        index = sums.argmax(1)
        np.testing.assert_array_equal(row['query_index'], index)
        stride_y, stride_x = 96 / h, 128 / w
        expected_xy = np.stack([(index % w + 0.5) * stride_x / scale_x,
                                (index // w + 0.5) * stride_y / scale_y], 1)
        np.testing.assert_allclose(row['query_xy'], expected_xy, rtol=1e-6)


def test_the_queries_png_has_a_dot_at_every_query_point(drawn):
    import matplotlib.image
    tool, rows, _ = drawn
    for row in rows:
        picture = matplotlib.image.imread(row['files']['queries'])
        picture = picture[tool.TITLE_PX:]  # under the title
        red = (picture[..., 0] > 0.99) & (picture[..., 1] < 0.01) & \
            (picture[..., 2] < 0.01)
        for x, y in row['query_xy']:
            col = min(int(x), IMAGE_HW[1] - 1)
            row_ = min(int(y), IMAGE_HW[0] - 1)
            assert red[row_, col]


def test_gate_times_features_is_prms_output(drawn, demo_checkpoint):
    """The gate drawn is the one PRM multiplies its input by."""
    from mmdet.apis import init_detector

    from prm_det.ops.reference import prm_reference
    _, rows, _ = drawn
    model = init_detector(CONFIG, demo_checkpoint, device='cpu')
    for row in rows:
        prm = dict(model.backbone.named_modules())[f'{row["block"]}.prm']
        x = torch.from_numpy(row['features'])[None]
        expected = prm_reference(
            x, prm.weight, prm.bias, prm.one, prm.zero, prm.theta, prm.scale,
            prm.groups, prm.mode, prm.use_position, prm.use_norm,
            prm.normalized_positions)
        c, h, w = row['features'].shape
        gate = torch.from_numpy(row['gate_groups'])  # [g, h, w]
        gated = x.view(16, c // 16, h, w) * gate[:, None]
        torch.testing.assert_close(gated.view(1, c, h, w), expected.detach(),
                                   rtol=1e-4, atol=1e-5)
        assert float(gate.std()) > 0  # random PRM parameters: not constant


def test_pictures_hold_the_image_pixel_for_pixel_under_a_title(drawn):
    """Each per-block PNG: a title band, then the picture at the image's
    size (the map's colours exactly, for D and the gate), and a colour bar
    to the right of a map."""
    import matplotlib.image
    from matplotlib import cm, colors
    tool, rows, out = drawn
    height, width = IMAGE_HW
    top = tool.TITLE_PX
    for row in rows:
        queries = matplotlib.image.imread(row['files']['queries'])
        assert queries.shape[:2] == (top + height, width)
        for key in ('position_weight', 'gate'):
            picture = matplotlib.image.imread(row['files'][key])[..., :3]
            assert picture.shape[:2] == (top + height, width + tool.BAR_PX)
            values = tool.to_image(row[key], row_meta(drawn), IMAGE_HW)
            expected = cm.ScalarMappable(norm=colors.Normalize(
                values.min(), values.max()), cmap='viridis').to_rgba(
                    values)[..., :3]
            np.testing.assert_allclose(picture[top:, :width], expected,
                                       atol=1.5 / 255)
            title, bar = picture[:top], picture[top:, width:]
            assert (title < 0.5).any()  # the title's text
            assert bar.std() > 0.05  # the colour bar and its labels
    grid = matplotlib.image.imread(str(out / 'grid.png'))
    cell = tool.GRID_CELL_INCHES * tool.GRID_DPI
    assert grid.shape[:2] == (len(rows) * cell, 3 * cell)


def row_meta(drawn):
    """The demo pipeline's resize of IMAGE_HW (what vis_prm maps back)."""
    return dict(img_shape=(88, 128), batch_input_shape=(96, 128),
                pad_shape=(96, 128), ori_shape=IMAGE_HW)


def test_coinciding_query_points_are_counted_and_marked(drawn):
    tool, _, _ = drawn
    points = np.array([[10.2, 20.7], [10.9, 20.1], [50.0, 60.0]])
    assert tool.describe_queries(points, IMAGE_HW) == \
        '3 queries at 2 positions (xN: N groups share one)'
    assert tool.describe_queries(points[1:], IMAGE_HW) == \
        '2 queries each at its own position'
    image = np.full(IMAGE_HW + (3, ), 90, np.uint8)
    marked = tool.draw_queries(image, points)
    single = tool.draw_queries(image, points[[0, 2]])
    # 'x2' is written beside the shared dot only
    differs = np.argwhere((marked != single).any(-1))
    assert len(differs) > 0
    assert differs[:, 1].min() > 10 and differs[:, 0].max() < 30


def test_a_block_without_prm_is_refused_naming_the_ones_with_it(
        drawn, demo_checkpoint):
    from mmdet.apis import init_detector
    tool, _, _ = drawn
    model = init_detector(CONFIG, demo_checkpoint, device='cpu')
    with pytest.raises(ValueError, match='layer1.0'):
        tool.capture_prm_inputs(model.backbone, ['layer9.0'])


def test_the_maps_drawn_are_the_references_intermediates(
        drawn, demo_checkpoint):
    """vis_prm draws what the reference computes (one source of PRM's math):
    query positions, D and gate, exactly."""
    from mmdet.apis import init_detector

    from prm_det.ops.reference import prm_reference_with_intermediates
    tool, rows, _ = drawn
    model = init_detector(CONFIG, demo_checkpoint, device='cpu')
    for row in rows:
        prm = dict(model.backbone.named_modules())[f'{row["block"]}.prm']
        x = torch.from_numpy(row['features'])[None]
        with torch.no_grad():
            y, parts = prm_reference_with_intermediates(
                x, prm.weight, prm.bias, prm.one, prm.zero, prm.theta,
                prm.scale, prm.groups, prm.mode, prm.use_position,
                prm.use_norm, prm.normalized_positions)
            maps = tool.prm_maps(x, prm)
        np.testing.assert_array_equal(row['query_index'],
                                      parts.query_index[0].numpy())
        np.testing.assert_array_equal(row['query_rc'],
                                      parts.query_rc[0].numpy())
        np.testing.assert_array_equal(row['position_weight_groups'],
                                      parts.position_weight[0].numpy())
        np.testing.assert_array_equal(row['gate_groups'],
                                      parts.gate[0].numpy())
        for key in ('query_index', 'query_rc', 'position_weight', 'gate'):
            torch.testing.assert_close(maps[key], getattr(parts, key)[0],
                                       rtol=0, atol=0)


@pytest.mark.parametrize('kind', ['sge', 'cbam'])
def test_sge_and_cbam_gates_are_drawn_and_are_what_the_module_applies(
        tmp_path, kind):
    """An SGE or CBAM demo detector (attention parameters drawn away from
    their constant-gate initialization): one gate picture per stage, and
    the gate drawn is the one the module multiplies by."""
    import cv2
    from mmdet.apis import init_detector
    from mmdet.registry import MODELS
    from mmengine.config import Config

    from prm_det.models.layers.sge import sge_gate
    config = CONFIG.replace('retinanet_prm_r18', f'retinanet_{kind}_r18')
    torch.manual_seed(0)
    detector = MODELS.build(Config.fromfile(config).model)
    with torch.no_grad():
        for name, p in detector.backbone.named_parameters():
            if f'.{kind}.' in name:
                p.add_(torch.randn_like(p))
    checkpoint = str(tmp_path / 'random.pth')
    torch.save({'meta': {}, 'state_dict': detector.state_dict()}, checkpoint)
    image = str(tmp_path / 'image.png')
    rng = np.random.default_rng(0)
    cv2.imwrite(image, rng.integers(0, 255, IMAGE_HW + (3, ), np.uint8))
    tool = tool_module('analysis_tools/vis_prm.py')
    rows = tool.main([config, checkpoint, image, '--out-dir',
                      str(tmp_path / 'out')])
    assert [r['block'] for r in rows] == [
        'layer1.1', 'layer2.1', 'layer3.1', 'layer4.1']
    assert (tmp_path / 'out' / 'grid.png').is_file()
    model = init_detector(config, checkpoint, device='cpu')
    for row in rows:
        assert osp.isfile(row['files']['gate']) and row['kind'] == kind.upper()
        module = getattr(dict(model.backbone.named_modules())[row['block']],
                         kind)
        x = torch.from_numpy(row['features'])[None]
        gate = torch.from_numpy(row['gate_groups'])
        with torch.no_grad():
            expected = module(x)
            if kind == 'sge':
                torch.testing.assert_close(
                    gate, sge_gate(x, module.weight, module.bias,
                                   module.groups)[0])
                c, h, w = row['features'].shape
                gated = (x.view(len(gate), -1, h, w) * gate[:, None])
                gated = gated.view(1, c, h, w)
            else:
                channel = module.channel_gate(x)[:, :, None, None]
                gated = x * channel * gate[None]
        torch.testing.assert_close(gated, expected, rtol=1e-4, atol=1e-5)
        assert float(gate.std()) > 0
