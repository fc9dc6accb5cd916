"""torch.compile of the attention backbones: one graph (``fullgraph=True``,
no graph break), one compile for several input sizes (dynamic height and
width, as detection batches come), and eager's results. PRM runs as its
custom op inside the graph, on each backend.

The matrix compiles with ``aot_eager``: Dynamo and AOT autograd with fake
tensors, which is what checks the op's registration (fake implementations,
autograd, the running statistics' update). One test compiles a small net
with Inductor in float64 against eager to 1e-9.
"""
import copy

import pytest
import torch
from helpers import tiny_backbone
from torch._dynamo.backends.debugging import aot_eager

from prm_det.models.layers.fused_tail import FusedGateTail
from prm_det.ops import backends, use_backend

# (b, 3, h, w), no two equal sizes (Dynamo would otherwise specialize
# the first square input's h == w)
SIZES = [(2, 3, 64, 96), (2, 3, 96, 48), (2, 3, 80, 112)]
# The nets: narrow ResNet-18s (tiny_backbone); ``stages=2`` keeps the first
# two stages (four blocks), for the matrices that only vary the backend or
# the attention.


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch (mmdet's ResNet.forward is one code
    object for all models: compiled frames would pile up across tests)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def train_step(model, x):
    """Forward in training mode and the gradients of a loss on every
    output; returns the outputs."""
    outs = model(x)
    sum(o.square().mean() for o in outs).backward()
    return outs


def assert_same_state(compiled_model, eager_model, rtol, atol):
    for (name, a), (_, b) in zip(compiled_model.named_parameters(),
                                 eager_model.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol,
                                   msg=name)
    for (name, a), (_, b) in zip(compiled_model.named_buffers(),
                                 eager_model.named_buffers()):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=name)


class Recorder:
    """A torch.compile backend: AOT autograd with fake tensors (what checks
    the op's fake implementations and autograd) running the traced graphs
    eagerly; keeps every graph Dynamo hands it, one per compiled frame."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return aot_eager(gm, example_inputs)

    def compiles_after(self, first_size_graphs: int) -> None:
        """Asserts nothing was compiled since the first size's graphs."""
        assert len(self.graphs) == first_size_graphs, (
            'recompiled for a new size')


def check_train_steps(model, sizes, rtol=1e-4, atol=1e-5):
    """Compiled train steps at each size against eager's, from one compile;
    returns the graphs."""
    model.train()
    eager = copy.deepcopy(model)
    recorder = Recorder()
    compiled = torch.compile(model, fullgraph=True, dynamic=True,
                             backend=recorder)
    first = None  # graphs after the first size
    for i, size in enumerate(sizes):
        x = torch.randn(size)
        outs = train_step(compiled, x)
        expected = train_step(eager, x)
        for got, want in zip(outs, expected):
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        assert_same_state(model, eager, rtol, atol)
        model.zero_grad()
        eager.zero_grad()
        first = len(recorder.graphs) if i == 0 else first
    recorder.compiles_after(first)
    return recorder.graphs


def check_inference(model, sizes, rtol=1e-4, atol=1e-5):
    model.eval()
    eager = copy.deepcopy(model)
    recorder = Recorder()
    compiled = torch.compile(model, fullgraph=True, dynamic=True,
                             backend=recorder)
    first = None
    with torch.no_grad():
        for i, size in enumerate(sizes):
            x = torch.randn(size)
            for got, want in zip(compiled(x), eager(x)):
                torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
            first = len(recorder.graphs) if i == 0 else first
    recorder.compiles_after(first)
    return recorder.graphs


def prm_calls(graphs, op='block_tail'):
    """How many calls of the custom op ``op`` the graphs hold."""
    return sum(gm.code.count(f'torch.ops.prm_det.{op}(') +
               gm.code.count(f'torch.ops.prm_det.{op}.default(')
               for gm in graphs)


@pytest.mark.slow  # Inductor; the fast tier compiles PRM once (torch backend)
def test_prm_resnet_compiles_whole_with_dynamic_sizes():
    """On the default backend (the CPU kernel): a train step and inference,
    each one graph for three sizes, every block's PRM one node of it,
    eager's results."""
    torch.manual_seed(0)
    model = tiny_backbone('PRMResNet')
    blocks = sum(len(getattr(model, f'layer{i}')) for i in range(1, 5))
    assert prm_calls(check_train_steps(model, SIZES)) == blocks
    assert prm_calls(check_inference(model, SIZES)) == blocks


def test_prm_sees_an_export_under_torch_export_only():
    """The reference composition is for exporters; under torch.compile PRM
    keeps its op. (torch.compile before torch 2.13 folds
    torch.compiler.is_exporting() to True: asking it sent every compiled
    PRM to the composition.)"""
    def branch(x):
        return x + 1 if backends.exporting() else x - 1

    class Branch(torch.nn.Module):
        def forward(self, x):
            return branch(x)

    x = torch.zeros(2)
    compiled = torch.compile(branch, fullgraph=True, backend='eager')
    assert torch.equal(compiled(x), x - 1)
    exported = torch.export.export(Branch(), (x, ))
    assert torch.equal(exported.module()(x), x + 1)


@pytest.mark.parametrize('name', ['torch', 'triton'])
def test_prm_compiles_whole_on_the_other_backends(name):
    torch.manual_seed(0)
    sizes = [(2, 3, 24, 40), (2, 3, 40, 16)]
    with use_backend(name):
        check_train_steps(tiny_backbone('PRMResNet', stages=2), sizes)
        check_inference(tiny_backbone('PRMResNet', stages=2), sizes)


@pytest.mark.slow  # Inductor; the fast tier compiles PRM once (torch backend)
@pytest.mark.parametrize('type_', ['SEResNet', 'GCResNet', 'GEResNet',
                                   'SGEResNet', 'CBAMResNet', 'BAMResNet',
                                   'SKResNet', 'NLResNet', 'LRResNet'])
def test_other_attention_resnets_compile_whole(type_):
    torch.manual_seed(0)
    sizes = [(2, 3, 24, 40), (2, 3, 40, 16)]
    # two stages: non-local's own (before c4's last block) is not among them
    options = (dict(stage_attention=dict(stages=(False, True)))
               if type_ == 'NLResNet' else {})
    check_train_steps(tiny_backbone(type_, stages=2, **options), sizes)
    check_inference(tiny_backbone(type_, stages=2, **options), sizes)


@pytest.mark.slow  # Inductor; the fast tier compiles PRM once (torch backend)
def test_inductor_matches_eager_in_float64():
    """Inductor's generated code around the op, float64, to 1e-9 on a small
    net (one stage): outputs, every gradient, the running statistics."""
    torch.manual_seed(0)
    model = tiny_backbone('PRMResNet', stages=1).double()
    model.train()  # mmdet's ResNet.train() returns nothing to chain
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for size in [(2, 3, 24, 40), (2, 3, 40, 16)]:
        x = torch.randn(size, dtype=torch.float64)
        outs = train_step(compiled, x)
        expected = train_step(eager, x)
        for got, want in zip(outs, expected):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        assert_same_state(model, eager, 1e-9, 1e-9)
        model.zero_grad()
        eager.zero_grad()


def test_torch_export_of_the_backbone_follows_the_input_size():
    """torch.export takes the readable reference (standard ATen ops only,
    the graph ONNX and other runtimes read) with dynamic height and width,
    and the exported program computes what the eager backbone does."""
    torch.manual_seed(0)
    model = tiny_backbone('PRMResNet', stages=2)
    model.eval()
    program = torch.export.export(
        model, (torch.randn(1, 3, 32, 48), ),
        dynamic_shapes=({2: torch.export.Dim.DYNAMIC,
                         3: torch.export.Dim.DYNAMIC}, ))
    assert 'prm_det' not in str(program.graph)
    exported = program.module()
    with torch.no_grad():
        for size in [(1, 3, 40, 24), (1, 3, 56, 72)]:
            x = torch.randn(size)
            for got, want in zip(exported(x), model(x)):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


GATE_TAIL_TYPES = ['SEResNet', 'GEResNet', 'GCResNet', 'SGEResNet',
                   'CBAMResNet']


@pytest.mark.parametrize('type_', [
    pytest.param(t, marks=() if t == 'CBAMResNet' else pytest.mark.slow)
    for t in GATE_TAIL_TYPES])  # the fast tier: CBAM's, both gate kinds
def test_gate_tail_resnets_compile_whole(type_):
    """The gate attentions' fused tails (prm_det::gate_moments and
    prm_det::gate_tail, on the CPU kernel) inside one graph, every block's
    tail one gate_tail node, dynamic sizes, eager's results."""
    torch.manual_seed(0)
    sizes = [(2, 3, 24, 40), (2, 3, 40, 16)]
    model = tiny_backbone(type_, stages=2)
    blocks = sum(isinstance(m, FusedGateTail) for m in model.modules())
    assert blocks >= 2
    assert prm_calls(check_train_steps(model, sizes), 'gate_tail') == blocks
    assert prm_calls(check_inference(model, sizes), 'gate_tail') == blocks


def test_gate_tail_compiles_whole_on_the_torch_backend():
    torch.manual_seed(0)
    with use_backend('torch'):
        check_train_steps(tiny_backbone('CBAMResNet', stages=2),
                          [(2, 3, 24, 40), (2, 3, 40, 16)])


@pytest.mark.parametrize('type_', GATE_TAIL_TYPES)
def test_torch_export_of_gate_tail_backbones_is_standard_ops(type_):
    """Exporting takes the modules (standard ATen ops), not the tail ops."""
    torch.manual_seed(0)
    model = tiny_backbone(type_, stages=1)
    model.eval()
    program = torch.export.export(model, (torch.randn(1, 3, 32, 48), ))
    assert 'prm_det' not in str(program.graph)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        for got, want in zip(program.module()(x), model(x)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
