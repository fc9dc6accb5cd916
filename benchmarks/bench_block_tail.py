"""What PRM adds to one residual block, stage by stage: the block's tail.

    python benchmarks/bench_block_tail.py [--size 2x224x224] [--reps 25]
        [--out FILE.md]

A plain ResNet-50 block ends with ``relu(bn(conv3_out) + identity)``; a
PRM-ResNet-50 block with ``relu(prm(bn(conv3_out)) + identity)``, which
prm_det runs as one op each way (``batchnorm_prm_residual``; in inference
written over the conv's output). This times
both at each stage's map size for the given input (64 heads, as in
PRM-ResNet-50), interleaved, for a training step (forward + backward, BN in
train mode), a training step with BN frozen (``norm_eval``, as in the
detection configs) and inference, on the compiled kernel and on the torch
ops of the fast path. Multiplied by the blocks per stage (3, 4, 6, 3), the
added milliseconds are what PRM costs a whole backbone, less Python.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_backbones import (add_malloc_argument,  # noqa: E402
                             interleaved_medians, steady_malloc)
from prm_det.ops import cpu_kernel  # noqa: E402
from prm_det.ops.prm import batchnorm_prm_residual  # noqa: E402

BLOCKS = (3, 4, 6, 3)  # ResNet-50
GROUPS = 64


def prm_params():
    """PRM's parameters away from their initial values."""
    g = GROUPS
    return [(torch.randn(1, g, 1, 1) * 0.3).requires_grad_(),
            torch.randn(1, g, 1, 1).requires_grad_(),
            (torch.randn(1, g, 1) + 1).requires_grad_(),
            (torch.randn(1, g, 1) * 0.3).requires_grad_(),
            torch.rand(1, 2, 1, 1).requires_grad_(),
            torch.ones(1).requires_grad_()]


def tail_fns(shape, task):
    """name -> callable running the block tail once."""
    c = torch.randn(*shape, requires_grad=task != 'inference')
    identity = torch.randn(*shape, requires_grad=task != 'inference')
    upstream = torch.randn(*shape)
    bn = torch.nn.BatchNorm2d(shape[1])
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0)
        bn.running_mean.normal_()
    bn.train(task == 'train step')
    params = prm_params()

    # inference starts each tail from a fresh copy of c, as a block starts
    # from its conv's fresh output, which the PRM tail then writes over
    fresh = (lambda: c.clone()) if task == 'inference' else (lambda: c)

    def plain():  # mmdet's Bottleneck: out = norm3(out); out += id; relu
        out = bn(fresh())
        out += identity
        return torch.relu_(out)

    def prm_tail():
        return batchnorm_prm_residual(fresh(), bn, identity, *params, GROUPS,
                                      reuse_c=task == 'inference')

    def step(fn):
        if task == 'inference':
            def run():
                with torch.no_grad():
                    fn()
        else:
            def run():
                fn().backward(upstream)
        return run

    def torch_ops(run):
        def wrapped():
            with cpu_kernel.kernel_disabled():
                run()
        return wrapped

    fns = {'plain tail': step(plain), 'PRM tail': step(prm_tail),
           'PRM tail (torch ops)': torch_ops(step(prm_tail))}
    if not cpu_kernel.available():
        del fns['PRM tail (torch ops)']  # the same thing
    return fns


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', default='2x224x224')
    parser.add_argument('--reps', type=int, default=25)
    parser.add_argument('--out', default=None)
    add_malloc_argument(parser)
    args = parser.parse_args(argv)
    allocator = steady_malloc(args.default_malloc, may_reexec=argv is None)
    torch.manual_seed(0)
    b, h, w = (int(v) for v in args.size.split('x'))
    lines = [f'Block tails of ResNet-50 at {b}x3x{h}x{w}, CPU, '
             f'{torch.get_num_threads()} threads, torch {torch.__version__}, '
             f'{allocator}; '
             f'medians of {args.reps} interleaved runs; ms per block ("whole '
             f'backbone": summed over its 16 blocks).', '',
             '| task | stage map | blocks | plain tail | PRM tail | added '
             '| PRM tail (torch ops) | added |', '|---|---|---|---|---|---|---|---|']
    for task in ('train step', 'train step, BN frozen', 'inference'):
        total = {}
        for stage, blocks in enumerate(BLOCKS):
            scale = 4 * 2**stage
            shape = (b, 256 * 2**stage, -(-h // scale), -(-w // scale))
            med = {k: v['time'] for k, v in interleaved_medians(
                tail_fns(shape, task), args.reps, 'cpu',
                baseline='plain tail').items()}
            for k, v in med.items():
                total[k] = total.get(k, 0.0) + blocks * v
            lines.append(_row(task, 'x'.join(map(str, shape)), blocks, med))
        lines.append(_row(task, 'whole backbone', sum(BLOCKS), total))
        print('\n'.join(lines[-5:]), flush=True)
    report = '\n'.join(lines) + '\n'
    print('\n' + report)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(report)


def _row(task, where, blocks, med):
    base = med['plain tail']
    cells = [f'{1000 * base:.3f}']
    for k in ('PRM tail', 'PRM tail (torch ops)'):
        if k in med:
            cells += [f'{1000 * med[k]:.3f}',
                      f'{1000 * (med[k] - base):+.3f}']
        else:
            cells += ['', '']
    return f'| {task} | {where} | {blocks} | ' + ' | '.join(cells) + ' |'


if __name__ == '__main__':
    main()
