"""tools/make_shapes.py run as a user runs it (a subprocess in the user's
folder, no PYTHONPATH): the shapes follow ``--size``, and sizes that
cannot fit are refused with the numbers."""
import json
import sys

import pytest
from tool_runs import REPO, ok, outside_env, run_tool

pytestmark = pytest.mark.slow

MAKE_SHAPES = f'{REPO}/tools/make_shapes.py'


def boxes(root, split='train'):
    coco = json.loads((root / 'annotations' / f'instances_{split}.json')
                      .read_text())
    return coco['images'], [a['bbox'] for a in coco['annotations']]


@pytest.mark.parametrize('size', [64, 32])
def test_make_shapes_at_a_small_size_draws_shapes_that_fit_it(size,
                                                              tmp_path):
    ok(run_tool([sys.executable, MAKE_SHAPES, '--out', 'shapes', '--train',
                 '8', '--val', '2', '--size', str(size)], cwd=str(tmp_path),
                env=outside_env()))
    images, bboxes = boxes(tmp_path / 'shapes')
    assert {(i['width'], i['height']) for i in images} == {(size, size)}
    assert bboxes
    for x, y, w, h in bboxes:
        # 9/16 of the side, and up to one pixel of an ellipse's rounding
        assert w <= size * 9 / 16 + 1 and h <= size * 9 / 16 + 1
        assert x >= 0 and y >= 0 and x + w <= size and y + h <= size


def test_make_shapes_takes_the_shape_sizes_it_is_given(tmp_path):
    ok(run_tool([sys.executable, MAKE_SHAPES, '--out', 'shapes', '--train',
                 '6', '--val', '1', '--size', '64', '--max-objects', '1',
                 '--min-size', '20', '--max-size', '24'], cwd=str(tmp_path),
                env=outside_env()))
    _, bboxes = boxes(tmp_path / 'shapes')
    sides = [s for b in bboxes for s in b[2:]]
    assert len(sides) == 12 and min(sides) >= 20 - 1 and max(sides) <= 25


def test_make_shapes_refuses_shapes_larger_than_the_image_naming_them(
        tmp_path):
    proc = run_tool([sys.executable, MAKE_SHAPES, '--out', 'shapes',
                     '--size', '64', '--max-size', '80'], cwd=str(tmp_path),
                    env=outside_env())
    assert proc.returncode == 2  # argparse's usage error
    assert ('need 4 <= min_size <= max_size <= image_size, got 12, 80, 64'
            in proc.stderr)
    assert 'Traceback' not in proc.stderr
    assert not (tmp_path / 'shapes').exists()
