"""A detector's FLOPs and parameters, its attention modules' own included.

    python tools/analysis_tools/get_flops.py CONFIG [--shape H [W]]
        [--num-images N] [--cfg-options k=v ...]

mmdet's ``tools/analysis_tools/get_flops.py`` (same flags and output) on
mmengine's ``FlopAnalyzer``, which counts one multiply-add as one FLOP in
convolutions, matmuls and linears and a few norm, pool and upsample ops, and
skips every other op. That misses what attention modules compute with other
ops, and a fused custom op entirely (PRM's fast path), so a PRM detector
counts like a plain one; the PRM paper's counter missed them the same way
(239.32 GMac for RetinaNet with and without PRM). Here, inside the attention
modules (PRM, SE, GC, GE, SGE, CBAM, BAM, SK's selective unit, mmcv's
NonLocal2d and LR-Net's local relation layer) every op counts:

* PRM runs as its definition (``prm_det.ops.reference.prm_reference``, plain
  torch ops) while it is traced, not as the fused kernel;
* inside an attention module, besides mmengine's ops, each elementwise op
  counts one per output element and each reduction one per input element
  (sum, mean, argmax, softmax's exp, ...); outside them mmengine's rules stay
  as they are, so the rest of the network counts as in mmdet's tool.
* LR-Net's local relation layers (``LocalRelation2d``) are attention
  modules too: their 1x1 convs and prior network count as convs, and the
  fused ``prm_det::local_relation`` op runs as :func:`counted_local_relation`
  while traced, the same math in ops the counter sees: for every output
  position, group and window offset (all k * k, the map's border included)
  the logit phi(q, k) + prior (squared difference: a subtraction, a product
  and the prior's subtraction, 3; absolute difference 3; dot product 2), its
  softmax (1), and per channel the weighted sum over the window, one
  multiply-add per channel and offset (a matmul).

Input: ``--shape H W`` (or one size for a square) traces one random image of
that size, as mmdet 2.x's tool did; for two-stage detectors the RPN then
keeps its full 1000 proposals (NMS off), the fixed count mmdet 2.x's dummy
forward used, so the number does not depend on random scores. Without
``--shape`` the first ``--num-images`` val images are traced and averaged
(mmdet 3.x's way; needs the dataset).
"""
import argparse
import contextlib
import os.path as osp
import sys
from collections import Counter
from functools import partial
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

# run from a checkout: its prm_det first (installed, the tools sit in
# prm_det/.mim/tools/ and import the installed package)
_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if osp.isdir(osp.join(_ROOT, 'prm_det')):
    sys.path.insert(0, _ROOT)

from mmengine.analysis import FlopAnalyzer  # noqa: E402
from mmengine.analysis.jit_handles import get_shape  # noqa: E402
from mmengine.config import DictAction  # noqa: E402

import prm_det  # noqa: E402,F401  (registers the backbones)
from prm_det.ops import PRMParams, prm_reference_of  # noqa: E402
from prm_det.private_apis import format_size  # noqa: E402

# Prefix of the op names counted only inside attention modules.
EXTRA = 'elementwise:'
# aten ops counted inside attention modules on top of mmengine's handles
ELEMENTWISE_OPS = (  # one FLOP per output element
    'add', 'add_', 'sub', 'sub_', 'rsub', 'mul', 'mul_', 'div', 'div_',
    'neg', 'abs', 'exp', 'log', 'pow', 'sqrt', 'rsqrt', 'reciprocal',
    'sigmoid', 'sigmoid_', 'hardsigmoid', 'hardsigmoid_', 'tanh', 'relu',
    'relu_', 'clamp', 'clamp_', 'clamp_min', 'clamp_min_', 'softmax')
REDUCTION_OPS = (  # one FLOP per input element
    'sum', 'mean', 'argmax', 'amax', 'max', 'var', 'std',
    'linalg_vector_norm', 'norm')
# cos(a, b) over a dim: a.b, |a|^2 and |b|^2, a multiply-add each
COSINE_OPS_PER_ELEMENT = 3


def _numel(value) -> int:
    shape = get_shape(value)
    if shape is None:  # a scalar argument, not a tensor
        return 0
    count = 1
    for size in shape:
        count *= size
    return count


def _elementwise(op: str):
    def count(inputs, outputs):
        # A 0-dim result is Python's arithmetic on sizes (n = b * groups),
        # which the tracer records as tensor ops: not an op on values.
        if get_shape(outputs[0]) == []:
            return Counter()
        return Counter({EXTRA + op: _numel(outputs[0])})
    return count


def _reduction(op: str):
    return lambda inputs, outputs: Counter({EXTRA + op: _numel(inputs[0])})


def _cosine(inputs, outputs):
    broadcast = torch.broadcast_shapes(get_shape(inputs[0]),
                                       get_shape(inputs[1]))
    return Counter({EXTRA + 'cosine_similarity':
                    COSINE_OPS_PER_ELEMENT * broadcast.numel()})


ATTENTION_OP_HANDLES = {
    **{f'aten::{op}': _elementwise(op) for op in ELEMENTWISE_OPS},
    **{f'aten::{op}': _reduction(op) for op in REDUCTION_OPS},
    'aten::cosine_similarity': _cosine,
}


class ReferencePRM(nn.Module):
    """A PRM run through the readable reference
    (:func:`prm_det.ops.reference.prm_reference_of`, with the PRM's own
    parameters and options): the op as defined, in plain torch ops a tracer
    sees. It has none of PRM's fused entry points, so a block calls it as a
    plain plugin (norm, PRM, add, ReLU each its own op)."""

    def __init__(self, prm: nn.Module) -> None:
        super().__init__()
        for name in PRMParams._fields:
            self.register_parameter(name, getattr(prm, name))
        self.options = prm.options

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = PRMParams(*(getattr(self, n) for n in PRMParams._fields))
        return prm_reference_of(x, params, self.options)


def counted_local_relation(query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor, prior: torch.Tensor,
                           kernel_size: int, stride: int = 1,
                           method: str = 'squared_difference'
                           ) -> torch.Tensor:
    """``prm_det::local_relation`` (:mod:`prm_det.ops.local_relation`)
    written for the counter: the logits phi(q, k) + prior in elementwise
    ops, the softmax, and the weighted sums over each window as a matmul
    (one multiply-add per channel and offset); unfold, reshapes and the
    border mask are not arithmetic. Same result as the op."""
    import torch.nn.functional as F

    from prm_det.ops.local_relation import check_inputs, output_size
    check_inputs(query, key, value, prior, kernel_size, stride, method)
    b, channels, h, w = value.shape
    groups, taps = key.shape[1], kernel_size * kernel_size
    size = output_size(h, stride) * output_size(w, stride)

    def windows(t: torch.Tensor) -> torch.Tensor:
        return F.unfold(t, kernel_size, padding=kernel_size // 2,
                        stride=stride).view(t.shape[0], t.shape[1], taps,
                                            size)

    q = query.reshape(b, groups, 1, size)
    k = windows(key)
    p = prior.reshape(1, groups, taps, 1)
    if method == 'squared_difference':
        d = q - k
        logits = p - d * d
    elif method == 'dot_product':
        logits = q * k + p
    else:  # 'absolute_difference' (check_inputs refused anything else)
        logits = p - (q - k).abs()
    inside = windows(torch.ones(1, 1, h, w, dtype=value.dtype,
                                device=value.device)) > 0
    weights = torch.softmax(logits.masked_fill(~inside, float('-inf')), 2)
    values = windows(value).view(b, groups, channels // groups, taps, size)
    out = torch.matmul(values.permute(0, 1, 4, 2, 3),       # [b, G, P, m, t]
                       weights.permute(0, 1, 3, 2)[..., None])  # [.., t, 1]
    return out.reshape(b, groups, size, channels // groups).permute(
        0, 1, 3, 2).reshape(b, channels, output_size(h, stride),
                            output_size(w, stride))


@contextlib.contextmanager
def relation_counted():
    """Within the block every ``LocalRelation2d`` aggregates with
    :func:`counted_local_relation` instead of the fused op."""
    from unittest import mock

    from prm_det.ops import local_relation_layer as layer_function
    with mock.patch.object(layer_function, 'local_relation',
                           counted_local_relation):
        yield


def attention_types() -> Dict[str, tuple]:
    """Attention module classes by the name the report uses."""
    from mmcv.cnn import ContextBlock, NonLocal2d
    from mmdet.models.layers import SELayer

    from prm_det.models.layers import (BAM, CBAM, GE, PRM, SGE,
                                       LocalRelation2d, SelectiveKernel)
    return {'PRM': (PRM, ReferencePRM), 'SE': (SELayer, ),
            'GC': (ContextBlock, ), 'GE': (GE, ), 'SGE': (SGE, ),
            'CBAM': (CBAM, ), 'BAM': (BAM, ), 'SK': (SelectiveKernel, ),
            'NL': (NonLocal2d, ), 'LR': (LocalRelation2d, )}


def attention_modules(model: nn.Module) -> Dict[str, str]:
    """{module name: its kind ('PRM', 'SE', 'GC', ...: ``attention_types``)}
    for every attention module."""
    kinds = attention_types()
    return {name: kind for name, module in model.named_modules()
            for kind, classes in kinds.items() if isinstance(module, classes)}


@contextlib.contextmanager
def prm_as_defined(model: nn.Module):
    """Within the block every PRM of ``model`` is a :class:`ReferencePRM`
    sharing its parameters; the PRMs are put back afterwards."""
    from prm_det.models.layers import PRM
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PRM):
                swapped.append((parent, name, child))
                setattr(parent, name, ReferencePRM(child))
    try:
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


class Complexity(NamedTuple):
    flops: int  # whole model, attention modules' own ops included
    attention_flops: Dict[str, int]  # per kind ('PRM', 'SE', 'GC', ...)


def count_flops(model: nn.Module, inputs: Tuple) -> Complexity:
    """FLOPs of ``model(*inputs)`` (one multiply-add = one FLOP), with every
    op inside attention modules counted; see the module docstring."""
    with prm_as_defined(model), relation_counted(), torch.no_grad():
        analyzer = FlopAnalyzer(model, inputs)
        analyzer.set_op_handle(**ATTENTION_OP_HANDLES)
        analyzer.unsupported_ops_warnings(False)
        analyzer.uncalled_modules_warnings(False)
        analyzer.tracer_warnings('none')
        by_module = analyzer.by_module_and_operator()
        attention = attention_modules(model)
    flops = sum(n for op, n in by_module[''].items()
                if not op.startswith(EXTRA))
    per_kind: Dict[str, int] = Counter()
    for name, kind in attention.items():
        per_kind[kind] += sum(by_module[name].values())
        flops += sum(n for op, n in by_module[name].items()
                     if op.startswith(EXTRA))
    return Complexity(flops, dict(per_kind))


def parameter_counts(model: nn.Module) -> Dict[str, int]:
    """Total and trainable parameters, and each attention kind's."""
    counts = Counter(
        total=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters()
                      if p.requires_grad))
    modules = dict(model.named_modules())
    for name, kind in attention_modules(model).items():
        counts[kind] += sum(p.numel() for p in modules[name].parameters())
    return dict(counts)


def random_image_inputs(height: int, width: int):
    """``model.forward``'s arguments for one random image (fixed seed)."""
    from mmdet.structures import DetDataSample
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, height, width, generator=generator)
    sample = DetDataSample(metainfo=dict(
        img_shape=(height, width), ori_shape=(height, width),
        pad_shape=(height, width), batch_input_shape=(height, width),
        scale_factor=(1.0, 1.0)))
    return image, [sample]


def keep_all_proposals(cfg) -> bool:
    """Two-stage detectors: the RPN keeps ``max_per_img`` proposals with
    NMS off, a count that does not depend on the scores. True if changed."""
    rpn = (cfg.model.get('test_cfg') or {}).get('rpn')
    if not rpn or 'nms' not in rpn:
        return False
    rpn['nms']['iou_threshold'] = 1.0  # suppresses nothing
    return True


def build_model(cfg) -> nn.Module:
    """The detector of a loaded config, as built for counting: no
    pretrained weights fetched, SyncBN as BN."""
    from mmdet.registry import MODELS
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import init_default_scope
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    cfg.model.setdefault('backbone', {})['init_cfg'] = None  # no download
    return revert_sync_batchnorm(MODELS.build(cfg.model))


def inference(args) -> dict:
    from prm_det.engine import check_dataset_files, load_config
    cfg = load_config(args.config, args.cfg_options)
    result = {}
    if args.shape is not None:
        height, width = (args.shape * 2)[:2]
        if keep_all_proposals(cfg):
            result['proposals'] = cfg.model.test_cfg.rpn.get(
                'max_per_img', 1000)
    model = build_model(cfg)
    model.eval()
    _forward = model.forward

    if args.shape is not None:
        batches = [random_image_inputs(height, width)]
        result['compute_type'] = 'direct: randomly generate a picture'
    else:
        from mmengine.runner import Runner
        check_dataset_files(cfg, ['val_dataloader'])
        cfg.val_dataloader.batch_size = 1
        loader = Runner.build_dataloader(cfg.val_dataloader)
        batches = []
        for index, data_batch in enumerate(loader):
            if index == args.num_images:
                break
            data = model.data_preprocessor(data_batch)
            batches.append((data['inputs'], data['data_samples']))
        result['compute_type'] = 'dataloader: load a picture from the dataset'

    flops, attention_flops = [], Counter()
    for inputs, samples in batches:
        result['ori_shape'] = samples[0].ori_shape
        result['pad_shape'] = samples[0].get('batch_input_shape',
                                             samples[0].pad_shape)
        model.forward = partial(_forward, data_samples=samples,
                                mode='tensor')
        complexity = count_flops(model, (inputs, ))
        flops.append(complexity.flops)
        attention_flops.update(complexity.attention_flops)
    model.forward = _forward
    result['flops'] = round(sum(flops) / len(flops))
    result['attention_flops'] = {k: round(v / len(flops))
                                 for k, v in attention_flops.items()}
    result['params'] = parameter_counts(model)
    result['attention_modules'] = Counter(attention_modules(model).values())
    return result


def _scaled(flops: int) -> str:
    """A count in the largest unit it reaches, 4 significant digits or
    more (a small model's attention is MFLOPs, not 0.001 GFLOPs)."""
    for unit, scale in (('GFLOPs', 1e9), ('MFLOPs', 1e6), ('KFLOPs', 1e3)):
        if flops >= scale:
            return f'{flops / scale:.3f} {unit}'
    return f'{flops} FLOPs'


def report(result: dict) -> str:
    """mmdet's get_flops output, plus trainable parameters and the
    attention modules' share."""
    line = '=' * 30
    params = result['params']
    lines = []
    if result['pad_shape'] != result['ori_shape']:
        lines += [line, f'Use size divisor set input shape from '
                  f'{result["ori_shape"]} to {result["pad_shape"]}']
    lines += [line, f'Compute type: {result["compute_type"]}',
              f'Input shape: {result["pad_shape"]}',
              f'Flops: {format_size(result["flops"])}',
              f'Params: {format_size(params["total"])}',
              f'Params (trainable): {format_size(params["trainable"])}',
              f'Exact: {result["flops"] / 1e9:.2f} GFLOPs, params '
              f'{params["total"]:,} ({params["trainable"]:,} trainable)']
    for kind, count in sorted(result['attention_modules'].items()):
        flops = result['attention_flops'].get(kind, 0)
        share = 100 * flops / result['flops'] if result['flops'] else 0
        lines.append(
            f'{kind} ({count} modules, every op counted): {flops:,} FLOPs '
            f'({_scaled(flops)}, {share:.2f}% of the model), params '
            f'{params[kind]:,}')
    if 'proposals' in result:
        lines.append(f'RPN proposals: {result["proposals"]} (NMS off)')
    lines += [line, '!!!Please be cautious if you use the results in papers. '
              'You may need to check if all ops are supported and verify '
              'that the flops computation is correct.']
    return '\n'.join(lines)


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(description='Get a detector flops')
    parser.add_argument('config', help='train config file path')
    parser.add_argument(
        '--shape', type=int, nargs='+',
        help='input image size H W (or one size for a square): trace one '
        'random image instead of dataset images')
    parser.add_argument(
        '--num-images', type=int, default=100,
        help='num images of calculate model flops (without --shape)')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override some settings in the used config, the key-value pair '
        'in xxx=yyy format will be merged into config file.')
    args = parser.parse_args(argv)
    if args.shape is not None and len(args.shape) not in (1, 2):
        parser.error('--shape takes H W or one size')
    return args


def main(argv: Optional[List[str]] = None) -> dict:
    from prm_det.engine import ConfigLoaderUnavailable
    from prm_det.engine import DatasetNotFound
    try:
        result = inference(parse_args(argv))
    except ConfigLoaderUnavailable as error:
        raise SystemExit(f'error: {error}')
    except (DatasetNotFound, FileNotFoundError) as error:
        raise SystemExit(f'error: {error}\n(or count on a random image of a '
                         f'given size: --shape H W)')
    print(report(result))
    return result


if __name__ == '__main__':
    main()
