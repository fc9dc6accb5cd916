"""Where PRM's time goes: an operator profile of one training step.

    python benchmarks/profile_prm.py [--size 2x224x224] [--rows 25]
        [--task train|inference] [--tails [--reps 30]]
        [--backend cpu|torch|triton|reference]

Profiles a training step (forward + backward) or an inference pass of
PRM-ResNet-50 and of plain ResNet-50 with torch.profiler and prints, per
operator, the self time each spends, and the difference: the operators PRM
adds or makes slower, then those it removes or makes faster.

``--tails`` times instead each block's tail (from the last convolution's
output to the block's output: norm, attention, add, ReLU, and the Python
around them) inside whole passes of both backbones, stage by stage, without
the profiler: inside a pass the tails run right after a convolution has
swept the caches, where the same calls cost several times what they do in
a loop (benchmarks/bench_block_tail.py), Python and op set-up above all.

``--backend`` runs PRM on that backend (``prm_det.ops.use_backend``; by
default the one chosen for CPU tensors: the compiled kernel).
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

from prm_det.ops import BACKEND_NAMES, use_backend  # noqa: E402


def on_backend(step, backend):
    """``step`` with PRM forced onto ``backend`` (None: the default)."""
    if backend is None:
        return step

    def forced(model, x):
        with use_backend(backend):
            step(model, x)
    return forced


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
    parser.add_argument('--tails', action='store_true',
                        help='time the block tails inside whole passes')
    parser.add_argument('--reps', type=int, default=30,
                        help='passes per backbone with --tails')
    parser.add_argument('--backend', choices=BACKEND_NAMES, default=None,
                        help='run PRM on this backend (default: the one '
                        'chosen for CPU tensors)')
    add_malloc_argument(parser)
    args = parser.parse_args(argv)
    allocator = steady_malloc(args.default_malloc, may_reexec=argv is None)
    register_all_modules()
    from mmengine.logging import MMLogger
    MMLogger.get_instance('mmengine').setLevel('ERROR')
    torch.manual_seed(0)
    b, h, w = (int(v) for v in args.size.split('x'))
    x = torch.randn(b, 3, h, w)
    if args.tails:
        print(tails_in_passes(x, args.task, args.reps, allocator,
                              args.backend))
        return
    step = backbone_train_step if args.task == 'train' else backbone_infer
    plain, prm = interleaved_self_times(
        [build_backbone(dict(type='ResNet'), 'cpu'),
         build_backbone(dict(type='PRMResNet'), 'cpu')], x, args.steps,
        step=on_backend(step, args.backend))
    task = 'train step' if args.task == 'train' else 'inference'
    total_plain = sum(t for t, _ in plain.values())
    total_prm = sum(t for t, _ in prm.values())
    print(f'{task} {b}x3x{h}x{w}: ResNet-50 {total_plain:.1f} ms, '
          f'PRM-ResNet-50 {total_prm:.1f} ms ({total_prm / total_plain:.3f}x)'
          f', self CPU time per step; PRM backend '
          f'{args.backend or "default"}; {allocator}\n')
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


def tails_in_passes(x, task, reps, allocator, backend=None):
    """Milliseconds per pass spent in the block tails of ResNet-50 and
    PRM-ResNet-50, by stage, inside whole passes run in turn. The plain
    backbone is AttentionResNet without attention: mmdet's ResNet-50, whose
    blocks end in the same _block_tail as PRM's (norm, add, ReLU)."""
    import time
    from collections import defaultdict

    from prm_det.models.backbones import attention_resnet
    inner = attention_resnet._block_tail
    spent = defaultdict(float)
    current = [None]

    def timed_tail(block, names, out, *args, **kwargs):
        start = time.perf_counter()
        y = inner(block, names, out, *args, **kwargs)
        spent[current[0], out.shape[1]] += time.perf_counter() - start
        return y

    step = on_backend(
        backbone_train_step if task == 'train' else backbone_infer, backend)
    models = {'ResNet-50': build_backbone(
        dict(type='AttentionResNet', depth=50, attention=None), 'cpu'),
        'PRM-ResNet-50': build_backbone(dict(type='PRMResNet'), 'cpu')}
    attention_resnet._block_tail = timed_tail
    try:
        for name, model in models.items():  # warm-up, not counted
            current[0] = name
            step(model, x)
        spent.clear()
        for rep in range(reps):
            for name in list(models)[::1 if rep % 2 else -1]:
                current[0] = name
                step(models[name], x)
    finally:
        attention_resnet._block_tail = inner
    channels = sorted({c for _, c in spent})
    task_name = 'train step' if task == 'train' else 'inference'
    lines = [f'Block tails inside whole {task_name} passes at '
             f'{"x".join(map(str, x.shape))}, {torch.get_num_threads()} '
             f'threads, torch {torch.__version__}, {allocator}; PRM backend '
             f'{backend or "default"}; ms per pass, '
             f'mean of {reps} passes each (interleaved)'
             + ('; forward tails only (their backward runs inside autograd '
                'after the pass)' if task == 'train' else '') + '.', '',
             '| stage (channels) | ResNet-50 tails | PRM-ResNet-50 tails | '
             'added |', '|---|---|---|---|']
    totals = [0.0, 0.0]
    for c in channels + [None]:
        if c is None:
            plain, prm = totals
            where = 'all 16 blocks'
        else:
            plain = 1000 * spent['ResNet-50', c] / reps
            prm = 1000 * spent['PRM-ResNet-50', c] / reps
            totals = [totals[0] + plain, totals[1] + prm]
            where = str(c)
        lines.append(f'| {where} | {plain:.2f} | {prm:.2f} | '
                     f'{prm - plain:+.2f} |')
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    main()
