"""A generated image-classification set in ImageNet's folder layout.

For MMPretrain's ``ImageNet`` dataset (``data_root``, ``split``), as the
real ImageNet is laid out::

    ROOT/train/<class>/<class>_00000.JPEG     ROOT/meta/train.txt
    ROOT/val/<class>/<class>_00000.JPEG       ROOT/meta/val.txt

``meta/*.txt`` hold ``<path relative to the split folder> <label>`` lines,
the annotation files MMPretrain reads when they exist. Each image holds one
shape of its class (:data:`prm_det.datasets.synthetic_shapes.CLASSES`) on a
random background, a task a small network learns in an epoch or two.
"""
import os
import os.path as osp
from typing import Dict

import cv2
import numpy as np

from .synthetic_shapes import CLASSES, _background, _shape_mask

SPLITS = ('train', 'val')


def render_class_image(rng: np.random.Generator, label: int,
                       size: int) -> np.ndarray:
    """One BGR image [size, size, 3] holding one shape of class ``label``,
    a third to two thirds of the image wide."""
    img = _background(rng, size)
    mask = _shape_mask(rng, CLASSES[label], size, max(size // 3, 2),
                       max(2 * size // 3, 3))
    color = rng.integers(0, 256, size=3)
    if np.abs(img[mask].mean(0) - color).sum() < 60:
        color = 255 - color
    img[mask] = color
    return img


def generate_classes(root: str, per_class: Dict[str, int], size: int = 32,
                     seed: int = 0) -> Dict[str, int]:
    """Write ``per_class[split]`` images of every class for each split
    under ``root``; returns the number of images per split."""
    rng = np.random.default_rng(seed)
    os.makedirs(osp.join(root, 'meta'), exist_ok=True)
    counts = {}
    for split in SPLITS:
        lines = []
        for label, name in enumerate(CLASSES):
            folder = osp.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for index in range(per_class[split]):
                file = f'{name}_{index:05d}.JPEG'
                image = render_class_image(rng, label, size)
                if not cv2.imwrite(osp.join(folder, file), image,
                                   [cv2.IMWRITE_JPEG_QUALITY, 95]):
                    raise OSError(f'could not write {osp.join(folder, file)}')
                lines.append(f'{name}/{file} {label}\n')
        with open(osp.join(root, 'meta', f'{split}.txt'), 'w') as f:
            f.writelines(lines)
        counts[split] = len(lines)
    return counts
