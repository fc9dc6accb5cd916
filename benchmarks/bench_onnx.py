"""The exported backbones in ONNX Runtime, side by side in one run.

    python benchmarks/bench_onnx.py [--size 512 512] [--reps 20]
        [--threads 2] [--only NAME ...] [--dynamo] [--out FILE.md]

For each RetinaNet config (plain, SE, GE, GC, SGE, CBAM and PRM ResNet-50:
``configs/retinanet_*_r50.py``) the backbone and neck are exported as
``tools/deployment/export_onnx.py`` exports them (random weights; the
attention's readable form, standard ONNX ops), the graph's nodes counted,
and the file run by onnxruntime on the CPU with ``--threads`` intra-op
threads at 1x3xHxW. The variants are interleaved within every repetition
(the same machine state for each); the table gives each variant's median
time and the median of its per-repetition ratio to ResNet-50's.
"""
import argparse
import os
import os.path as osp
import platform
import statistics
import sys
import tempfile
import time

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

import prm_det  # noqa: E402,F401
from prm_det.deployment import BackboneNeck, export_onnx  # noqa: E402

CONFIGS = {
    'ResNet-50': 'retinanet_r50.py',
    'SE-ResNet-50': 'retinanet_se_r50.py',
    'GE-ResNet-50': 'retinanet_ge_r50.py',
    'GC-ResNet-50': 'retinanet_gc_r50.py',
    'SGE-ResNet-50': 'retinanet_sge_r50.py',
    'CBAM-ResNet-50': 'retinanet_cbam_r50.py',
    'PRM-ResNet-50': 'retinanet_prm_r50.py',
}

# the attention modules' parameter names (their plugin names)
ATTENTIONS = ('.prm.', '.se.', '.context_block.', '.sge.', '.cbam.')


def build(config: str):
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    from prm_det.engine import load_config
    cfg = load_config(osp.join(ROOT, 'configs', config))
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    cfg.model.backbone['init_cfg'] = None
    model = MODELS.build(cfg.model)
    model.init_weights()
    with torch.no_grad():  # the attentions off their identity-like init
        for name, p in model.backbone.named_parameters():
            if any(k in name for k in ATTENTIONS):
                p.add_(torch.randn_like(p) * 0.1)
    return BackboneNeck(model.backbone, model.neck).eval()


def session(path: str, threads: int):
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(path, options,
                                        providers=['CPUExecutionProvider'])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', type=int, nargs=2, default=[512, 512])
    parser.add_argument('--reps', type=int, default=20)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--only', nargs='+', choices=list(CONFIGS))
    parser.add_argument('--dynamo', action='store_true')
    parser.add_argument('--out')
    args = parser.parse_args(argv)
    import onnx
    import onnxruntime
    torch.manual_seed(0)
    names = [n for n in CONFIGS
             if not args.only or n in args.only or n == 'ResNet-50']
    image = torch.randn(1, 3, *args.size)
    sessions, nodes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            path = osp.join(tmp, f'{len(sessions)}.onnx')
            export_onnx(build(CONFIGS[name]), image, path,
                        dynamo=args.dynamo)
            nodes[name] = len(onnx.load(path).graph.node)
            sessions[name] = session(path, args.threads)
        feed = {sessions[names[0]].get_inputs()[0].name: image.numpy()}
        for s in sessions.values():  # warm-up
            s.run(None, feed)
        times = {n: [] for n in names}
        for rep in range(args.reps):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                start = time.perf_counter()
                sessions[name].run(None, feed)
                times[name].append(time.perf_counter() - start)
    base = times['ResNet-50']
    lines = ['| backbone + FPN | ONNX nodes | median ms | vs ResNet-50 |',
             '|---|---|---|---|']
    for name in names:
        ratio = statistics.median(t / b for t, b in zip(times[name], base))
        lines.append(f'| {name} | {nodes[name]} | '
                     f'{1000 * statistics.median(times[name]):.1f} | '
                     f'{ratio:.3f}x |')
    report = (f'Machine: {platform.platform()}, {os.cpu_count()} CPUs; '
              f'onnxruntime {onnxruntime.__version__}, {args.threads} '
              f'threads; torch {torch.__version__} '
              f'({"dynamo" if args.dynamo else "TorchScript"} exporter); '
              f'1x3x{args.size[0]}x{args.size[1]}, medians of {args.reps} '
              f'interleaved runs (ratio: median of the per-run ratios).\n\n'
              + '\n'.join(lines) + '\n')
    print(report)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(report)


if __name__ == '__main__':
    main()
