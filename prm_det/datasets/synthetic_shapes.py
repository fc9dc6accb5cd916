"""A small COCO-format detection dataset of rendered shapes, made on the spot.

COCO and ImageNet weights cannot be downloaded everywhere (CI, a laptop on a
train); this writes a dataset that mmdet's ``CocoDataset`` and pycocotools
load like the real thing, so the demo and the tests run the real pipeline.

Images have textured backgrounds (gradients plus noise) and several filled
shapes of four kinds, in random colors, sizes and positions, overlapping
each other. Boxes are the tight boxes of each shape's visible pixels (shapes
drawn later can hide parts of earlier ones); a shape left with too few
visible pixels is dropped. Everything is deterministic given the seed.

Layout written under ``root``::

    train/000000.png ...
    val/000000.png ...
    annotations/instances_train.json
    annotations/instances_val.json
"""
import json
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

CLASSES = ('rectangle', 'ellipse', 'triangle', 'cross')
MIN_VISIBLE_FRACTION = 0.4  # drop a shape mostly hidden by later ones


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth two-color gradient plus noise, uint8 [size, size, 3]."""
    c0, c1 = rng.integers(0, 256, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    img += rng.normal(0, rng.uniform(2, 12), size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_mask(rng: np.random.Generator, kind: str, size: int,
                min_size: int, max_size: int) -> np.ndarray:
    """A filled shape of ``kind`` at a random place, bool [size, size]."""
    mask = np.zeros((size, size), np.uint8)
    w, h = rng.integers(min_size, max_size + 1, size=2)
    x0 = int(rng.integers(0, max(size - w, 1)))
    y0 = int(rng.integers(0, max(size - h, 1)))
    x1, y1 = x0 + int(w) - 1, y0 + int(h) - 1
    if kind == 'rectangle':
        cv2.rectangle(mask, (x0, y0), (x1, y1), 1, thickness=-1)
    elif kind == 'ellipse':
        center = ((x0 + x1) // 2, (y0 + y1) // 2)
        cv2.ellipse(mask, center, (max(int(w) // 2, 1), max(int(h) // 2, 1)),
                    0, 0, 360, 1, thickness=-1)
    elif kind == 'triangle':
        apex = int(rng.integers(x0, x1 + 1))
        pts = np.array([[apex, y0], [x0, y1], [x1, y1]], np.int32)
        cv2.fillPoly(mask, [pts], 1)
    elif kind == 'cross':
        tw, th = max(int(w) // 3, 1), max(int(h) // 3, 1)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        cv2.rectangle(mask, (x0, cy - th // 2), (x1, cy + th // 2), 1, -1)
        cv2.rectangle(mask, (cx - tw // 2, y0), (cx + tw // 2, y1), 1, -1)
    else:
        raise ValueError(f'unknown shape {kind!r}; known: {CLASSES}')
    return mask.astype(bool)


def render_image(rng: np.random.Generator, size: int, max_objects: int,
                 min_size: int, max_size: int
                 ) -> Tuple[np.ndarray, List[Tuple[int, List[float]]]]:
    """One image and its (category index, [x, y, w, h]) boxes."""
    img = _background(rng, size)
    owner = np.full((size, size), -1, np.int32)  # which shape shows where
    shapes = []
    for i in range(int(rng.integers(1, max_objects + 1))):
        label = int(rng.integers(len(CLASSES)))
        mask = _shape_mask(rng, CLASSES[label], size, min_size, max_size)
        color = rng.integers(0, 256, size=3)
        # keep shapes visible against the background under them
        if np.abs(img[mask].mean(0) - color).sum() < 60:
            color = 255 - color
        img[mask] = color
        owner[mask] = i
        shapes.append((label, int(mask.sum())))
    boxes = []
    for i, (label, area) in enumerate(shapes):
        ys, xs = np.where(owner == i)
        if len(xs) < max(MIN_VISIBLE_FRACTION * area, 4):
            continue
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        boxes.append((label, [float(x0), float(y0), float(x1 - x0),
                              float(y1 - y0)]))
    return img, boxes


# the demo's split sizes (`make demo`, tools/make_shapes.py's defaults)
DEMO_NUM_TRAIN = 2000
DEMO_NUM_VAL = 500
# shape sides as fractions of the image side: 24 to 72 px in the demo's 128
MIN_SIZE_FRACTION = 3 / 16
MAX_SIZE_FRACTION = 9 / 16
MIN_SHAPE_SIZE = 4  # px: the smallest shape side generate() takes


def shape_sizes(image_size: int) -> Tuple[int, int]:
    """``(min_size, max_size)`` of the shapes in images of ``image_size``
    pixels: 3/16 and 9/16 of it (24 and 72 at 128), at least 4 pixels."""
    if image_size < MIN_SHAPE_SIZE:
        raise ValueError(f'image_size must be at least {MIN_SHAPE_SIZE} '
                         f'pixels, got {image_size}')
    min_size = max(MIN_SHAPE_SIZE, round(image_size * MIN_SIZE_FRACTION))
    max_size = max(min_size, round(image_size * MAX_SIZE_FRACTION))
    return min_size, max_size


def generate(root: str,
             num_train: int = DEMO_NUM_TRAIN,
             num_val: int = DEMO_NUM_VAL,
             image_size: int = 128,
             max_objects: int = 3,
             min_size: Optional[int] = None,
             max_size: Optional[int] = None,
             seed: int = 0) -> Dict[str, str]:
    """Write the dataset under ``root``; returns the annotation file paths.

    Args:
        root (str): Output folder (created).
        num_train, num_val (int): Images per split.
        image_size (int): Side of the square images, in pixels.
        max_objects (int): Up to this many shapes per image (at least one).
        min_size, max_size (int, optional): Range of shape widths and
            heights; by default from ``image_size`` (:func:`shape_sizes`:
            24 to 72 at 128).
        seed (int): Everything is a function of it.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError('num_train and num_val must be at least 1')
    default_min, default_max = shape_sizes(image_size)
    if min_size is None:
        min_size = (default_min if max_size is None else
                    min(default_min, max_size))
    if max_size is None:
        max_size = max(default_max, min_size)
    if not 4 <= min_size <= max_size <= image_size:
        raise ValueError(f'need 4 <= min_size <= max_size <= image_size, got '
                         f'{min_size}, {max_size}, {image_size}: give shape '
                         f'sizes that fit the image, or none for 3/16 to '
                         f'9/16 of its side')
    categories = [dict(id=i + 1, name=name, supercategory='shape')
                  for i, name in enumerate(CLASSES)]
    paths = {}
    for split, count, split_seed in (('train', num_train, seed),
                                     ('val', num_val, seed + 1_000_003)):
        rng = np.random.default_rng(split_seed)
        os.makedirs(osp.join(root, split), exist_ok=True)
        images, annotations = [], []
        for image_id in range(count):
            img, boxes = render_image(rng, image_size, max_objects, min_size,
                                      max_size)
            file_name = f'{image_id:06d}.png'
            cv2.imwrite(osp.join(root, split, file_name), img)
            images.append(dict(id=image_id, file_name=file_name,
                               width=image_size, height=image_size))
            for label, bbox in boxes:
                annotations.append(dict(
                    id=len(annotations) + 1, image_id=image_id,
                    category_id=label + 1, bbox=bbox,
                    area=bbox[2] * bbox[3], iscrowd=0))
        ann_file = osp.join(root, 'annotations', f'instances_{split}.json')
        os.makedirs(osp.dirname(ann_file), exist_ok=True)
        with open(ann_file, 'w') as f:
            json.dump(dict(images=images, annotations=annotations,
                           categories=categories), f)
        paths[split] = ann_file
    return paths


def metainfo() -> dict:
    """The ``metainfo`` for mmdet's CocoDataset on this data."""
    return dict(classes=CLASSES)


def is_generated(root: str, splits: Sequence[str] = ('train', 'val')) -> bool:
    return all(
        osp.isfile(osp.join(root, 'annotations', f'instances_{s}.json'))
        for s in splits)


def split_sizes(root: str) -> Dict[str, int]:
    """Images per split of the dataset written under ``root``."""
    sizes = {}
    for split in ('train', 'val'):
        with open(osp.join(root, 'annotations', f'instances_{split}.json')) as f:
            sizes[split] = len(json.load(f)['images'])
    return sizes
