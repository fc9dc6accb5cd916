"""Eager against torch.compile (and CUDA graphs), side by side in one run.

    python benchmarks/bench_compile.py [--device cuda|cpu] [--size 2x800x1216]
        [--reps 11] [--modes eager default reduce-overhead] [--out FILE.md]

For plain ResNet-50 and PRM-ResNet-50 (PRM on the device's default
backend, as the custom op ``prm_det::block_tail``), a training step
(forward, a loss on every stage's output, backward; BatchNorm in training
mode) in each mode:

- ``eager``;
- ``default``: ``torch.compile(model, fullgraph=True)`` (Inductor);
- ``reduce-overhead``: the same with ``mode='reduce-overhead'``, which
  captures the step in CUDA graphs and replays them (CUDA only).

Before timing, each compiled mode's first step is checked against eager's
on identical copies of the model (outputs and every gradient), so a
replayed graph that computes something else fails the run instead of
timing it. Compile time is the first step's and is reported apart. The
modes are interleaved within each repetition; the table gives medians and
ratios to eager ResNet-50.
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prm_det  # noqa: E402,F401
from mmdet.utils import register_all_modules  # noqa: E402

from bench_backbones import build_backbone, machine, sync  # noqa: E402

MODELS_TO_TIME = {'ResNet-50': dict(type='ResNet'),
                  'PRM-ResNet-50': dict(type='PRMResNet')}


def train_step(model, x):
    for p in model.parameters():
        p.grad = None
    outs = model(x)
    sum(o.float().square().mean() for o in outs).backward()
    return outs


def compiled(model, mode):
    if mode == 'eager':
        return model
    kwargs = {} if mode == 'default' else dict(mode=mode)
    return torch.compile(model, fullgraph=True, **kwargs)


def check_against_eager(name, mode, model, step_model, x):
    """One step of ``step_model`` (a compiled copy of ``model``) against
    eager ``model`` from the same weights and buffers."""
    eager = copy.deepcopy(model)
    expected = [o.detach().clone() for o in train_step(eager, x)]
    got = [o.detach().clone() for o in train_step(step_model, x)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-3,
                                   msg=f'{name} {mode}: output')
    for (pname, p), (_, q) in zip(step_model.named_parameters(),
                                  eager.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-2, atol=1e-3,
                                   msg=f'{name} {mode}: grad of {pname}')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda' if
                        torch.cuda.is_available() else 'cpu')
    parser.add_argument('--size', default=None,
                        help='BxHxW; 2x800x1216 on CUDA, 2x128x128 on CPU')
    parser.add_argument('--reps', type=int, default=11)
    parser.add_argument('--modes', nargs='+', default=None,
                        choices=['eager', 'default', 'reduce-overhead'])
    parser.add_argument('--out', default=None)
    args = parser.parse_args(argv)
    device = args.device
    modes = args.modes or (['eager', 'default', 'reduce-overhead']
                           if device == 'cuda' else ['eager', 'default'])
    size = args.size or ('2x800x1216' if device == 'cuda' else '2x128x128')
    b, h, w = (int(v) for v in size.split('x'))
    register_all_modules()
    torch.manual_seed(0)
    x = torch.randn(b, 3, h, w, device=device)

    steps, compile_s = {}, {}
    for name, cfg in MODELS_TO_TIME.items():
        model = build_backbone(cfg, device)
        model.train()  # mmdet's ResNet.train() returns nothing to chain
        for mode in modes:
            step_model = copy.deepcopy(model)
            fn = compiled(step_model, mode)
            t0 = time.perf_counter()
            if mode != 'eager':
                check_against_eager(name, mode, step_model, fn, x)
            for _ in range(2):  # CUDA graphs record on a later step
                train_step(fn, x)
            sync(device)
            compile_s[name, mode] = time.perf_counter() - t0
            steps[name, mode] = (fn, x)

    times = {key: [] for key in steps}
    for _ in range(args.reps):
        for key, (fn, x_) in steps.items():
            sync(device)
            t0 = time.perf_counter()
            train_step(fn, x_)
            sync(device)
            times[key].append(time.perf_counter() - t0)

    base = statistics.median(times['ResNet-50', 'eager'])
    lines = [f'# torch.compile, training step at {b}x3x{h}x{w}',
             '', f'Machine: {machine(device)}; '
             f'{args.reps} interleaved repetitions, medians.', '',
             '| model | mode | step (ms) | vs eager ResNet-50 | '
             'vs its own eager | first steps incl. compile (s) |',
             '|---|---|---|---|---|---|']
    for (name, mode), ts in times.items():
        med = statistics.median(ts)
        own = statistics.median(times[name, 'eager'])
        lines.append(f'| {name} | {mode} | {med * 1e3:.1f} | '
                     f'{med / base:.3f}x | {med / own:.3f}x | '
                     f'{compile_s[name, mode]:.1f} |')
    lines.append('')
    lines.append('Every compiled mode matched eager (outputs, gradients) '
                 'before it was timed.')
    text = '\n'.join(lines)
    print(text)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(text + '\n')


if __name__ == '__main__':
    main()
