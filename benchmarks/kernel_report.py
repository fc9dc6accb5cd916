"""Every launch of PRM's Triton kernels in a PRM-ResNet-50, compiled for a
GPU target on this machine (no GPU needed): registers, spills, warps
resident per SM and the bytes each launch moves.

    python benchmarks/kernel_report.py [--sizes 2x3x800x1216 ...]
        [--dtypes fp32 bf16 fp16] [--targets sm_90a sm_80]
        [--out FILE.md] [--json FILE.json] [--check] [--local-relation]

For each input size the PRM-ResNet-50 block tails (``relu(prm(bn(c)) +
identity)``, 64 heads; stages of 3, 4, 6 and 3 blocks at strides 4 to 32)
are run through the ``triton`` backend with its launches recorded instead
of run (``triton_launches.record_launches``): a training step's forward
(BatchNorm on batch statistics) and backward, and an inference (BatchNorm
in eval, written over the convolution's output). The backend plans for the
GPU's SM count; on CPU tensors it assumes an H100/H200's 132, so the grids
here are the ones those GPUs get. Each distinct launch (kernel,
constexprs, argument types and Triton's specialization) is compiled with
``triton.compile`` for the target and its ``ptxas -v`` read (Triton's own
ptxas and flags); results are cached under Triton's cache directory.

Warps resident per SM = min(programs / SMs, programs that fit) x warps a
program, where registers (65,536 a SM, allocated per warp in units of 256),
shared memory, 64 warps and 32 programs an SM limit the programs that fit.
Bytes: each map a launch reads or writes (the whole map over all its
programs), and the split partials each program combines (every program of
a (sample, group) reads all of them). The op's minimum traffic is reading
each input map once and writing each output once: forward c and identity
in, y out; backward dL/dy, y (the ReLU's mask) and c in, dL/dc and
dL/didentity out; inference c and identity in, y out.

``--local-relation`` reports the LR-Net aggregation's kernels
(``local_relation_triton``) instead: forward and backward of each local
relation layer of an LR-ResNet-50 (``LR_LAYERS``: k = 7, 8 channels a
group, strides 1 and 2), with the same columns; a launch's bytes are the
maps it reads and writes once (its k x k window's re-reads are the
cache's).

``--check`` exits 1 when a launch spills, or moves at least ``--min-mb``
(8 MB: about 3 us of an H100's 3.35 TB/s, a launch's own latency; a
smaller launch costs its latency whatever its occupancy) and keeps fewer
than ``--min-warps`` (8) warps resident per SM;
``tests/test_benchmarks/test_kernel_report.py`` runs it so.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if os.environ.get('TRITON_INTERPRET') == '1':
    sys.exit('kernel_report.py compiles the kernels: run it without '
             'TRITON_INTERPRET=1')

import torch  # noqa: E402

from prm_det.ops.backends import triton_backend, triton_plan  # noqa: E402
from prm_det.ops.contract import (BatchNorm, Needs, PRMOptions,  # noqa: E402
                                  PRMParams, Saved)
from triton_launches import record_launches  # noqa: E402  (benchmarks/)

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16,
          'fp16': torch.float16, 'fp64': torch.float64}
# compute capability, SMs, shared memory an SM (bytes): the data sheets'
TARGETS = {'sm_90a': (90, 132, 228 * 1024), 'sm_80': (80, 108, 164 * 1024)}
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_PROGRAMS_PER_SM = 32
STAGES = ((256, 4, 3), (512, 8, 4), (1024, 16, 6), (2048, 32, 3))
GROUPS = 64
# what each kernel reads and writes of the maps (argument, the constexpr
# that must be set, or None), and the partials it combines
MAPS = {
    'channel_partial_kernel': ((('c_ptr', None), ), ()),
    'fwd_sums_kernel': ((('x_ptr', None), ), ()),
    'fwd_stats_kernel': ((('x_ptr', None), ), ()),
    'fwd_out_kernel': ((('x_ptr', None), ('id_ptr', 'HAS_ID')),
                       (('y_ptr', None), )),
    'bwd_sums_kernel': ((('gy_ptr', None), ('y_ptr', 'RELU'),
                         ('x_ptr', None)), ()),
    'bwd_out_kernel': ((('gy_ptr', None), ('y_ptr', 'RELU'),
                        ('x_ptr', None)),
                       (('gx_ptr', None), ('gid_ptr', 'WRITE_ID'))),
    'bn_backward_kernel': ((('gx_ptr', None), ('c_ptr', None)),
                           (('gx_ptr', None), )),
    # the gate tails (prm_det/ops/backends/gate_triton_kernels.py)
    'moments_kernel': ((('c_ptr', None), ), ()),
    'tail_fwd_kernel': ((('c_ptr', None), ('id_ptr', 'HAS_ID'),
                         ('gate_ptr', 'HAS_GATE')), (('y_ptr', None), )),
    'tail_bwd_kernel': ((('gy_ptr', None), ('y_ptr', 'HAS_Y'),
                         ('c_ptr', None), ('gate_ptr', 'HAS_GATE')),
                        (('gc_ptr', None), ('masked_ptr', 'WRITE_MASKED'),
                         ('dgate_ptr', 'HAS_GATE'))),
    'gate_grad_kernel': ((('dgate_ptr', None), ('gate_ptr', 'HAS_AFFINE')),
                         (('ggate_ptr', None), )),
    # the local relation aggregation (local_relation_triton_kernels.py)
    'lr_fwd_kernel': ((('q_ptr', None), ('k_ptr', None), ('v_ptr', None),
                       ('lse_ptr', 'RECOMPUTE'), ('go_ptr', 'RECOMPUTE')),
                      (('out_ptr', None), ('lse_ptr', '!RECOMPUTE'),
                       ('dsum_ptr', 'RECOMPUTE'))),
    'lr_bwd_query_kernel': ((('go_ptr', None), ('q_ptr', None),
                             ('k_ptr', None), ('v_ptr', None),
                             ('lse_ptr', None), ('dsum_ptr', None)),
                            (('gq_ptr', None), ('part_ptr', None))),
    'lr_bwd_kv_kernel': ((('go_ptr', None), ('q_ptr', None), ('k_ptr', None),
                          ('v_ptr', None), ('lse_ptr', None),
                          ('dsum_ptr', None)),
                         (('gk_ptr', None), ('gv_ptr', None))),
}
# the tails: PRM's op, and the gate tail with each kind of gate (SE, GE and
# GC: per channel only; SGE: 64 groups' gates per position, as logits;
# CBAM: one gate per position)
TAILS = ('prm', 'se', 'sge', 'cbam')
# maps the op must move at least, per block tail: PRM's (above) and the
# gate tail's (train: moments c; forward c, identity, y; backward dL/dy, y,
# c, dL/dc, dL/didentity; inference: moments and forward)
MINIMUM_MAPS = {'prm': {'train': 8, 'inference': 3},
                'gate': {'train': 9, 'inference': 4}}
COMBINED = {  # partials every program of a pair reads: scratch argument
    'fwd_stats_kernel': ('sum_ptr', 'best_ptr', 'idx_ptr'),
    'fwd_out_kernel': ('sum_ptr', 'best_ptr', 'idx_ptr', 's_ptr'),
    'bwd_out_kernel': ('pair_ptr', 'chan_ptr'),
}
USED = {'pair_ptr': 17 / 32}  # of a scratch row, the part read
# BatchNorm's partials, read by every program of every pair of a channel
BN_PARTIALS = ('fwd_sums_kernel', 'fwd_stats_kernel', 'fwd_out_kernel')


def parse_size(text):
    b, ch, h, w = (int(v) for v in text.lower().split('x'))
    if ch != 3:
        raise SystemExit(f'--sizes {text}: give an image batch, bx3xHxW')
    return b, h, w


def stage_shapes(batch, height, width):
    """(stage, [b, C, h, w], blocks) of a ResNet-50's block tails: the stem
    and the max pool halve twice (ceil), each later stage once more."""
    shapes = []
    for i, (channels, stride, blocks) in enumerate(STAGES):
        shapes.append((i + 1, (batch, channels, math.ceil(height / stride),
                               math.ceil(width / stride)), blocks))
    return shapes


def _params(dtype=torch.float32):
    return PRMParams(torch.zeros(1, GROUPS, 1, 1, dtype=dtype),
                     torch.ones(1, GROUPS, 1, 1, dtype=dtype),
                     torch.ones(1, GROUPS, 1, dtype=dtype),
                     torch.zeros(1, GROUPS, 1, dtype=dtype),
                     torch.full((1, 2, 1, 1), 0.5, dtype=dtype),
                     torch.ones(1, dtype=dtype))


def _norm(channels, training):
    return BatchNorm(torch.ones(channels), torch.zeros(channels),
                     torch.zeros(channels), torch.ones(channels), training,
                     0.1, 1e-5)


@contextlib.contextmanager
def planned_for(sms):
    """The backend plans for ``sms`` SMs (the target's) in the block."""
    original = triton_backend.sm_count
    triton_backend.sm_count = lambda device: sms
    try:
        yield
    finally:
        triton_backend.sm_count = original


def record_tail(shape, dtype, task, sms=triton_plan.SMS_ON_CPU,
                device='cpu'):
    """The launches of one block tail (recorded, not run): task 'train'
    (forward + backward) or 'inference', planned for ``sms`` SMs (None: the
    device's own). On CPU the maps are allocated, never touched; elsewhere
    they hold random values, for the launches to be run and timed."""
    make = torch.empty if device == 'cpu' else torch.randn
    c = make(shape, dtype=dtype, device=device)
    identity = make(shape, dtype=dtype, device=device)
    options = PRMOptions(groups=GROUPS)
    params = PRMParams(*(p.to(device) for p in _params()))
    norm = _norm(shape[1], task == 'train')
    norm = norm._replace(**{k: getattr(norm, k).to(device) for k in (
        'weight', 'bias', 'running_mean', 'running_var')})
    plan = planned_for(sms) if sms else contextlib.nullcontext()
    with plan, record_launches() as launches:
        out = triton_backend.forward(c, norm, identity, True, params,
                                     options, inplace=task == 'inference')
        if task == 'train':
            saved = Saved(c, out.y, norm, out.save_mean, out.save_invstd,
                          params, out.state, options, True)
            triton_backend.backward(make(shape, dtype=dtype, device=device),
                                    saved, Needs(True, True, True))
    return launches


def record_gate_tail(shape, dtype, task, tail):
    """The launches of one gate tail (recorded, not run): the moments, the
    forward and, for 'train', the backward, with tail 'se' (no gate),
    'sge' (64 groups, gate logits) or 'cbam' (one gate per position)."""
    from prm_det.ops.backends import gate_triton
    b, ch, h, w = shape
    c, identity = torch.empty(shape, dtype=dtype), torch.empty(shape,
                                                               dtype=dtype)
    acc = torch.promote_types(dtype, torch.float32)
    scale, shift = torch.empty(b, ch, dtype=acc), torch.empty(b, ch,
                                                              dtype=acc)
    gate = affine = None
    if tail == 'sge':
        gate = torch.empty(b, GROUPS, h, w, dtype=acc)
        affine = torch.empty(b, GROUPS, 2, dtype=acc)
    elif tail == 'cbam':
        gate = torch.empty(b, 1, h, w, dtype=acc)
    with record_launches() as launches:
        gate_triton.moments(c)
        y = gate_triton.tail_forward(c, identity, scale, shift, gate, affine,
                                     True)
        if task == 'train':
            gate_triton.tail_backward(torch.empty_like(c), c, y, scale,
                                      shift, gate, affine, True)
    return launches


# LR-ResNet-50's local relation layers (docs/lr_net_facts.md): (layer,
# channels, the input map's stride from the image, the layer's stride); m =
# 8 channels a group (G = C / 8), k = 7, the paper's squared difference. The
# stem's 1x1 (3 -> 64) + stride-2 LR layer; each stage's first block strides
# in its LR layer (key and value at the previous stage's resolution). The
# bottleneck widths 100/200/400/800 hold no whole number of 8-channel groups
# at 100: stage 1 is counted at 104 (13 groups).
LR_LAYERS = (('stem', 64, 1, 2), ('stage 1', 104, 4, 1),
             ('stage 2, first', 200, 4, 2), ('stage 2', 200, 8, 1),
             ('stage 3, first', 400, 8, 2), ('stage 3', 400, 16, 1),
             ('stage 4, first', 800, 16, 2), ('stage 4', 800, 32, 1))
LR_M = 8
LR_K = 7
LR_METHOD = 'squared_difference'


def record_local_relation(shape, stride, dtype):
    """The launches of one local relation layer on value ``shape`` at
    ``stride`` (recorded, not run): [(task, launch)], task 'forward' (the
    same in training and inference) or 'backward'."""
    from prm_det.ops.backends import local_relation_triton
    from prm_det.ops.local_relation import output_size
    b, ch, h, w = shape
    groups = ch // LR_M
    value = torch.empty(shape, dtype=dtype)
    key = torch.empty(b, groups, h, w, dtype=dtype)
    query = torch.empty(b, groups, output_size(h, stride),
                        output_size(w, stride), dtype=dtype)
    prior = torch.empty(groups, LR_K, LR_K, dtype=dtype)
    with record_launches() as forward:
        out, lse = local_relation_triton.forward(query, key, value, prior,
                                                 LR_K, stride, LR_METHOD)
    with record_launches() as backward:
        local_relation_triton.backward(torch.empty_like(out), query, key,
                                       value, prior, lse, LR_K, stride,
                                       LR_METHOD)
    return ([('forward', launch) for launch in forward]
            + [('backward', launch) for launch in backward])


def lr_shapes(batch, height, width):
    """(layer, value map [b, C, h, w], stride) of LR-ResNet-50's local
    relation layers."""
    return [(name, (batch, channels, math.ceil(height / at),
                    math.ceil(width / at)), stride)
            for name, channels, at, stride in LR_LAYERS]


def report_local_relation(size, dtype_name, target, memo):
    """Rows: one per launch of each of LR-ResNet-50's layer shapes."""
    from prm_det.ops.local_relation import output_size
    dtype = DTYPES[dtype_name]
    rows = []
    for layer, shape, stride in lr_shapes(*size):
        b, ch, h, w = shape
        out_shape = (b, ch, output_size(h, stride), output_size(w, stride))
        for task, launch in record_local_relation(shape, stride, dtype):
            facts = compiled_facts(launch, target, memo)
            programs = math.prod(launch.grid)
            read, written = _bytes(launch)
            rows.append(dict(
                layer=layer, shape='x'.join(map(str, shape)),
                out='x'.join(map(str, out_shape)), stride=stride, task=task,
                # backward's first launch: the forward kernel recomputing
                kernel=launch.name.replace('_kernel', '') + (
                    ' (recompute)' if launch.args.get('RECOMPUTE') else ''),
                grid='x'.join(map(str, launch.grid)), programs=programs,
                warps=launch.num_warps, **facts,
                resident=resident_warps(programs, launch.num_warps, facts,
                                        target),
                read=read, written=written))
    return rows


def markdown_local_relation(size, dtype_name, target, rows):
    b, h, w = size
    lines = [f'### {b}x3x{h}x{w}, {dtype_name}, {target} '
             f'({TARGETS[target][1]} SMs), LR-ResNet-50 local relation '
             f'layers (k = {LR_K}, m = {LR_M}, {LR_METHOD})', '',
             '| layer | value map | stride | output map | task | kernel | '
             'grid | warps | registers | spilled bytes | shared bytes | '
             'warps resident / SM | MB read | MB written |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['shape']} | {r['stride']} | {r['out']} | "
            f"{r['task']} | {r['kernel']} | {r['grid']} | {r['warps']} | "
            f"{r['registers']} | {r['spills']} | {r['shared']} | "
            f"{r['resident']:.1f} | {_mb(r['read'])} | "
            f"{_mb(r['written'])} |")
    return '\n'.join(lines) + '\n'


def _bytes(launch):
    reads, writes = MAPS[launch.name]
    args = launch.args

    def on(flag):  # a constexpr that turns the map on ('!': off)
        return (flag is None or (not args[flag[1:]] if flag[0] == '!'
                                 else args[flag]))

    def total(entries):
        return sum(args[name].nbytes for name, flag in entries if on(flag))
    read = total(reads)
    splits = args.get('splits', 1)
    for name in COMBINED.get(launch.name, ()):
        read += int(args[name].nbytes * USED.get(name, 1)) * splits
    if launch.name in BN_PARTIALS and args['BN_TRAIN']:
        read += args['bn_part_ptr'].nbytes * splits * args['B']
    return read, total(writes)


# -- compiling -----------------------------------------------------------------

def _cache_dir():
    from triton import knobs
    return os.path.join(knobs.cache.dir, 'prm_det_kernel_report')


def _compile_key(launch, target):
    """What decides the compiled code: the kernel, its warps, the types and
    specialization of its arguments and the constexprs."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    kernel = launch.kernel
    capability = TARGETS[target][0]
    backend = make_backend(GPUTarget('cuda', capability, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params,
                                            backend)
    bound, specialization, options = binder(**launch.args,
                                            num_warps=launch.num_warps)
    key = repr((_triton_version(), launch.name, capability,
                launch.num_warps,
                [(s[0], s[1]) if s[0] != 'constexpr' else
                 ('constexpr', str(s[1])) for s in specialization]))
    return key, (backend, bound, specialization, options)


def compile_launch(launch, target, packed):
    """{registers, spills, shared} of ``launch`` compiled for ``target``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource
    backend, bound, specialization, options = packed
    kernel = launch.kernel
    capability = TARGETS[target][0]
    opts, signature, constexprs, attrs = kernel._pack_args(
        backend, dict(num_warps=launch.num_warps), bound, specialization,
        options)
    src = ASTSource(kernel, signature, constexprs, attrs)
    compiled = triton.compile(src, target=GPUTarget('cuda', capability, 32),
                              options=opts.__dict__)
    ptx = compiled.asm['ptx']
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'kernel.ptx')
        with open(path, 'w') as f:
            f.write(ptx)
        log = subprocess.run(
            [get_ptxas(capability).path, '-lineinfo', '-v',
             '--regAllocOptLevel=2', f'--gpu-name={target}', path, '-o',
             path + '.o'], check=True, capture_output=True,
            text=True).stderr
    registers = int(re.search(r'Used (\d+) registers', log).group(1))
    spills = sum(int(v) for v in re.findall(r'(\d+) bytes spill', log))
    return dict(registers=registers, spills=spills,
                shared=int(compiled.metadata.shared))


def compiled_facts(launch, target, memo):
    key, packed = _compile_key(launch, target)
    if key in memo:
        return memo[key]
    path = os.path.join(_cache_dir(),
                        hashlib.sha256(key.encode()).hexdigest() + '.json')
    source_hash = launch.kernel.cache_key  # the kernels' source
    if os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get('source') == source_hash:
            memo[key] = cached['facts']
            return memo[key]
    facts = compile_launch(launch, target, packed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(dict(source=source_hash, facts=facts), f)
    memo[key] = facts
    return facts


def resident_warps(programs, warps, facts, target):
    _, sms, shared_per_sm = TARGETS[target]
    per_warp = math.ceil(facts['registers'] * 32 / 256) * 256
    fit = min(MAX_WARPS_PER_SM // warps, MAX_PROGRAMS_PER_SM,
              REGISTERS_PER_SM // (per_warp * warps))
    if facts['shared']:
        fit = min(fit, shared_per_sm // facts['shared'])
    return min(programs / sms, fit) * warps


# -- the report ----------------------------------------------------------------

def report(size, dtype_name, target, memo, tail='prm'):
    """Rows (one per launch of one block tail per stage and task) and the
    totals of a whole attention ResNet-50 (PRM's op, or a gate tail)."""
    batch, height, width = size
    dtype = DTYPES[dtype_name]
    rows = []
    totals = {}
    maps = MINIMUM_MAPS['prm' if tail == 'prm' else 'gate']
    for stage, shape, blocks in stage_shapes(batch, height, width):
        map_bytes = math.prod(shape) * dtype.itemsize
        minimum = {task: n * map_bytes for task, n in maps.items()}
        for task in ('train', 'inference'):
            moved = 0
            launches = (record_tail(shape, dtype, task, TARGETS[target][1])
                        if tail == 'prm' else
                        record_gate_tail(shape, dtype, task, tail))
            for launch in launches:
                facts = compiled_facts(launch, target, memo)
                programs = math.prod(launch.grid)
                read, written = _bytes(launch)
                moved += read + written
                rows.append(dict(
                    stage=stage, shape='x'.join(map(str, shape)), task=task,
                    kernel=launch.name.replace('_kernel', ''),
                    grid='x'.join(map(str, launch.grid)), programs=programs,
                    warps=launch.num_warps, **facts,
                    resident=resident_warps(programs, launch.num_warps,
                                            facts, target),
                    read=read, written=written))
            total = totals.setdefault(task, [0, 0])
            total[0] += blocks * moved
            total[1] += blocks * minimum[task]
    return rows, totals


def _mb(n):
    return f'{n / 1e6:,.1f}'


def markdown(size, dtype_name, target, rows, totals, tail='prm'):
    b, h, w = size
    lines = [f'### {b}x3x{h}x{w}, {dtype_name}, {target} '
             f'({TARGETS[target][1]} SMs)'
             + ('' if tail == 'prm' else f', {tail} gate tail'), '',
             '| stage map | task | kernel | grid | warps | registers | '
             'spilled bytes | shared bytes | warps resident / SM | '
             'MB read | MB written |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['task']} | {r['kernel']} | {r['grid']} | "
            f"{r['warps']} | {r['registers']} | {r['spills']} | "
            f"{r['shared']} | {r['resident']:.1f} | {_mb(r['read'])} | "
            f"{_mb(r['written'])} |")
    net = 'PRM-ResNet-50' if tail == 'prm' else f'{tail.upper()}-ResNet-50'
    lines += ['', f'| whole {net} (16 block tails) | MB moved | '
              'minimum MB | ratio |', '|---|---|---|---|']
    for task, (moved, minimum) in totals.items():
        name = ('training step (forward + backward)' if task == 'train'
                else 'inference')
        lines.append(f'| {name} | {_mb(moved)} | {_mb(minimum)} | '
                     f'{moved / minimum:.2f}x |')
    return '\n'.join(lines) + '\n'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', nargs='+',
                        default=['2x3x800x1216', '2x3x800x1344',
                                 '32x3x224x224'])
    parser.add_argument('--dtypes', nargs='+', default=['fp32', 'bf16',
                                                        'fp16'],
                        choices=sorted(DTYPES))
    parser.add_argument('--targets', nargs='+', default=['sm_90a'],
                        choices=sorted(TARGETS))
    parser.add_argument('--out', help='write the tables to this .md file')
    parser.add_argument('--json', help='write every row to this file')
    parser.add_argument('--check', action='store_true',
                        help='exit 1 if a launch spills or keeps fewer '
                        'than --min-warps warps resident per SM')
    parser.add_argument('--min-warps', type=float, default=8.0)
    parser.add_argument('--min-mb', type=float, default=8.0,
                        help='launches moving less are exempt from '
                        '--min-warps')
    parser.add_argument('--tails', nargs='+', default=['prm'],
                        choices=TAILS, help="PRM's op (default), or the "
                        'gate tail with SE\'s (GE, GC), SGE\'s or CBAM\'s '
                        'gate')
    parser.add_argument('--local-relation', action='store_true',
                        help="LR-ResNet-50's local relation layers (the "
                        'LR-Net aggregation kernels) instead of the tails')
    args = parser.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes]
    memo = {}
    sections, everything, failures = [], [], []
    for target in args.targets:
        for size in sizes:
            for dtype_name in args.dtypes:
                if args.local_relation:
                    rows = report_local_relation(size, dtype_name, target,
                                                 memo)
                    text = markdown_local_relation(size, dtype_name, target,
                                                   rows)
                    print(text, flush=True)
                    sections.append(text)
                    for r in rows:
                        r.update(target=target, dtype=dtype_name,
                                 tail='local_relation',
                                 size='x'.join(map(str, size)),
                                 task=f"{r['task']} stride {r['stride']}")
                        everything.append(r)
                        moved_mb = (r['read'] + r['written']) / 1e6
                        if r['spills'] or (r['resident'] < args.min_warps
                                           and moved_mb >= args.min_mb):
                            failures.append(r)
                    continue
                for tail in args.tails:
                    rows, totals = report(size, dtype_name, target, memo,
                                          tail)
                    text = markdown(size, dtype_name, target, rows, totals,
                                    tail)
                    print(text, flush=True)
                    sections.append(text)
                    for r in rows:
                        r.update(target=target, dtype=dtype_name, tail=tail,
                                 size='x'.join(map(str, size)))
                        everything.append(r)
                        moved_mb = (r['read'] + r['written']) / 1e6
                        if r['spills'] or (r['resident'] < args.min_warps
                                           and moved_mb >= args.min_mb):
                            failures.append(r)
    command = ' '.join(['python benchmarks/kernel_report.py'] +
                       (sys.argv[1:] if argv is None else list(argv)))
    title = ('LR-Net local relation Triton kernels' if args.local_relation
             else 'PRM Triton kernels')
    header = (f'# {title} compiled offline (kernel_report.py)\n\n'
              f'`{command}`\n\n'
              f'triton {_triton_version()}, torch {torch.__version__}; '
              f'{len(memo)} distinct kernels compiled. ' + (
                  'Grids as the launcher makes them (blocks of 128 output '
                  'or input positions x (sample, group) pairs x channel '
                  'blocks (and residue classes mod the stride, backward); '
                  'the same for every GPU). Layers: LR_LAYERS in the '
                  'script; MB: each map a launch reads or writes, once.\n'
                  if args.local_relation else
                  'Grids as the backend plans them for the target\'s SMs '
                  '(sm_90a: an H100/H200\'s 132, as it plans for CPU '
                  'tensors; sm_80: an A100\'s 108).\n'))
    if args.out:
        with open(args.out, 'w') as f:
            f.write(header + '\n' + '\n'.join(sections))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(everything, f, indent=1)
    for r in failures:
        print(f"FAIL {r['target']} {r['size']} {r['dtype']} {r['tail']} "
              f"{r['shape']} "
              f"{r['task']} {r['kernel']}: {r['spills']} bytes spilled, "
              f"{r['resident']:.1f} warps resident per SM", file=sys.stderr)
    if args.check and failures:
        return 1
    return 0


def _triton_version():
    with contextlib.suppress(Exception):
        import triton
        return triton.__version__
    return '?'


if __name__ == '__main__':
    sys.exit(main())
