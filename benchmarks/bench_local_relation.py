"""The local relation layer against the 3x3 convolution it replaces and
against its unfold reference, side by side in one run.

    python benchmarks/bench_local_relation.py [--batch 2] [--reps 9]
        [--widths 104 208 416 832] [--sizes 56 28 14 7] [--out FILE.md]

For each LR-ResNet stage (bottleneck width, map side at 224x224 input) the
variants run interleaved (the same machine state for each repetition):

- ``conv3x3``: ``nn.Conv2d(width, width, 3, padding=1)``, what a ResNet's
  bottleneck has there;
- ``LR layer``: ``LocalRelation2d(width, width, 7)`` with the aggregation on
  the machine's default backend (the C++ kernel on CPU);
- ``LR layer (unfold)``: the same layer with the readable reference
  (``use_backend('reference')``: k * k windows materialized);
- ``aggregation``, ``aggregation (unfold)``: the op alone on the layer's
  query, key, value and prior.

Time: forward (inference, no grad) and a training step (forward and
backward of the output's mean), medians; the ratio column is the median of
the per-repetition ratios to the convolution. Memory: the bytes autograd
saves for backward (distinct storages), against the convolution's.
"""
import argparse
import os
import os.path as osp
import platform
import sys

import torch
from torch import nn

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

from bench_backbones import (interleaved_medians,  # noqa: E402
                             saved_activation_bytes)

from prm_det.models.layers import LocalRelation2d  # noqa: E402
from prm_det.ops import use_backend  # noqa: E402
from prm_det.ops.local_relation_op import (local_relation,  # noqa: E402
                                           relation_backend)


def variants(width: int, side: int, batch: int):
    """{name: (train step, inference)} for one stage."""
    torch.manual_seed(0)
    x = torch.randn(batch, width, side, side, requires_grad=True)
    conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
    layer = LocalRelation2d(width, width, kernel_size=7)
    with torch.no_grad():
        q, k, prior = layer.query(x), layer.key(x), layer.prior()
    q, k, prior = (t.detach().requires_grad_() for t in (q, k, prior))

    def aggregate():
        return local_relation(q, k, x, prior, 7)

    def run(fn, backend=None):
        def train():
            x.grad = None
            with use_backend(backend) if backend else _nothing():
                fn().mean().backward()

        def infer():
            with torch.no_grad(), (use_backend(backend) if backend
                                   else _nothing()):
                fn()
        return train, infer

    return {
        'conv3x3': run(lambda: conv(x)),
        'LR layer': run(lambda: layer(x)),
        'LR layer (unfold)': run(lambda: layer(x), 'reference'),
        'aggregation': run(aggregate),
        'aggregation (unfold)': run(aggregate, 'reference'),
    }, x


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--reps', type=int, default=9)
    parser.add_argument('--widths', type=int, nargs='+',
                        default=[104, 208, 416, 832])
    parser.add_argument('--sizes', type=int, nargs='+',
                        default=[56, 28, 14, 7])
    parser.add_argument('--out')
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    lines = ['| stage map | variant | train ms | vs conv3x3 | inference ms '
             '| vs conv3x3 | saved MiB | vs conv3x3 |',
             '|---|---|---|---|---|---|---|---|']
    backend = None
    for width, side in zip(args.widths, args.sizes):
        fns, x = variants(width, side, args.batch)
        backend = relation_backend(x)
        train = interleaved_medians({n: f[0] for n, f in fns.items()},
                                    args.reps, 'cpu', baseline='conv3x3')
        infer = interleaved_medians({n: f[1] for n, f in fns.items()},
                                    args.reps, 'cpu', baseline='conv3x3')
        memory = {}
        for name, (step, _) in fns.items():
            memory[name] = saved_activation_bytes(step)
        for name in fns:
            lines.append(
                f'| {args.batch}x{width}x{side}x{side} | {name} | '
                f'{1000 * train[name]["time"]:.2f} | '
                f'{train[name]["ratio"]:.2f}x | '
                f'{1000 * infer[name]["time"]:.2f} | '
                f'{infer[name]["ratio"]:.2f}x | '
                f'{memory[name] / 2**20:.2f} | '
                f'{memory[name] / memory["conv3x3"]:.2f}x |')
        print('\n'.join(lines[-len(fns):]), flush=True)
    report = (f'Machine: {platform.platform()}, {os.cpu_count()} CPUs, '
              f'{platform.processor() or "cpu"}; torch {torch.__version__}; '
              f'float32, kernel 7, 8 channels per group; the op on '
              f'{backend!r}; medians of {args.reps} interleaved runs.\n\n'
              + '\n'.join(lines) + '\n')
    print(report)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(report)


if __name__ == '__main__':
    main()
