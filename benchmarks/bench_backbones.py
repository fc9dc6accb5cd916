"""Speed and memory of the attention backbones, side by side in one run.

    python benchmarks/bench_backbones.py [--reps 7] [--inference-reps N]
        [--device cpu|cuda] [--precisions fp32 bf16 fp16]
        [--sizes 2x224x224 1x512x832] [--tasks 'train step' inference]
        [--no-detector] [--only VARIANT ...] [--out FILE.md]
        [--default-malloc]

Measures plain ResNet-50 (mmdet's ``ResNet``), SE-, GE-, GC-, SGE-, CBAM-
and PRM-ResNet-50 (on the backend chosen for the device: the compiled
kernels on CPU, the Triton kernels (PRM) or torch ops (the gate tails) on
CUDA), SE, GC and CBAM as modules one after another (the gate tail's
'reference' backend: what they cost before the fused tail), PRM-ResNet-50
forced onto the ``torch`` backend
(``prm_det.ops.use_backend('torch')``) and with the readable reference PRM,
for a training step (forward + backward, all stages trainable, BN in train
mode) and for inference (eval, no_grad), at each input size and precision;
then a whole RetinaNet training step (mmdet's R50-FPN config, 80 classes,
fp32) with each backbone. The table names the backend each variant ran on
(recorded from the op's own choice during a forward pass).
The variants are interleaved within every repetition, so machine noise hits
them alike; the table gives medians and ratios to plain ResNet-50.
Inference, a few times cheaper than a training step and so more exposed to
the machine's drift, gets more repetitions (``--inference-reps``, four times
``--reps`` by default).

Precisions: ``fp32``, or ``bf16`` / ``fp16`` autocast around the forward
pass (backward runs outside it, as with ``torch.autocast`` in training; no
loss scaling: only time and memory are measured). Defaults: fp32 on CPU,
all three on CUDA. Sizes default to 2x224x224 and 1x512x832 on CPU and to
2x800x1216 and 32x224x224 on CUDA (issue 13's table).

Memory: on CUDA the peak allocated during a training step above what was
allocated before it (``torch.cuda.max_memory_allocated``; every model's
weights and the input are allocated before and not counted); on CPU, where
torch keeps no such counter, the bytes of tensors autograd saves for
backward during the forward pass (the activation memory that dominates a
training step's peak), counted once per storage.

Allocator: on glibc the script re-runs itself with malloc keeping freed
memory (``GLIBC_TUNABLES``), as jemalloc and tcmalloc do: with glibc's
defaults each repetition page-faults freed feature maps back in, thousands
of faults a pass whose count depends on the order of earlier frees.
``--default-malloc`` times without it.
"""
import argparse
import contextlib
import gc
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prm_det  # noqa: E402,F401
from prm_det.ops import backends as prm_backends  # noqa: E402
from prm_det.ops import use_backend  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402

BACKBONES = {
    'ResNet-50': dict(type='ResNet'),
    'SE-ResNet-50': dict(type='SEResNet'),
    'GE-ResNet-50': dict(type='GEResNet'),
    'GC-ResNet-50': dict(type='GCResNet'),
    'SGE-ResNet-50': dict(type='SGEResNet'),
    'CBAM-ResNet-50': dict(type='CBAMResNet'),
    'PRM-ResNet-50': dict(type='PRMResNet'),
    'SE-ResNet-50 (modules)': dict(type='SEResNet'),
    'GC-ResNet-50 (modules)': dict(type='GCResNet'),
    'CBAM-ResNet-50 (modules)': dict(type='CBAMResNet'),
    'PRM-ResNet-50 (torch backend)': dict(type='PRMResNet'),
    'PRM-ResNet-50 (reference PRM)': dict(
        type='PRMResNet', attention=dict(reference=True)),
    'LR-ResNet-50': dict(type='LRResNet'),
    # mmdet's 7x7 conv stem in place of the paper's full-resolution 1x1
    # conv + local relation stem: what the stem costs
    'LR-ResNet-50 (conv stem)': dict(type='LRResNet', lr_stem=False),
    'LR-ResNet-50 (unfold)': dict(type='LRResNet'),
}
# variants that run the same model in another mode: the gate attentions as
# modules one after another ('reference': the fused tail's readable form)
CONTEXTS = {'PRM-ResNet-50 (torch backend)': lambda: use_backend('torch'),
            'SE-ResNet-50 (modules)': lambda: use_backend('reference'),
            'GC-ResNet-50 (modules)': lambda: use_backend('reference'),
            'CBAM-ResNet-50 (modules)': lambda: use_backend('reference'),
            # the local relation aggregation's readable form (F.unfold)
            'LR-ResNet-50 (unfold)': lambda: use_backend('reference')}
PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
DEFAULT_SIZES = {'cpu': ['2x224x224', '1x512x832'],
                 'cuda': ['2x800x1216', '32x224x224']}


def in_context(name: str, fn: Callable) -> Callable:
    """``fn`` run inside the variant's context (if it has one)."""
    if name not in CONTEXTS:
        return fn

    def wrapped():
        with CONTEXTS[name]():
            return fn()

    return wrapped


def autocast(device: str, precision: str):
    """``torch.autocast`` to the precision's dtype (nothing for fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=dtype)


def backend_name(module) -> str:
    """A backend module's name ('cpu', 'triton', 'torch'); None is the
    readable reference."""
    return 'reference' if module is None else prm_backends.name_of(module)


@contextlib.contextmanager
def recording_backends(chosen: set):
    """Records the name of every backend the PRM op and the gate tails
    choose inside."""
    select = prm_backends.select

    def recording(c, options):
        module = select(c, options)
        chosen.add(f'{backend_name(module)} ({str(c.dtype)[6:]})')
        return module

    prm_backends.select = recording
    try:
        yield
    finally:
        prm_backends.select = select


def sync(device):
    if device == 'cuda':
        torch.cuda.synchronize()


def build_backbone(cfg, device):
    model = MODELS.build(dict(cfg, depth=50, frozen_stages=-1,
                              norm_eval=False, init_cfg=None))
    model.init_weights()
    with torch.no_grad():  # move attention away from its identity-like init
        for name, p in model.named_parameters():
            if any(k in name for k in ('.prm.', '.se.', '.context_block.',
                                       '.sge.', '.cbam.')):
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(device)


def backbone_train_step(model, x, precision='fp32'):
    model.train()
    model.zero_grad(set_to_none=True)
    with autocast(x.device.type, precision):
        outs = model(x)
    sum(o.float().mean() for o in outs).backward()


def backbone_infer(model, x, precision='fp32'):
    model.eval()
    with torch.no_grad(), autocast(x.device.type, precision):
        model(x)


TASKS = {'train step': backbone_train_step, 'inference': backbone_infer}


def saved_activation_bytes(fn) -> int:
    seen = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except Exception:  # noqa: BLE001 (sparse or opaque tensors)
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def peak_memory(fn, device) -> int:
    """Bytes a training step takes at its peak (see the module's doc)."""
    if device == 'cuda':
        gc.collect()
        torch.cuda.empty_cache()
        sync(device)
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - before
    return saved_activation_bytes(fn)


def interleaved_medians(fns: Dict[str, Callable], reps: int, device: str,
                        warmup: int = 2,
                        baseline: str = 'ResNet-50') -> Dict[str, dict]:
    """Runs every variant once per repetition (rotating the order) and
    returns, per variant, the median time and the median of its
    per-repetition ratio to ``baseline``: variants timed back to back see
    the same machine, so the paired ratio cancels drifts in the machine's
    speed that last longer than a repetition."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    names = list(fns)
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    base = times[baseline]
    return {k: dict(time=statistics.median(v),
                    ratio=statistics.median(t / b for t, b in zip(v, base)))
            for k, v in times.items()}


def detector_step_fns(device, size):
    from mmdet.testing import demo_mm_inputs
    from mmengine.hub import get_config
    base = get_config('mmdet::retinanet/retinanet_r50_fpn_1x_coco.py')
    fns = {}
    packed = demo_mm_inputs(1, [[3, *size]], num_items=[5])
    for name, cfg in BACKBONES.items():
        model_cfg = base.model.copy()
        model_cfg.backbone = dict(base.model.backbone, **cfg, init_cfg=None)
        model = MODELS.build(model_cfg).to(device)
        model.init_weights()
        model.train()
        data = model.data_preprocessor(packed, True)

        def step(model=model, data=data):
            model.zero_grad(set_to_none=True)
            losses = model(**data, mode='loss')
            total = sum(sum(v) if isinstance(v, list) else v
                        for v in losses.values())
            total.backward()

        fns[name] = in_context(name, step)
    return fns


def fmt_table(rows, baseline='ResNet-50'):
    lines = ['| task | input | precision | backbone | backend (maps) '
             '| median ms | vs ResNet-50 | memory MiB | vs ResNet-50 |',
             '|---|---|---|---|---|---|---|---|---|']
    # time ratio: the median of per-repetition ratios (see interleaved_medians)
    for (task, size, precision), stats in rows.items():
        base_m = stats[baseline].get('mem')
        for name, s in stats.items():
            mem = s.get('mem')
            mem_s = f'{mem / 2**20:.0f}' if mem else ''
            mem_r = f'{mem / base_m:.3f}x' if mem and base_m else ''
            lines.append(f'| {task} | {size} | {precision} | {name} | '
                         f'{s.get("backend") or "-"} | {1000 * s["time"]:.1f}'
                         f' | {s["ratio"]:.3f}x | {mem_s} | {mem_r} |')
    return '\n'.join(lines)


def record_backends(fns: Dict[str, Callable]) -> Dict[str, str]:
    """Runs each variant once and returns the PRM backends it ran on (and
    the dtype of the maps they got), '' for a variant without PRM."""
    names = {}
    for name, fn in fns.items():
        chosen = set()
        with recording_backends(chosen):
            fn()
        names[name] = ', '.join(sorted(chosen))
    return names


# glibc's malloc hands freed feature maps back to the kernel and page-faults
# them in again on the next repetition; how much of that a run pays depends
# on the order of earlier frees (4,700 to 15,600 faults a ResNet-50 pass in
# separate runs of the same model). Keeping freed memory in the heap
# (jemalloc and tcmalloc, which PyTorch's CPU guides recommend, do likewise)
# leaves the compute to be compared.
STEADY_MALLOC = ('glibc.malloc.trim_threshold=4294967296:'
                 'glibc.malloc.mmap_threshold=33554432')


def steady_malloc(default_malloc: bool, may_reexec: bool) -> str:
    """Re-runs this script (``may_reexec``: run from the command line) with
    glibc's malloc keeping freed memory, unless ``default_malloc`` or not on
    glibc; returns the allocator's line for the report."""
    if 'glibc.malloc.trim_threshold' in os.environ.get('GLIBC_TUNABLES', ''):
        return ('glibc malloc keeping freed memory (GLIBC_TUNABLES '
                'trim_threshold=4 GiB, mmap_threshold=32 MiB; '
                '--default-malloc to run without)')
    if not default_malloc and may_reexec and \
            platform.libc_ver()[0] == 'glibc':
        env = dict(os.environ, GLIBC_TUNABLES=':'.join(
            filter(None, [os.environ.get('GLIBC_TUNABLES'), STEADY_MALLOC])))
        os.execve(sys.executable,
                  [sys.executable, os.path.abspath(sys.argv[0]),
                   *sys.argv[1:]], env)
    return 'default malloc'


def add_malloc_argument(parser):
    parser.add_argument('--default-malloc', action='store_true',
                        help="time with glibc malloc's defaults (freed maps "
                        'returned to the kernel and faulted in again)')


def cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device) -> str:
    """The machine, in words, with the versions that decide the speed."""
    versions = f'torch {torch.__version__}'
    if device == 'cuda':
        try:
            import triton
            versions += f', triton {triton.__version__}'
        except ImportError:
            versions += ', no triton'
        props = torch.cuda.get_device_properties(0)
        return (f'{torch.cuda.get_device_name()} '
                f'({props.total_memory / 2**30:.0f} GiB), CUDA '
                f'{torch.version.cuda}; {versions}')
    return (f'{cpu_model()}, {torch.get_num_threads()} threads '
            f'({os.cpu_count()} CPUs visible); {versions}')


def load_average() -> str:
    """The 1-minute load average and the CPUs, for the report: on a shared
    CPU machine the other processes' load says how far the absolute times
    are from an idle machine's (the interleaved ratios cancel most of it)."""
    try:
        return f'{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs'
    except (AttributeError, OSError):
        return 'unknown'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--reps', type=int, default=7)
    parser.add_argument('--inference-reps', type=int, default=None,
                        help='repetitions of inference (default: 4 x reps)')
    parser.add_argument('--device', default='cuda' if
                        torch.cuda.is_available() else 'cpu')
    parser.add_argument('--precisions', nargs='+', choices=list(PRECISIONS),
                        default=None, help='fp32, and bf16 / fp16 autocast '
                        'around the forward pass (default: fp32 on CPU, all '
                        'three on CUDA)')
    parser.add_argument('--sizes', nargs='+', default=None,
                        help='BxHxW inputs (default: 2x224x224 1x512x832 on '
                        'CPU, 2x800x1216 32x224x224 on CUDA)')
    parser.add_argument('--detector-size', default='512x832')
    parser.add_argument('--no-detector', action='store_true')
    parser.add_argument('--tasks', nargs='+', choices=list(TASKS),
                        default=list(TASKS),
                        help='backbone tasks to time at each size')
    parser.add_argument('--only', nargs='+', choices=list(BACKBONES))
    parser.add_argument('--out', default=None)
    add_malloc_argument(parser)
    args = parser.parse_args(argv)
    allocator = steady_malloc(args.default_malloc, may_reexec=argv is None)
    device = args.device
    if device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device here')
    precisions = args.precisions or (
        list(PRECISIONS) if device == 'cuda' else ['fp32'])
    sizes = args.sizes or DEFAULT_SIZES.get(device, DEFAULT_SIZES['cpu'])
    reps = {task: args.reps for task in TASKS}
    reps['inference'] = args.inference_reps or 4 * args.reps
    register_all_modules()
    from mmengine.logging import MMLogger
    MMLogger.get_instance('mmengine').setLevel('ERROR')  # init_weights chatter
    torch.manual_seed(0)
    backbones = {k: v for k, v in BACKBONES.items()
                 if not args.only or k in args.only or k == 'ResNet-50'}
    models = {k: build_backbone(v, device) for k, v in backbones.items()}
    load_before = load_average()
    rows = {}
    for size in sizes:
        b, h, w = (int(v) for v in size.split('x'))
        x = torch.randn(b, 3, h, w, device=device)
        for task in args.tasks:
            step = TASKS[task]
            for precision in precisions:
                fns = {k: in_context(k, lambda m=m, s=step, x=x, p=precision:
                                     s(m, x, p))
                       for k, m in models.items()}
                ran_on = record_backends(fns)  # also the first warm-up
                stats = interleaved_medians(fns, reps[task], device, warmup=1)
                for k in stats:
                    stats[k]['backend'] = ran_on[k]
                if task == 'train step':
                    for k, fn in fns.items():
                        stats[k]['mem'] = peak_memory(fn, device)
                key = (task, f'{b}x3x{h}x{w}', precision)
                rows[key] = stats
                print(fmt_table({key: stats}), flush=True)
    if not args.no_detector:
        h, w = (int(v) for v in args.detector_size.split('x'))
        fns = detector_step_fns(device, (h, w))
        fns = {k: v for k, v in fns.items() if k in backbones}
        ran_on = record_backends(fns)
        stats = interleaved_medians(fns, args.reps, device, warmup=0)
        for k, fn in fns.items():
            stats[k]['backend'] = ran_on[k]
            stats[k]['mem'] = peak_memory(fn, device)
        rows[('RetinaNet train step', f'1x3x{h}x{w}', 'fp32')] = stats
    mem_note = ('peak allocated during the step, above what was allocated '
                'before it (CUDA)' if device == 'cuda' else
                'tensors saved for backward (CPU)')
    load = ('' if device == 'cuda' else f'load average {load_before} at '
            f'the start, {load_average()} at the end; ')
    report = (f'Machine: {machine(device)}; {load}{allocator}; '
              f'medians of {args.reps} interleaved runs, '
              f'{reps["inference"]} for inference (ratios: median of '
              f'the per-run ratios); memory: {mem_note}; bf16/fp16: autocast '
              f'around the forward pass.'
              f'\n\n' + fmt_table(rows) + '\n')
    print('\n' + report)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(report)
    return rows


if __name__ == '__main__':
    main()
