"""Write the generated shape-classification set in ImageNet's folder layout.

    python tools/make_shape_classes.py [--out data/shape_classes]
        [--train 16] [--val 8] [--size 32] [--seed 0]

--train / --val images per class (4 classes: rectangle, ellipse, triangle,
cross). MMPretrain's ImageNet dataset reads it with data_root=OUT (the
layout: prm_det/datasets/synthetic_classes.py; its use: docs/pretrain.md).
"""
import argparse
import os.path as osp
import sys

# run from a checkout: its prm_det first (installed, the tools sit in
# prm_det/.mim/tools/ and import the installed package)
_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if osp.isdir(osp.join(_ROOT, 'prm_det')):
    sys.path.insert(0, _ROOT)

from prm_det.datasets.synthetic_classes import generate_classes  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='data/shape_classes')
    parser.add_argument('--train', type=int, default=16,
                        help='training images per class (default: 16)')
    parser.add_argument('--val', type=int, default=8,
                        help='validation images per class (default: 8)')
    parser.add_argument('--size', type=int, default=32,
                        help='image side in pixels (default: 32)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    for name in ('train', 'val', 'size'):
        if getattr(args, name) < (8 if name == 'size' else 1):
            parser.error(f'--{name} must be at least '
                         f'{8 if name == "size" else 1}')
    counts = generate_classes(args.out, dict(train=args.train, val=args.val),
                              size=args.size, seed=args.seed)
    print(f'wrote {counts["train"]} training and {counts["val"]} validation '
          f'images (4 classes, {args.size}x{args.size}) to {args.out}')


if __name__ == '__main__':
    main()
