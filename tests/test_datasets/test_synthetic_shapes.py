"""The generated shapes dataset: COCO format that pycocotools and mmdet load,
varied, and deterministic by seed."""
import hashlib
import json
import os

import numpy as np
import pytest
from pycocotools.coco import COCO

from prm_det.datasets.synthetic_shapes import CLASSES, generate, shape_sizes


def digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            with open(os.path.join(dirpath, name), 'rb') as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('shapes'))
    return root, generate(root, num_train=24, num_val=8, seed=3)


def test_pycocotools_loads_both_splits(shapes):
    _, paths = shapes
    for split, count in (('train', 24), ('val', 8)):
        coco = COCO(paths[split])
        assert len(coco.getImgIds()) == count
        assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == \
            list(CLASSES)
        assert len(coco.getAnnIds()) >= count  # at least one object each


def test_objects_vary_in_category_size_and_overlap(shapes):
    _, paths = shapes
    anns = json.load(open(paths['train']))['annotations']
    assert {a['category_id'] for a in anns} == {1, 2, 3, 4}
    sides = np.array([max(a['bbox'][2], a['bbox'][3]) for a in anns])
    assert sides.min() < 40 and sides.max() > 55
    by_image = {}
    for a in anns:
        by_image.setdefault(a['image_id'], []).append(a['bbox'])

    def overlap(a, b):
        return (min(a[0] + a[2], b[0] + b[2]) > max(a[0], b[0]) and
                min(a[1] + a[3], b[1] + b[3]) > max(a[1], b[1]))

    assert any(overlap(a, b) for boxes in by_image.values()
               for i, a in enumerate(boxes) for b in boxes[i + 1:])
    for a in anns:
        x, y, w, h = a['bbox']
        assert w >= 2 and h >= 2 and x >= 0 and y >= 0
        assert x + w <= 128 and y + h <= 128


def test_same_seed_same_dataset_other_seed_other_dataset(tmp_path):
    generate(str(tmp_path / 'a'), num_train=4, num_val=2, seed=7)
    generate(str(tmp_path / 'b'), num_train=4, num_val=2, seed=7)
    generate(str(tmp_path / 'c'), num_train=4, num_val=2, seed=8)
    assert digest(tmp_path / 'a') == digest(tmp_path / 'b')
    assert digest(tmp_path / 'a') != digest(tmp_path / 'c')


def test_bad_sizes_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match='min_size'):
        generate(str(tmp_path), image_size=64, min_size=80, max_size=90)


def test_shape_sizes_follow_the_image_size():
    assert shape_sizes(128) == (24, 72)  # the demo's
    assert shape_sizes(64) == (12, 36)
    assert shape_sizes(256) == (48, 144)
    assert shape_sizes(16) == (4, 9)  # never under 4 pixels
    with pytest.raises(ValueError, match='image_size must be at least 4'):
        shape_sizes(3)


def test_a_small_image_gets_shapes_that_fit_it(tmp_path):
    paths = generate(str(tmp_path), num_train=12, num_val=2, image_size=64,
                     seed=5)
    coco = json.load(open(paths['train']))
    assert {(i['width'], i['height']) for i in coco['images']} == {(64, 64)}
    sides = [s for a in coco['annotations'] for s in a['bbox'][2:]]
    # 9/16 of 64; cv2 draws an ellipse of half-axis w // 2 around a center
    # pixel, up to one pixel wider than w
    assert sides and max(sides) <= 36 + 1
    for a in coco['annotations']:
        x, y, w, h = a['bbox']
        assert x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64


def test_the_demos_image_size_keeps_the_demos_shapes(tmp_path):
    """Sizes from image_size leave the demo's dataset (128 px, shapes of
    24 to 72) as it was."""
    generate(str(tmp_path / 'a'), num_train=4, num_val=2, seed=7)
    generate(str(tmp_path / 'b'), num_train=4, num_val=2, seed=7,
             image_size=128, min_size=24, max_size=72)
    assert digest(tmp_path / 'a') == digest(tmp_path / 'b')


def test_one_size_given_the_other_follows_the_image_size(tmp_path):
    # a min_size above the default max (36): max_size rises to it
    generate(str(tmp_path / 'a'), num_train=6, num_val=1, image_size=64,
             max_objects=1, min_size=40, seed=1)
    sides = [s for a in json.load(open(
        tmp_path / 'a' / 'annotations' / 'instances_train.json'))[
            'annotations'] for s in a['bbox'][2:]]
    assert len(sides) == 12 and min(sides) >= 40 - 1
    # a max_size below the default min: min_size comes down to it
    generate(str(tmp_path / 'b'), num_train=1, num_val=1, image_size=64,
             max_size=8, seed=1)
    sides = [s for a in json.load(open(
        tmp_path / 'b' / 'annotations' / 'instances_train.json'))[
            'annotations'] for s in a['bbox'][2:]]
    assert max(sides) <= 8 + 1
