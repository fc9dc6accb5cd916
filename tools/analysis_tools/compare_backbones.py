"""Compare detectors that differ in their backbone: train and evaluate each
config over several seeds, then tabulate box AP (mean ± std over the seeds),
training time and parameters.

    python tools/analysis_tools/compare_backbones.py CONFIG [CONFIG ...]
        [--seeds N] [--work-dir DIR] [--cfg-options k=v ...]

e.g. the demo's four backbones (mmdet's ResNet-18, SE, GC and PRM at half
width) on the generated shapes dataset, three seeds each::

    python tools/analysis_tools/compare_backbones.py configs/demo/*_shapes.py \\
        --seeds 3

Each run (a config and a seed K in 0..N-1) is ``tools/train.py`` then
``tools/test.py`` on the newest checkpoint, each in a subprocess of its own,
in ``<work-dir>/<config name>/seed<K>/`` with ``--cfg-options
randomness.seed=K`` followed by the command's own ``--cfg-options`` (they go
to both tools). A run that crashes loses itself, not the table. The
subprocesses run in the working directory and inherit the environment, so
settings for every run go before the command::

    PRM_DET_BACKEND=torch OMP_NUM_THREADS=1 \\
        python tools/analysis_tools/compare_backbones.py configs/demo/*_shapes.py

Their output goes to ``train.log`` and ``test.log`` in the run's folder.

Stopped (Ctrl-C, a kill, a reboot)? The same command again goes on: runs
that finished are skipped (their ``result.json``, written once a run has
ended), an unfinished training resumes from its newest complete checkpoint
(``tools/train.py --resume``), an evaluation that did not finish is done
again. Failed runs are retried, from their last checkpoint if they left one.
To start a run over, delete its folder.

A run whose training or evaluation exits with an error is recorded as
failed (``result.json``: the phase and its exit status; ``failed.log``: the
last lines of its log) and the sweep goes on; the table counts it, and the
command exits with status 1 at the end.

Results, in ``<work-dir>`` (default ``work_dirs/compare_backbones``):

* ``compare_backbones.md`` (printed too) and ``compare_backbones.json``: per
  config box AP (mean ± sample standard deviation over its finished seeds),
  AP50 and AP75 (means), training time (mean wall time of tools/train.py,
  its start-up included, in minutes; a resumed run counts every attempt, a
  killed one up to the harness's last note of it, a few seconds before the
  kill), parameters (the model built from the config with the
  ``--cfg-options``, counted as get_flops.py counts them) and the runs that
  finished or failed; a header names the machine and the command;
* ``ap_per_seed.png``: the box AP of every run, by config and seed.
"""
import argparse
import json
import os
import os.path as osp
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from typing import Dict, List, NamedTuple, Optional

HERE = osp.dirname(osp.abspath(__file__))
TOOLS = osp.dirname(HERE)  # train.py and test.py, in a checkout or installed
# run from a checkout: its prm_det first (installed, the tools sit in
# prm_det/.mim/tools/ and import the installed package)
_ROOT = osp.dirname(TOOLS)
if osp.isdir(osp.join(_ROOT, 'prm_det')):
    sys.path.insert(0, _ROOT)

RESULT = 'result.json'  # a finished run, ok or failed
PROGRESS = 'attempts.json'  # the phases started so far, with their times
METRICS = 'metrics.json'  # tools/test.py --metrics-out
FAILED_LOG = 'failed.log'
TAIL_LINES = 40
NOTE_EVERY = 5  # seconds between notes of a running phase's time
# COCO box AP, as the PRM paper's Table 4 lists it
AP_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')


class Stopped(Exception):
    """The harness was told to stop (SIGTERM)."""


class Run(NamedTuple):
    config: str
    name: str  # the config's file name without .py
    seed: int
    folder: str

    def path(self, name: str) -> str:
        return osp.join(self.folder, name)

    def __str__(self) -> str:
        return f'{self.name} seed {self.seed}'


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Train and evaluate configs over seeds; tabulate box AP, '
        'training time and parameters.')
    parser.add_argument('configs', nargs='+', metavar='CONFIG',
                        help='config files, one row each')
    parser.add_argument('--seeds', type=int, default=3,
                        help='seeds 0..N-1 for every config. Default: 3')
    parser.add_argument(
        '--work-dir', default=osp.join('work_dirs', 'compare_backbones'),
        help='where runs and results go: <work-dir>/<config name>/seed<K>/. '
        'Default: work_dirs/compare_backbones')
    parser.add_argument(
        '--cfg-options', nargs='+', default=[], metavar='KEY=VALUE',
        help='settings for every run (train and test), as tools/train.py '
        'takes them, e.g. data_root=PATH train_cfg.max_epochs=12')
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f'--seeds must be 1 or more, got {args.seeds}')
    missing = [c for c in args.configs if not osp.isfile(c)]
    if missing:
        parser.error('config file not found: ' + ', '.join(missing))
    names: Dict[str, str] = {}
    for config in args.configs:
        name = config_name(config)
        if name in names:
            parser.error(f'{names[name]} and {config} would share the work '
                         f'dir {osp.join(args.work_dir, name)}: give the '
                         f'configs different file names')
        names[name] = config
    for option in args.cfg_options:
        key = option.split('=', 1)[0]
        if '=' not in option:
            parser.error(f'--cfg-options takes KEY=VALUE, got {option!r}')
        if key in ('randomness', 'randomness.seed'):
            parser.error('--cfg-options: the seed is set by --seeds '
                         f'(randomness.seed=K for K in 0..N-1), got {option}')
    return args


def config_name(config: str) -> str:
    return osp.splitext(osp.basename(config))[0]


def read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path: str, data) -> None:
    """Whole or not at all: a kill leaves the old file or the new one."""
    from prm_det.engine import write_text_atomically
    write_text_atomically(path, json.dumps(data, indent=2) + '\n')


def _on_sigterm(signum, frame):
    raise Stopped()


def run_phase(run: Run, phase: str, command: List[str],
              attempts: List[dict]) -> int:
    """``command`` in a subprocess, its output appended to
    ``<phase>.log``; its wall time is noted in ``attempts`` (and on disk)
    every few seconds, so that a kill of the whole sweep loses at most
    that much of it. Returns the exit status."""
    attempt = dict(phase=phase, command=command, seconds=0.0,
                   returncode=None,
                   started=time.strftime('%Y-%m-%d %H:%M:%S'))
    attempts.append(attempt)
    write_json(run.path(PROGRESS), attempts)
    # unbuffered: a killed run's log keeps its last lines
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    with open(run.path(f'{phase}.log'), 'a') as log:
        log.write(f'\n=== {attempt["started"]}: {shlex.join(command)}\n')
        log.flush()
        start = time.monotonic()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)
        try:
            while True:
                try:
                    returncode = proc.wait(timeout=NOTE_EVERY)
                    break
                except subprocess.TimeoutExpired:
                    attempt['seconds'] = time.monotonic() - start
                    write_json(run.path(PROGRESS), attempts)
        except (KeyboardInterrupt, Stopped) as stop:
            # Ctrl-C reaches the subprocess too (one process group): give it
            # a moment to end by itself; a signal to the harness alone ends
            # it here
            _end(proc, grace=5 if isinstance(stop, KeyboardInterrupt) else 0)
            attempt['seconds'] = time.monotonic() - start
            write_json(run.path(PROGRESS), attempts)
            raise
    attempt.update(seconds=time.monotonic() - start, returncode=returncode)
    write_json(run.path(PROGRESS), attempts)
    return returncode


def _end(proc: subprocess.Popen, grace: float) -> None:
    """Wait ``grace`` seconds for ``proc`` to end, then terminate it, then
    kill it."""
    for stop in (None, proc.terminate, proc.kill):
        if stop is not None:
            stop()
        try:
            proc.wait(timeout=grace if stop is None else 30)
            return
        except subprocess.TimeoutExpired:
            pass


def log_tail(path: str, lines: int = TAIL_LINES) -> str:
    try:
        with open(path, errors='replace') as f:
            return ''.join(f.readlines()[-lines:])
    except OSError:
        return ''


def finish(run: Run, attempts: List[dict], cfg_options: List[str],
           **result) -> dict:
    result = dict(
        config=run.config, seed=run.seed, cfg_options=cfg_options,
        train_seconds=sum(a['seconds'] for a in attempts
                          if a['phase'] == 'train'),
        train_attempts=sum(a['phase'] == 'train' for a in attempts),
        finished=time.strftime('%Y-%m-%d %H:%M:%S'), **result)
    write_json(run.path(RESULT), result)
    return result


def fail(run: Run, attempts: List[dict], cfg_options: List[str], phase: str,
         returncode: Optional[int], reason: str) -> dict:
    """Record ``run`` as failed, its log's last lines in failed.log."""
    tail = log_tail(run.path(f'{phase}.log'))
    with open(run.path(FAILED_LOG), 'w') as f:
        f.write(f'{run}: {reason}\n\nlast lines of {phase}.log:\n{tail}')
    shown = '\n'.join('    ' + line for line in tail.splitlines()[-6:])
    print(f'[compare] {run}: FAILED, {reason}; the last lines of its log are '
          f'in {run.path(FAILED_LOG)}:\n{shown}', flush=True)
    return finish(run, attempts, cfg_options, status='failed', phase=phase,
                  returncode=returncode, reason=reason, box_ap=None)


def do_run(run: Run, cfg_options: List[str]) -> dict:
    """Train and test ``run``, or go on from where an earlier sweep left
    it; returns its result (also written to its result.json)."""
    from prm_det.engine import latest_complete_checkpoint
    done = read_json(run.path(RESULT))
    if done is not None and done.get('status') == 'ok':
        if done.get('cfg_options') != cfg_options:
            print(f'[compare] {run}: finished earlier with --cfg-options '
                  f'{done.get("cfg_options")}, now {cfg_options}: kept '
                  f'(delete {run.folder} to run it again)', flush=True)
        print(f'[compare] {run}: finished earlier (box AP '
              f'{_number(done["box_ap"]["AP"])}), skipped', flush=True)
        return done
    os.makedirs(run.folder, exist_ok=True)
    attempts = read_json(run.path(PROGRESS)) or []
    options = ['--cfg-options', f'randomness.seed={run.seed}'] + cfg_options
    if done is not None:
        print(f'[compare] {run}: failed earlier ({done.get("reason")}), '
              f'retrying', flush=True)

    if not any(a['phase'] == 'train' and a['returncode'] == 0
               for a in attempts):
        resume_from = latest_complete_checkpoint(run.folder)
        print(f'[compare] {run}: training'
              + (f', resuming from {resume_from}' if resume_from else '')
              + f' (log: {run.path("train.log")})', flush=True)
        returncode = run_phase(run, 'train', [
            sys.executable, osp.join(TOOLS, 'train.py'), run.config,
            '--work-dir', run.folder, '--resume'] + options, attempts)
        if returncode != 0:
            return fail(run, attempts, cfg_options, 'train', returncode,
                        f'tools/train.py exited with status {returncode}')

    checkpoint = latest_complete_checkpoint(run.folder)
    if checkpoint is None:
        return fail(run, attempts, cfg_options, 'train', None,
                    'the training left no checkpoint to evaluate')
    metrics_file = run.path(METRICS)
    if osp.exists(metrics_file):
        os.remove(metrics_file)  # an earlier attempt's
    print(f'[compare] {run}: evaluating {checkpoint}', flush=True)
    returncode = run_phase(run, 'test', [
        sys.executable, osp.join(TOOLS, 'test.py'), run.config, checkpoint,
        '--work-dir', run.folder, '--metrics-out', metrics_file] + options,
        attempts)
    metrics = read_json(metrics_file)
    if returncode != 0 or metrics is None:
        return fail(run, attempts, cfg_options, 'test', returncode,
                    f'tools/test.py exited with status {returncode}'
                    + ('' if returncode else f' without writing {METRICS}'))
    from prm_det.evaluation import AP_KEYS, box_ap
    # no box AP at all: the model kept no detection (CocoMetric gives none)
    ap = box_ap(metrics) or dict.fromkeys(name for name, _ in AP_KEYS)
    result = finish(run, attempts, cfg_options, status='ok', box_ap=ap,
                    checkpoint=checkpoint)
    print(f'[compare] {run}: box AP {_number(ap["AP"])}, trained '
          f'{result["train_seconds"] / 60:.1f} min', flush=True)
    return result


def _number(value: Optional[float], digits: int = 1) -> str:
    return 'n/a' if value is None else f'{value:.{digits}f}'


def count_parameters(config: str, cfg_options: List[str]) -> dict:
    """The config's backbone type and its detector's parameters (as
    get_flops.py counts them: every tensor); None where it does not
    build."""
    from mmengine.config import DictAction
    from prm_det.engine import load_config, load_tool
    get_flops = load_tool(osp.join(HERE, 'get_flops.py'))
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    options = parser.parse_args(
        ['--cfg-options'] + cfg_options if cfg_options else []).cfg_options
    try:
        cfg = load_config(config, options)
        backbone = cfg.model.backbone.get('type')
        params = get_flops.parameter_counts(get_flops.build_model(cfg))
    except Exception as error:  # the runs say why; the table says n/a
        print(f'[compare] {config_name(config)}: no parameter count, the '
              f'model does not build: {type(error).__name__}: {error}',
              flush=True)
        return dict(backbone=None, params=None)
    return dict(backbone=backbone, params=params['total'])


def _mean(values: List[float]) -> Optional[float]:
    return statistics.mean(values) if values else None


def summarize(config: str, seeds: List[int], results: Dict[int, dict],
              model: dict) -> dict:
    """One row of the table: the config's runs over its seeds."""
    ok = {seed: r for seed, r in results.items() if r['status'] == 'ok'}
    failed = [seed for seed, r in results.items() if r['status'] != 'ok']
    ap = {name: [r['box_ap'][name] for r in ok.values()
                 if r['box_ap'][name] is not None] for name in AP_NAMES}
    return dict(
        config=config, name=config_name(config), **model,
        seeds=seeds, ok=sorted(ok), failed=sorted(failed),
        no_detections=sorted(s for s, r in ok.items()
                             if r['box_ap']['AP'] is None),
        ap_mean=_mean(ap['AP']),
        ap_std=statistics.stdev(ap['AP']) if len(ap['AP']) > 1 else None,
        **{f'{name.lower()}_mean': _mean(ap[name]) for name in AP_NAMES[1:]},
        train_minutes=_mean([r['train_seconds'] / 60 for r in ok.values()]),
        ap_per_seed={seed: r['box_ap']['AP'] for seed, r in ok.items()},
        runs={seed: results[seed] for seed in sorted(results)})


def machine() -> str:
    import torch
    cpu = platform.processor()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next((line.split(':', 1)[1].strip() for line in f
                        if line.startswith('model name')), cpu)
    except OSError:
        pass
    backend = os.environ.get('PRM_DET_BACKEND')
    return (f'{platform.platform()}, {cpu or "CPU"}, {os.cpu_count()} CPUs, '
            f'torch {torch.__version__} with {torch.get_num_threads()} '
            f'threads, PRM_DET_BACKEND='
            + (backend if backend else 'unset (prm_det chooses)'))


def _runs_cell(row: dict) -> str:
    cell = f'{len(row["ok"])} of {len(row["seeds"])} ok'
    if row['failed']:
        cell += ', failed: seed ' + ', '.join(map(str, row['failed']))
    if row['no_detections']:
        cell += ', no detection (no AP): seed ' + ', '.join(
            map(str, row['no_detections']))
    return cell


def markdown(rows: List[dict], header: dict) -> str:
    lines = [
        '# Backbone comparison', '',
        f'- machine: {header["machine"]}',
        f'- command: `{header["command"]}`',
        f'- seeds: {", ".join(map(str, header["seeds"]))} '
        f'(`randomness.seed`); work dir: `{header["work_dir"]}`', '',
        '| config | backbone | box AP | ' + ' | '.join(AP_NAMES[1:])
        + ' | train (min) | params (M) | runs |',
        '|---' * (len(AP_NAMES) + 5) + '|']
    for row in rows:
        ap = _number(row['ap_mean'])
        if row['ap_std'] is not None:
            ap += f' ± {row["ap_std"]:.1f}'
        # 4 decimals: an attention module adds hundreds of parameters
        params = (_number(row['params'] / 1e6, 4)
                  if row['params'] is not None else 'n/a')
        lines.append(
            f'| `{row["config"]}` | {row["backbone"] or "n/a"} | {ap} | '
            + ''.join(f'{_number(row[name.lower() + "_mean"])} | '
                      for name in AP_NAMES[1:]) +
            f'{_number(row["train_minutes"])} | {params} | '
            f'{_runs_cell(row)} |')
    lines += ['', 'box AP: mean ± sample standard deviation over the seeds '
              'that finished (COCO box AP, %); AP50 to APl, train: means '
              '(APl n/a: no large objects). '
              'train: wall time of tools/train.py (start-up included; a '
              'resumed run: its attempts summed).']
    return '\n'.join(lines) + '\n'


def plot(rows: List[dict], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    markers = 'osD^vP*Xh<>'
    figure, axes = plt.subplots(figsize=(max(4., 1.6 * len(rows) + 1), 4))
    seeds = sorted({s for row in rows for s in row['seeds']})
    step = min(.12, .6 / len(seeds))  # the seeds side by side, within +-.3
    for x, row in enumerate(rows):
        for seed, ap in row['ap_per_seed'].items():
            if ap is None:
                continue
            offset = step * (seeds.index(seed) - (len(seeds) - 1) / 2)
            axes.plot(x + offset, ap, markers[seed % len(markers)],
                      color=f'C{seed % 10}', label=f'seed {seed}')
        if row['ap_mean'] is not None:
            axes.plot([x - .35, x + .35], [row['ap_mean']] * 2, 'k-', lw=1)
    handles = dict(zip(*reversed(axes.get_legend_handles_labels())))
    if handles:
        axes.legend(handles.values(), handles.keys(), fontsize='small')
    axes.set_xticks(range(len(rows)))
    axes.set_xticklabels([row['name'] for row in rows], rotation=15,
                         ha='right', fontsize='small')
    axes.set_xlim(-.5, len(rows) - .5)
    axes.set_ylabel('box AP (%)')
    axes.set_title('box AP per seed (line: mean)')
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from prm_det.engine.work_dir_lock import WorkDirBusy, lock_work_dir
    try:
        lock_work_dir(args.work_dir)  # one sweep per work dir
    except WorkDirBusy as error:
        raise SystemExit(f'error: {error}')
    signal.signal(signal.SIGTERM, _on_sigterm)
    seeds = list(range(args.seeds))
    header = dict(
        machine=machine(), seeds=seeds, work_dir=args.work_dir,
        command=shlex.join([osp.basename(sys.executable)] + (
            sys.argv if argv is None else [sys.argv[0]] + list(argv))))
    results: Dict[str, Dict[int, dict]] = {c: {} for c in args.configs}
    try:
        for config in args.configs:
            for seed in seeds:
                run = Run(config, config_name(config), seed, osp.join(
                    args.work_dir, config_name(config), f'seed{seed}'))
                results[config][seed] = do_run(run, args.cfg_options)
    except (KeyboardInterrupt, Stopped) as stop:
        print(f'\n[compare] stopped: the same command goes on from here '
              f'(finished runs are kept in {args.work_dir})', flush=True)
        # the shell's status for a process ended by SIGINT or SIGTERM
        return 128 + (signal.SIGINT if isinstance(stop, KeyboardInterrupt)
                      else signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # only runs need stopping

    rows = [summarize(c, seeds, results[c],
                      count_parameters(c, args.cfg_options))
            for c in args.configs]
    table = markdown(rows, header)
    out = osp.join(args.work_dir, 'compare_backbones')
    with open(out + '.md', 'w') as f:
        f.write(table)
    write_json(out + '.json', dict(header, configs=rows))
    plot(rows, osp.join(args.work_dir, 'ap_per_seed.png'))
    print('\n' + table + f'\nwritten: {out}.md, {out}.json, '
          f'{osp.join(args.work_dir, "ap_per_seed.png")}', flush=True)
    failed = sum(len(row['failed']) for row in rows)
    if failed:
        print(f'[compare] {failed} of {len(rows) * len(seeds)} runs failed '
              f'(rerun the same command to retry them)', flush=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
