"""What PRM adds to one residual block, stage by stage: the block's tail.

    python benchmarks/bench_block_tail.py [--device cpu|cuda]
        [--size 2x224x224] [--precisions fp32 bf16 fp16] [--reps 25]
        [--tasks 'train step' 'train step, BN frozen' inference]
        [--backends cpu torch] [--out FILE.md] [--default-malloc]

A plain ResNet-50 block ends with ``relu(bn(conv3_out) + identity)``; a
PRM-ResNet-50 block with ``relu(prm(bn(conv3_out)) + identity)``, which
prm_det runs as one op (``prm_det.ops.prm_block_tail`` with the BatchNorm
folded in). This times, at each stage's map size for the given input (64
heads, as in PRM-ResNet-50), interleaved:

- the plain tail as mmdet's Bottleneck runs it
  (``out = bn(c); out += identity; relu_(out)``);
- the PRM tail on each backend that applies (``cpu`` and ``torch`` on CPU,
  ``triton`` and ``torch`` on CUDA; ``--backends`` to choose), forced with
  ``prm_det.ops.use_backend``;
- one copy of the map (``dst.copy_(src)``), whose time gives the copy
  bandwidth measured in the same run: 2 x map bytes / time;

for a training step (forward + backward, BN in train mode), a training step
with BN frozen (``norm_eval``, as in the detection configs) and inference.
Backward is ``torch.autograd.grad`` of every input (no accumulation into
``.grad``); inference writes a new map (``inplace=False``; a block writes
over its conv's output when nothing else holds it).

The bandwidth limit is the time the PRM tail would take if it only moved
the bytes its kernels must move, at the measured copy bandwidth. Counted in
passes over the map (one pass: one map's bytes read or written), as the
kernels are built: forward reads ``c`` three times (the query's channel
sums, the similarities, the gating; a fourth time for BatchNorm's batch
statistics when BN trains), reads ``identity`` and writes ``y``: 5 passes
(6 when BN trains); backward reads ``grad_y``, ``y`` (the ReLU's mask) and
``c`` twice each (the per-(sample, group) sums, then the gradients) and
writes ``grad_c`` and ``grad_identity``: 8 passes. Per-channel and
per-(sample, group) values are not counted. A training step's limit is thus
14 passes (13 with BN frozen), inference's 5; a copy is 2.

Maps are in the precision's dtype (what a block gets under autocast: the
convolution's output in bfloat16 / float16), BatchNorm and PRM parameters
in float32. On CUDA each timed call runs the tail enough times back to back
to take a few milliseconds (launches queue as in a whole pass) and reports
the time per tail. Multiplied by the blocks per stage (3, 4, 6, 3), the
added milliseconds are what PRM costs a whole backbone, less Python.
"""
import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_backbones import (PRECISIONS, add_malloc_argument,  # noqa: E402
                             interleaved_medians, load_average, machine,
                             steady_malloc, sync)
from prm_det.models.layers.prm import batch_norm_of  # noqa: E402
from prm_det.ops import (PRMOptions, PRMParams, prm_block_tail,  # noqa: E402
                         use_backend)
from prm_det.ops.backends import BACKENDS  # noqa: E402

BLOCKS = (3, 4, 6, 3)  # ResNet-50
GROUPS = 64
TASKS = ('train step', 'train step, BN frozen', 'inference')
DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16,
          'fp16': torch.float16}
DEFAULT_BACKENDS = {'cpu': ('cpu', 'torch'), 'cuda': ('triton', 'torch')}
MIN_CALL_S = {'cpu': 0.0, 'cuda': 0.003}  # one timed call at least


def limit_passes(task: str) -> int:
    """Passes over the map the PRM tail's kernels must make (module doc)."""
    forward = 3 + 1 + 1  # c three times, identity, y
    if task == 'train step':
        forward += 1  # BatchNorm's batch statistics
    backward = 2 * 3 + 2  # grad_y, y, c twice each; grad_c, grad_identity
    return forward if task == 'inference' else forward + backward


def prm_params(device):
    """PRM's parameters away from their initial values."""
    g = GROUPS
    return PRMParams(*(t.to(device).requires_grad_() for t in (
        torch.randn(1, g, 1, 1) * 0.3, torch.randn(1, g, 1, 1),
        torch.randn(1, g, 1) + 1, torch.randn(1, g, 1) * 0.3,
        torch.rand(1, 2, 1, 1), torch.ones(1))))


def applicable_backends(names, device, dtype):
    """The backends of ``names`` that run a ``dtype`` map on ``device``."""
    probe = torch.empty(1, GROUPS, 1, 1, device=device, dtype=dtype)
    return [n for n in names
            if BACKENDS[n].check(probe) is None and BACKENDS[n].available()]


def tail_fns(shape, task, device, dtype, backends):
    """name -> callable running the block tail once ('copy': one copy of
    the map)."""
    train = task != 'inference'
    c = torch.randn(*shape, device=device).to(dtype).requires_grad_(train)
    identity = torch.randn(*shape, device=device).to(dtype)
    identity.requires_grad_(train)
    upstream = torch.randn(*shape, device=device).to(dtype)
    copy_dst = torch.empty_like(c)
    bn = torch.nn.BatchNorm2d(shape[1]).to(device)
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0)
        bn.running_mean.normal_()
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    bn.train(task == 'train step')
    params = prm_params(device)
    options = PRMOptions(groups=GROUPS)
    plain_inputs = [c, identity, bn.weight, bn.bias]

    def plain():  # mmdet's Bottleneck: out = norm3(out); out += id; relu
        out = bn(c)
        out += identity
        return torch.relu_(out)

    def prm_tail():
        return prm_block_tail(c, params, options, identity=identity,
                              norm=batch_norm_of(bn, c), relu=True)

    def step(fn, inputs, backend=None):
        if not train:
            def run():
                with torch.no_grad():
                    fn()
        else:
            def run():
                torch.autograd.grad(fn(), inputs, upstream)
        if backend is None:
            return run

        def forced():
            with use_backend(backend):
                run()
        return forced

    def copy():
        with torch.no_grad():
            copy_dst.copy_(c)

    fns = {'plain tail': step(plain, plain_inputs)}
    for name in backends:
        fns[f'PRM, {name}'] = step(prm_tail, plain_inputs + list(params),
                                   name)
    fns['copy'] = copy
    return fns


def repeated(fns, device):
    """Each callable run ``k`` times per call, ``k`` such that a call takes
    at least MIN_CALL_S on the device; returns the wrapped callables and
    their ``k``."""
    out, counts = {}, {}
    for name, fn in fns.items():
        fn()  # warm-up (compiles Triton kernels, builds the CPU kernel)
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        once = time.perf_counter() - start
        k = max(1, min(1000, math.ceil(MIN_CALL_S[device] / max(once, 1e-7))))
        counts[name] = k
        if k == 1:
            out[name] = fn
        else:
            def run(fn=fn, k=k):
                for _ in range(k):
                    fn()
            out[name] = run
    return out, counts


def time_tails(shape, task, device, dtype, backends, reps):
    """Seconds per tail of every variant (median of interleaved runs)."""
    fns, counts = repeated(tail_fns(shape, task, device, dtype, backends),
                           device)
    stats = interleaved_medians(fns, reps, device, warmup=1,
                                baseline='plain tail')
    return {k: v['time'] / counts[k] for k, v in stats.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda' if
                        torch.cuda.is_available() else 'cpu',
                        choices=['cpu', 'cuda'])
    parser.add_argument('--size', default='2x224x224',
                        help='BxHxW of the backbone input')
    parser.add_argument('--precisions', nargs='+', choices=list(PRECISIONS),
                        default=None, help='map dtypes (default: fp32 on '
                        'CPU, fp32 bf16 fp16 on CUDA)')
    parser.add_argument('--tasks', nargs='+', choices=TASKS,
                        default=list(TASKS))
    parser.add_argument('--backends', nargs='+', choices=list(BACKENDS),
                        default=None, help='PRM backends to time (default: '
                        'cpu torch on CPU, triton torch on CUDA; those that '
                        'cannot run a map are left out)')
    parser.add_argument('--reps', type=int, default=25)
    parser.add_argument('--out', default=None)
    add_malloc_argument(parser)
    args = parser.parse_args(argv)
    allocator = steady_malloc(args.default_malloc, may_reexec=argv is None)
    device = args.device
    if device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device here')
    precisions = args.precisions or (
        list(PRECISIONS) if device == 'cuda' else ['fp32'])
    wanted = args.backends or DEFAULT_BACKENDS[device]
    torch.manual_seed(0)
    b, h, w = (int(v) for v in args.size.split('x'))
    per_dtype = {p: applicable_backends(wanted, device, DTYPES[p])
                 for p in precisions}
    shown = [n for n in wanted if any(n in v for v in per_dtype.values())]
    header = ['task', 'stage map', 'dtype', 'blocks', 'plain tail']
    for name in shown:
        header += [f'PRM, {name}', 'added']
    header += ['copy', 'copy GB/s', 'PRM limit', 'passes',
               f'PRM, {shown[0]} / limit' if shown else 'PRM / limit']
    load = '' if device == 'cuda' else f'load average {load_average()}; '
    lines = [f'Block tails of ResNet-50 at {b}x3x{h}x{w}; {machine(device)}; '
             f'{load}{allocator}; medians of {args.reps} interleaved runs; '
             f'ms per block ("whole backbone": summed over its 16 blocks). '
             f'"added": PRM tail - plain tail. "PRM limit": the passes over '
             f'the map the PRM kernels make (forward: c 3x, +1 for BN batch '
             f'statistics when BN trains, identity, y; backward: grad_y, y '
             f'and c 2x each, grad_c, grad_identity) x half the measured '
             f'copy time (a copy is 2 passes).', '',
             '| ' + ' | '.join(header) + ' |',
             '|' + '---|' * len(header)]
    print('\n'.join(lines), flush=True)
    for task in args.tasks:
        passes = limit_passes(task)
        for precision in precisions:
            dtype = DTYPES[precision]
            backends = per_dtype[precision]
            total = {}
            for stage, blocks in enumerate(BLOCKS):
                scale = 4 * 2**stage
                shape = (b, 256 * 2**stage, -(-h // scale), -(-w // scale))
                med = time_tails(shape, task, device, dtype, backends,
                                 args.reps)
                med['limit'] = passes * med['copy'] / 2
                for k, v in med.items():
                    total[k] = total.get(k, 0.0) + blocks * v
                nbytes = math.prod(shape) * dtype.itemsize
                lines.append(_row(task, 'x'.join(map(str, shape)), precision,
                                  blocks, med, shown, passes,
                                  2 * nbytes / med['copy'] / 1e9))
            lines.append(_row(task, 'whole backbone', precision, sum(BLOCKS),
                              total, shown, passes, None))
            print('\n'.join(lines[-5:]), flush=True)
    report = '\n'.join(lines) + '\n'
    print('\n' + report)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(report)


def _row(task, where, precision, blocks, med, shown, passes, gbps):
    base = med['plain tail']
    cells = [f'{1000 * base:.3f}']
    for name in shown:
        k = f'PRM, {name}'
        if k in med:
            cells += [f'{1000 * med[k]:.3f}',
                      f'{1000 * (med[k] - base):+.3f}']
        else:
            cells += ['', '']
    first = f'PRM, {shown[0]}' if shown else None
    cells += [f'{1000 * med["copy"]:.3f}',
              f'{gbps:.0f}' if gbps is not None else '',
              f'{1000 * med["limit"]:.3f}', str(passes),
              f'{med[first] / med["limit"]:.2f}x' if first in med else '']
    return (f'| {task} | {where} | {precision} | {blocks} | '
            + ' | '.join(cells) + ' |')


if __name__ == '__main__':
    main()
