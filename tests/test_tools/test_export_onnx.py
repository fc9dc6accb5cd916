"""ONNX export (prm_det.deployment, tools/deployment/export_onnx.py): every
attention ResNet and a RetinaNet-PRM backbone + neck export with both of
torch.onnx's exporters, height and width dynamic, and onnxruntime gives
PyTorch's outputs at sizes other than the exported one.

Narrow networks and small images keep this fast; the dynamo-based exporter
(seconds per residual block on 2 cores) gets the first stages. Every depth,
full networks and RetinaNet-PRM-R50 with both exporters:
``PRM_DET_ONNX_ALL=1 pytest tests/test_tools/test_export_onnx.py -k all_depths
-s``
(minutes).
"""
import os
import os.path as osp
import sys

import onnx  # installed by make setup with onnxruntime and onnxscript
import pytest
import torch
from helpers import tiny_backbone
from mmdet.registry import MODELS
from tool_runs import REPO, RETINA, ok, outside_env, run_tool, tool_module

from prm_det import ops
from prm_det.deployment import (BackboneNeck, check_onnx, export_onnx,
                                onnxruntime_outputs)
from prm_det.ops import PRMOptions, PRMParams
from prm_det.ops.reference import prm_reference

TOLERANCE = 1e-4  # relative: max |onnxruntime - torch| / max |torch|
EXPORT_SIZE = (64, 96)
OTHER_SIZES = [(48, 80), (45, 71)]  # other sizes, odd ones included
EXPORTERS = {'torchscript': False, 'dynamo': True}
EXPORT_ONNX = 'deployment/export_onnx.py'


def randomize(model, seed=0):
    """Weights away from their initial values, so that every part of the
    attention acts (a fresh PRM gates by sigmoid(xi) alone: no query, no
    position, no normalization) and BatchNorm is not the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(
                model.named_buffers()):
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith(('theta', 'scale', 'running_var')):
                tensor.copy_(noise.abs() * 0.5 + 0.5)
            elif '.prm.' in name or name.endswith('running_mean'):
                tensor.copy_(noise * 0.5)
    model.eval()  # (mmdet's ResNet.train returns None)
    return model


@pytest.fixture
def chosen_backends(monkeypatch):
    """(exporting, backend) for every PRM call of the test: whether the op
    layer saw an export or trace, and what ops.backends.select returned
    (None: the readable reference)."""
    chosen = []
    select = ops.backends.select

    def recording(c, options):
        backend = select(c, options)
        chosen.append((ops.backends.exporting(), backend))
        return backend

    monkeypatch.setattr(ops.backends, 'select', recording)
    return chosen


def image(height, width, seed=1):
    return torch.randn(1, 3, height, width,
                       generator=torch.Generator().manual_seed(seed))


def export_and_compare(model, path, dynamo):
    """Export at EXPORT_SIZE; the relative error at it and OTHER_SIZES."""
    export_onnx(model, image(*EXPORT_SIZE), path, dynamo=dynamo)
    sizes = [EXPORT_SIZE] + OTHER_SIZES
    errors = check_onnx(model, path, [image(*size, seed=i + 2)
                                      for i, size in enumerate(sizes)])
    return {size: max(e) for size, e in zip(sizes, errors)}


def node_types(path):
    graph = onnx.load(path).graph
    assert all(node.domain in ('', 'ai.onnx') for node in graph.node), {
        node.domain for node in graph.node}
    return {node.op_type for node in graph.node}


class Wrap(torch.nn.Module):
    """A function as a module (torch.export takes modules)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def randomize_params(groups, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(1, groups, 1, 1), (1, groups, 1, 1), (1, groups, 1),
              (1, groups, 1), (1, 2, 1, 1), (1, )]
    params = [torch.randn(s, generator=generator) for s in shapes]
    params[4] = params[4].abs() + 0.1  # theta
    params[5] = params[5].abs() + 0.5  # sigma
    return params


def test_traced_reference_follows_the_input_size():
    """The reference traced at one size computes the definition at others:
    the normalization's P - 1 and the normalized positions' h - 1, w - 1
    are read from the input, not fixed when traced."""
    params = PRMParams(*randomize_params(groups=4))

    def reference(x):
        return prm_reference(x, *params, groups=4, use_norm=True,
                             normalized_positions=True)

    traced = torch.jit.trace(reference, torch.randn(2, 16, 6, 9))
    exported = torch.export.export(
        Wrap(reference), (torch.randn(2, 16, 6, 9), ),
        dynamic_shapes=({2: torch.export.Dim.DYNAMIC,
                         3: torch.export.Dim.DYNAMIC}, )).module()
    for shape in [(2, 16, 6, 9), (2, 16, 5, 3), (2, 16, 11, 7),
                  (2, 16, 2, 2)]:
        x = torch.randn(shape)
        torch.testing.assert_close(traced(x), reference(x))
        torch.testing.assert_close(exported(x), reference(x))
    for shape in [(2, 16, 1, 1), (2, 16, 1, 5)]:  # P - 1 = 0, h - 1 = 0
        x = torch.randn(shape)
        torch.testing.assert_close(traced(x), reference(x))


def test_every_tracer_takes_the_reference(chosen_backends):
    """torch.jit.trace (the TorchScript exporter's tracer) and torch.export
    (the dynamo exporter's) both see the exporting flag: no backend, no
    autograd Function, no custom op in the graph."""
    options = PRMOptions(groups=4)
    params = PRMParams(*randomize_params(groups=4))
    block = Wrap(lambda x: ops.prm_block_tail(x, params, options))
    x = torch.randn(2, 16, 6, 9)
    torch.jit.trace(block, x, check_trace=False)
    program = torch.export.export(block, (x, ))
    assert chosen_backends == [(True, None), (True, None)]
    targets = {str(node.target) for node in program.graph.nodes
               if node.op == 'call_function'}
    assert not [t for t in targets if 'prm' in t or 'nonzero' in t or
                '_local_scalar_dense' in t], targets
    assert {'aten.argmax.default', 'aten.gather.default'} <= targets
    # outside a trace the fast backends run as before
    block(x)
    assert chosen_backends[-1][1] is not None


@pytest.mark.parametrize('exporter', EXPORTERS)
@pytest.mark.parametrize('depth', [18, 50])
def test_prm_resnet_matches_onnxruntime_at_other_sizes(
        tmp_path, exporter, depth, chosen_backends):
    dynamo = EXPORTERS[exporter]
    # the dynamo exporter takes seconds per block: the first stage (2
    # BasicBlocks; 3 Bottlenecks, the first with a projection shortcut)
    model = randomize(tiny_backbone('PRMResNet', depth,
                                    stages=1 if dynamo else 4, groups=8))
    path = str(tmp_path / 'prm.onnx')
    errors = export_and_compare(model, path, dynamo)
    assert max(errors.values()) < TOLERANCE, errors
    during_export = [backend for exporting, backend in chosen_backends
                     if exporting]
    assert during_export and not any(during_export)
    types = node_types(path)
    assert {'ArgMax', 'GatherElements', 'MatMul'} <= types, types
    assert 'NonZero' not in types
    opset = {o.domain: o.version for o in onnx.load(path).opset_import}['']
    assert opset == (18 if dynamo else 17)


@pytest.mark.parametrize('exporter', EXPORTERS)
@pytest.mark.parametrize('kind', ['SE', 'GC', 'GE', 'SGE', 'CBAM', 'BAM',
                                  'SK', 'NL'])
def test_other_attention_resnets_match_onnxruntime_at_other_sizes(
        tmp_path, exporter, kind):
    dynamo = EXPORTERS[exporter]
    stages = 1 if dynamo else 4
    options = {}
    if stages < 4:  # one stage alone gets the attention, wherever it sits
        options['attention_stages'] = (True, ) * stages
        if kind in ('BAM', 'NL'):
            options['stage_attention'] = dict(stages=(True, ) * stages)
    model = randomize(tiny_backbone(f'{kind}ResNet', 18, stages=stages,
                                    **options))
    errors = export_and_compare(model, str(tmp_path / 'm.onnx'), dynamo)
    assert max(errors.values()) < TOLERANCE, errors


@pytest.mark.slow
def test_the_tool_exports_a_config_with_its_checkpoint(tmp_path, repo):
    """tools/deployment/export_onnx.py on the demo config and a checkpoint
    (loaded through mmengine's load_checkpoint): the file holds the
    checkpoint's backbone and neck, checked by the tool at the export size
    and at --check-shape; --cfg-options applies (an FPN of 4 levels
    instead of 5: the checkpoint's fifth is left out); the head is named
    as not exported, with MMDeploy as the way to export it."""
    from prm_det.engine import load_config
    cfg = load_config(osp.join(repo, RETINA))
    detector = randomize(MODELS.build(cfg.model), seed=3)
    checkpoint = str(tmp_path / 'demo.pth')
    torch.save({'meta': {}, 'state_dict': detector.state_dict()}, checkpoint)
    out = str(tmp_path / 'onnx' / 'demo.onnx')
    # as a user runs it: from their own folder, the tool and config by path
    output = ok(run_tool(
        [sys.executable, osp.join(REPO, 'tools/deployment/export_onnx.py'),
         osp.join(REPO, RETINA), checkpoint, '--shape', '96', '128', '--out',
         out, '--check-shape', '64', '80', '--cfg-options',
         'model.neck.num_outs=4'], cwd=str(tmp_path), env=outside_env()))
    assert 'opset 17' in output and 'height and width dynamic' in output
    assert 'weights inside the file' in output
    assert output.count('(ok, tolerance 0.0001)') == 2, output
    assert 'not exported: bbox_head (RetinaHead)' in output
    assert 'MMDeploy' in output
    model = BackboneNeck(detector.backbone, detector.neck)
    model.eval()
    x = image(72, 104)
    with torch.no_grad():
        expected = model(x)
    outputs = onnxruntime_outputs(out, x)
    assert len(outputs) == 4 and len(expected) == 5
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(torch.as_tensor(got), want, rtol=1e-4,
                                   atol=1e-4 * want.abs().max().item())


def test_dynamo_export_is_one_file_that_runs_without_the_folder(tmp_path):
    """The dynamo-based exporter's weights go into the .onnx (torch's
    default for it is a .onnx.data file beside it): the .onnx copied alone
    elsewhere still gives PyTorch's outputs."""
    import shutil
    model = randomize(tiny_backbone('PRMResNet', 18, stages=1, groups=8))
    path = tmp_path / 'export' / 'prm.onnx'
    path.parent.mkdir()
    export_onnx(model, image(*EXPORT_SIZE), str(path), dynamo=True)
    assert os.listdir(path.parent) == ['prm.onnx']
    copy = tmp_path / 'deployed' / 'prm.onnx'
    copy.parent.mkdir()
    shutil.copy(path, copy)
    (error, ) = check_onnx(model, str(copy), [image(*EXPORT_SIZE)])
    assert max(error) < TOLERANCE


def test_without_onnx_the_tool_stops_before_tracing_naming_the_install(
        tmp_path):
    """onnx missing (here: hidden from the tool's process): it says what
    to install before it loads a config or traces a model (the config
    given does not exist, and that is not what it reports)."""
    script = ('import runpy, sys; sys.modules["onnx"] = None; '
              'sys.argv = sys.argv[1:]; '
              'runpy.run_path(sys.argv[0], run_name="__main__")')
    tool = osp.join(REPO, 'tools', 'deployment', 'export_onnx.py')
    out = tmp_path / 'x.onnx'
    proc = run_tool([sys.executable, '-c', script, tool,
                     str(tmp_path / 'no_such_config.py'), '--shape', '64',
                     '64', '--out', str(out)], cwd=str(tmp_path),
                    env=outside_env())
    assert proc.returncode != 0
    assert 'error: the export needs onnx, not installed here' in proc.stderr
    assert 'pip install "prm_det[onnx]"' in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert 'not found' not in proc.stderr
    assert not out.exists()


def test_the_tool_says_when_the_checkpoint_is_missing(tmp_path, repo):
    tool = tool_module(EXPORT_ONNX)
    with pytest.raises(SystemExit, match='checkpoint not found'):
        tool.main([RETINA, str(tmp_path / 'nothing.pth'), '--shape', '64',
                   '64', '--out', str(tmp_path / 'x.onnx')])
    assert not osp.exists(tmp_path / 'x.onnx')


ALL = [('PRM', depth) for depth in (18, 34, 50, 101, 152)] + [
    ('SE', 50), ('GC', 50), ('RetinaNet-PRM-R50', 50)]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get('PRM_DET_ONNX_ALL') != '1',
                    reason='minutes: set PRM_DET_ONNX_ALL=1')
@pytest.mark.parametrize('exporter', EXPORTERS)
@pytest.mark.parametrize('kind,depth', ALL)
def test_all_depths_full_width(tmp_path, repo, kind, depth, exporter):
    """Every depth at full width (64 PRM groups), RetinaNet-PRM-R50's
    backbone + neck, both exporters; prints the relative errors."""
    if kind.startswith('RetinaNet'):
        from prm_det.engine import load_config
        cfg = load_config(osp.join(repo, 'configs/retinanet_prm_r50.py'))
        cfg.model.backbone.init_cfg = None
        detector = MODELS.build(cfg.model)
        model = BackboneNeck(detector.backbone, detector.neck)
    else:
        model = MODELS.build(dict(type=f'{kind}ResNet', depth=depth))
    model = randomize(model)
    errors = export_and_compare(model, str(tmp_path / 'm.onnx'),
                                EXPORTERS[exporter])
    print(f'\n{kind}-{depth} {exporter}: ' + ', '.join(
        f'{h}x{w} {e:.2e}' for (h, w), e in errors.items()))
    assert max(errors.values()) < TOLERANCE, errors
