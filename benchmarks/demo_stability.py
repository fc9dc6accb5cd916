"""`make demo`'s box AP across thread counts, PRM backends and seeds.

Trains and evaluates the demo config (``configs/demo/retinanet_prm_r18_shapes.py``,
what ``make demo`` runs) once per (threads, PRM backend, seed) through
``tools/analysis_tools/compare_backbones.py`` (``tools/train.py`` and
``tools/test.py``, one process per run), with ``OMP_NUM_THREADS`` and
``PRM_DET_BACKEND`` set, each (threads, backend) in its own work dir
``<work-dir>/<backend>_<threads>t``. Prints and writes
``<work-dir>/demo_stability.md``: box AP per run, the mean and range, and each
run's train and test time. An interrupted sweep continues where it stopped
(the harness skips finished runs).

    python benchmarks/demo_stability.py [--threads 1 2] [--backends cpu torch]
        [--seeds 3] [--jobs 2] [--work-dir work_dirs/demo_stability]
        [--cfg-options k=v ...]

Run from the folder holding ``data/prm_demo`` (written here first if
missing). ``--jobs 2`` runs the 1-thread sweeps side by side on a 2-core
machine (their times are then under that load; the table says so); sweeps
with more threads run alone.
"""
import argparse
import itertools
import json
import os
import os.path as osp
import platform
import subprocess
import sys
import time
from statistics import mean

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(ROOT, 'configs', 'demo', 'retinanet_prm_r18_shapes.py')
HARNESS = osp.join(ROOT, 'tools', 'analysis_tools', 'compare_backbones.py')
DATA_ROOT = 'data/prm_demo'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--backends', nargs='+', default=['cpu', 'torch'])
    parser.add_argument('--seeds', type=int, default=3)
    parser.add_argument('--jobs', type=int, default=1,
                        help='1-thread sweeps run this many at a time')
    parser.add_argument('--work-dir', default='work_dirs/demo_stability')
    parser.add_argument('--cfg-options', nargs='+', default=[],
                        help='passed on to every run (e.g. a shorter '
                        'schedule for a smoke test)')
    return parser.parse_args(argv)


def sweep_dir(work_dir, backend, threads):
    return osp.join(work_dir, f'{backend}_{threads}t')


def start_sweep(args, backend, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PRM_DET_BACKEND=backend)
    folder = sweep_dir(args.work_dir, backend, threads)
    print(f'[stability] {backend} backend, {threads} thread(s): {folder}',
          flush=True)
    options = ['--cfg-options'] + args.cfg_options if args.cfg_options else []
    return subprocess.Popen([sys.executable, HARNESS, CONFIG, '--seeds',
                             str(args.seeds), '--work-dir', folder] + options,
                            env=env)


def phase_seconds(run_folder):
    """Seconds spent in train and in test (attempts summed)."""
    with open(osp.join(run_folder, 'attempts.json')) as f:
        attempts = json.load(f)
    return {phase: sum(a['seconds'] for a in attempts if a['phase'] == phase)
            for phase in ('train', 'test')}


def table(args, shared, command):
    rows, aps = [], []
    for threads, backend in itertools.product(args.threads, args.backends):
        folder = sweep_dir(args.work_dir, backend, threads)
        summary = osp.join(folder, 'compare_backbones.json')
        if not osp.isfile(summary):
            rows.append(f'| {threads} | {backend} | all | no table '
                        f'({summary}) | | | |')
            continue
        with open(summary) as f:
            row = json.load(f)['configs'][0]
        for seed in range(args.seeds):
            result = row['runs'].get(str(seed))
            if not result or result['status'] != 'ok':
                rows.append(f'| {threads} | {backend} | {seed} | failed | '
                            f'| | |')
                continue
            ap = result['box_ap']['AP']
            aps.append(ap)
            seconds = phase_seconds(osp.join(folder, row['name'],
                                             f'seed{seed}'))
            load = ('2 sweeps at once' if (backend, threads) in shared
                    else 'alone')
            rows.append(
                f'| {threads} | {backend} | {seed} | {ap:.1f} | '
                f'{seconds["train"] / 60:.1f} | {seconds["test"] / 60:.1f} | '
                f'{load} |')
    lines = [
        '# `make demo`: box AP across threads, PRM backends and seeds', '',
        f'- machine: {platform.machine()}, {os.cpu_count()} CPUs, '
        f'Python {platform.python_version()}, torch {torch.__version__}',
        f'- command: `{command}`',
        '- config: `configs/demo/retinanet_prm_r18_shapes.py`, through '
        'tools/train.py and tools/test.py (what `make demo` runs)', '',
        '| threads | PRM backend | seed | box AP | train (min) | test (min) '
        '| machine |', '|---|---|---|---|---|---|---|', *rows, '']
    if aps:
        lines.append(f'{len(aps)} runs: box AP mean {mean(aps):.1f}, range '
                     f'{min(aps):.1f} to {max(aps):.1f} (spread '
                     f'{max(aps) - min(aps):.1f} points).')
    return '\n'.join(lines) + '\n'


def main(argv=None):
    args = parse_args(argv)
    command = 'python benchmarks/demo_stability.py ' + ' '.join(
        sys.argv[1:] if argv is None else argv)
    if not osp.isdir(DATA_ROOT):
        subprocess.run([sys.executable,
                        osp.join(ROOT, 'tools', 'make_shapes.py'), '--out',
                        DATA_ROOT], check=True)
    start = time.time()
    sweeps = list(itertools.product(args.backends, args.threads))
    # (backend, threads) of the sweeps that run side by side
    shared = [s for s in sweeps if s[1] == 1 and args.jobs > 1]
    for i in range(0, len(shared), args.jobs):
        for proc in [start_sweep(args, *s) for s in shared[i:i + args.jobs]]:
            proc.wait()
    for sweep in sweeps:
        if sweep not in shared:
            start_sweep(args, *sweep).wait()
    text = table(args, shared, command)
    print(text + f'(sweep {(time.time() - start) / 60:.1f} min)')
    with open(osp.join(args.work_dir, 'demo_stability.md'), 'w') as f:
        f.write(text)


if __name__ == '__main__':
    main()
