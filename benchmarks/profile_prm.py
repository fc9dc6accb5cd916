"""Where PRM's time goes: an operator profile of one training step.

    python benchmarks/profile_prm.py [--size 2x224x224] [--rows 25]
        [--task train|inference]

Profiles a training step (forward + backward) or an inference pass of
PRM-ResNet-50 and of plain ResNet-50 with torch.profiler and prints, per
operator, the self time each spends, and the difference: the operators PRM
adds or makes slower, then those it removes or makes faster.
"""
import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_backbones import (add_malloc_argument,  # noqa: E402
                             backbone_infer, backbone_train_step,
                             build_backbone, steady_malloc)
from mmdet.utils import register_all_modules  # noqa: E402


def self_times(model, x, steps, step=backbone_train_step):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(model, x)
    return {e.key: (e.self_cpu_time_total / steps / 1000, e.count // steps)
            for e in prof.key_averages()}


def interleaved_self_times(models, x, steps, rounds=3,
                           step=backbone_train_step):
    """Profiles the models in turn, ``rounds`` times, and averages: one
    model measured first and alone would carry the machine's drift."""
    for model in models:
        for _ in range(2):
            step(model, x)
    totals = [dict() for _ in models]
    for _ in range(rounds):
        for total, model in zip(totals, models):
            for key, (t, calls) in self_times(model, x, steps, step).items():
                t0, _ = total.get(key, (0.0, calls))
                total[key] = (t0 + t / rounds, calls)
    return totals


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', default='2x224x224')
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--rows', type=int, default=25)
    parser.add_argument('--task', choices=['train', 'inference'],
                        default='train')
    add_malloc_argument(parser)
    args = parser.parse_args(argv)
    allocator = steady_malloc(args.default_malloc, may_reexec=argv is None)
    register_all_modules()
    from mmengine.logging import MMLogger
    MMLogger.get_instance('mmengine').setLevel('ERROR')
    torch.manual_seed(0)
    b, h, w = (int(v) for v in args.size.split('x'))
    x = torch.randn(b, 3, h, w)
    plain, prm = interleaved_self_times(
        [build_backbone(dict(type='ResNet'), 'cpu'),
         build_backbone(dict(type='PRMResNet'), 'cpu')], x, args.steps,
        step=backbone_train_step if args.task == 'train' else backbone_infer)
    task = 'train step' if args.task == 'train' else 'inference'
    total_plain = sum(t for t, _ in plain.values())
    total_prm = sum(t for t, _ in prm.values())
    print(f'{task} {b}x3x{h}x{w}: ResNet-50 {total_plain:.1f} ms, '
          f'PRM-ResNet-50 {total_prm:.1f} ms ({total_prm / total_plain:.3f}x)'
          f', self CPU time per step; {allocator}\n')
    keys = sorted(set(plain) | set(prm),
                  key=lambda k: -(prm.get(k, (0, 0))[0] -
                                  plain.get(k, (0, 0))[0]))
    print('| operator | ResNet-50 ms | PRM-ResNet-50 ms | added ms | calls '
          'added |\n|---|---|---|---|---|')
    shown = keys[:args.rows] + [k for k in keys[-args.rows // 3:][::-1]
                                if k not in keys[:args.rows]]
    for k in shown:
        tp, cp = plain.get(k, (0.0, 0))
        tq, cq = prm.get(k, (0.0, 0))
        print(f'| {k} | {tp:.2f} | {tq:.2f} | {tq - tp:+.2f} | {cq - cp:+d} |')


if __name__ == '__main__':
    main()
