"""Write the generated shapes detection dataset (COCO format).

    python tools/make_shapes.py [--out data/prm_demo] [--train 2000] [--val 500]
        [--size 128] [--min-size N] [--max-size N] [--max-objects 3] [--seed 0]

Shapes are 3/16 to 9/16 of --size wide and high (24 to 72 pixels at 128)
unless --min-size / --max-size say otherwise.
"""
import argparse
import os.path as osp
import sys

# run from a checkout: its prm_det first (installed, the tools sit in
# prm_det/.mim/tools/ and import the installed package)
_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
if osp.isdir(osp.join(_ROOT, 'prm_det')):
    sys.path.insert(0, _ROOT)

from prm_det.datasets.synthetic_shapes import (  # noqa: E402
    DEMO_NUM_TRAIN, DEMO_NUM_VAL, generate)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='data/prm_demo')
    parser.add_argument('--train', type=int, default=DEMO_NUM_TRAIN)
    parser.add_argument('--val', type=int, default=DEMO_NUM_VAL)
    parser.add_argument('--size', type=int, default=128,
                        help='image side in pixels (default: 128)')
    parser.add_argument('--min-size', type=int,
                        help='smallest shape side in pixels (default: 3/16 '
                        'of --size, at least 4)')
    parser.add_argument('--max-size', type=int,
                        help='largest shape side in pixels (default: 9/16 of '
                        '--size)')
    parser.add_argument('--max-objects', type=int, default=3)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    try:
        paths = generate(args.out, num_train=args.train, num_val=args.val,
                         image_size=args.size, max_objects=args.max_objects,
                         min_size=args.min_size, max_size=args.max_size,
                         seed=args.seed)
    except ValueError as error:  # sizes that do not fit
        parser.error(str(error))
    for split, path in paths.items():
        print(f'{split}: {path}')


if __name__ == '__main__':
    main()
