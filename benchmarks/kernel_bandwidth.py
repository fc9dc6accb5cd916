"""Each Triton kernel of a PRM-ResNet-50 block tail timed on the GPU, with
its achieved bandwidth against the bytes ``kernel_report.py`` counts.

    python benchmarks/kernel_bandwidth.py [--size 2x3x800x1216]
        [--dtypes fp32 bf16 fp16] [--reps 20] [--out FILE.md]

For each stage map of the input size (64 heads), a training step's launches
(forward with BatchNorm on batch statistics, then backward) and an
inference's are recorded (``triton_launches.record_launches``), run once in
order (so every launch sees the state and partials the op gives it), then
each is launched ``--reps`` times back to back between CUDA events: the
time a launch, and bytes / time. The copy bandwidth of the stage-1 map
(``dst.copy_(src)``, 2 x bytes / time) is measured in the same run; a
memory-bound kernel is doing well near it. Needs CUDA.
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kernel_report  # noqa: E402
from triton_launches import run as _run  # noqa: E402

from prm_det.ops.backends import triton_backend  # noqa: E402


def _time(fn, reps):
    fn()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3  # seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size', default='2x3x800x1216')
    parser.add_argument('--dtypes', nargs='+', default=['fp32', 'bf16',
                                                        'fp16'])
    parser.add_argument('--reps', type=int, default=20)
    parser.add_argument('--out')
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit('kernel_bandwidth.py times kernels on a CUDA GPU')
    device = torch.device('cuda')
    batch, height, width = kernel_report.parse_size(args.size)
    stages = kernel_report.stage_shapes(batch, height, width)
    first = torch.empty(stages[0][1], device=device)
    copy_s = _time(lambda: first.clone(), args.reps)
    copy_bw = 2 * first.nbytes / copy_s
    lines = [f'Kernel bandwidth, {torch.cuda.get_device_name()} '
             f'({triton_backend.sm_count(device)} SMs), {args.size}; copy '
             f'bandwidth {copy_bw / 1e9:,.0f} GB/s (clone of the stage-1 '
             'map)', '',
             '| dtype | stage map | task | kernel | grid | us | MB moved | '
             'GB/s | of copy |', '|---|---|---|---|---|---|---|---|---|']
    for name in args.dtypes:
        dtype = kernel_report.DTYPES[name]
        for _, shape, _ in stages:
            for task in ('train', 'inference'):
                launches = kernel_report.record_tail(shape, dtype, task,
                                                     sms=None, device=device)
                for launch in launches:  # in order: state and partials
                    _run(launch)
                torch.cuda.synchronize()
                for launch in launches:
                    seconds = _time(lambda: _run(launch), args.reps)
                    read, written = kernel_report._bytes(launch)
                    moved = read + written
                    lines.append(
                        f"| {name} | {'x'.join(map(str, shape))} | {task} | "
                        f"{launch.name.replace('_kernel', '')} | "
                        f"{'x'.join(map(str, launch.grid))} | "
                        f'{seconds * 1e6:,.1f} | {moved / 1e6:,.1f} | '
                        f'{moved / seconds / 1e9:,.0f} | '
                        f'{moved / seconds / copy_bw:.2f} |')
                print(lines[-1], flush=True)
    text = '\n'.join(lines) + '\n'
    print(text)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(text)
    return 0 if math.isfinite(copy_bw) else 1


if __name__ == '__main__':
    sys.exit(main())
