"""torch.compile of the attention backbones: one graph (``fullgraph=True``,
no graph break), one compile for several input sizes (dynamic height and
width, as detection batches come), and eager's results. PRM runs as its
custom op inside the graph, on each backend.

The matrix compiles with ``aot_eager``: Dynamo and AOT autograd with fake
tensors, which is what checks the op's registration (fake implementations,
autograd, mutation of the running statistics). One test compiles a small
net with Inductor in float64 against eager to 1e-9.
"""
import copy

import pytest
import torch
from mmdet.registry import MODELS
from torch._dynamo.testing import CompileCounterWithBackend

# (b, 3, h, w), no two equal sizes (Dynamo would otherwise specialize
# the first square input's h == w)
SIZES = [(2, 3, 64, 96), (2, 3, 96, 48), (2, 3, 80, 112)]


def narrow(type_, depth=18, **kw):
    attention = dict(groups=4) if type_ == 'PRMResNet' else None
    return MODELS.build(dict(type=type_, depth=depth, base_channels=16,
                             attention=attention, init_cfg=None, **kw))


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


def compile_counted(model, backend='aot_eager'):
    counter = CompileCounterWithBackend(backend)
    return torch.compile(model, fullgraph=True, dynamic=True,
                         backend=counter), counter


def check_train_steps(type_, rtol=1e-4, atol=1e-5):
    torch.manual_seed(0)
    eager = narrow(type_)
    eager.train()
    model = copy.deepcopy(eager)
    compiled, counter = compile_counted(model)
    for i, size in enumerate(SIZES):
        x = torch.randn(size)
        outs = train_step(compiled, x)
        expected = train_step(eager, x)
        for got, want in zip(outs, expected):
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        assert_same_state(model, eager, rtol, atol)
        model.zero_grad()
        eager.zero_grad()
        if i == 0:
            frames = counter.frame_count
    assert counter.frame_count == frames, 'recompiled for a new size'


def check_inference(type_, rtol=1e-4, atol=1e-5):
    torch.manual_seed(0)
    eager = narrow(type_)
    eager.eval()
    compiled, counter = compile_counted(copy.deepcopy(eager))
    with torch.no_grad():
        for i, size in enumerate(SIZES):
            x = torch.randn(size)
            for got, want in zip(compiled(x), eager(x)):
                torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
            if i == 0:
                frames = counter.frame_count
    assert counter.frame_count == frames, 'recompiled for a new size'


def test_prm_resnet_train_step_compiles_whole_on_every_backend(backend):
    check_train_steps('PRMResNet')


def test_prm_resnet_inference_compiles_whole_on_every_backend(backend):
    check_inference('PRMResNet')


@pytest.mark.parametrize('type_', ['SEResNet', 'GCResNet'])
def test_se_and_gc_resnet_compile_whole(type_):
    check_train_steps(type_)
    check_inference(type_)


def test_the_compiled_graph_holds_the_prm_op():
    """PRM is one node of the graph (not inlined torch ops, not a break)."""
    torch.manual_seed(0)
    model = narrow('PRMResNet')
    model.train()
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(model, fullgraph=True, dynamic=True,
                             backend=keep)
    train_step(compiled, torch.randn(SIZES[0]))
    code = '\n'.join(gm.code for gm in graphs)
    blocks = sum(len(getattr(model, f'layer{i}')) for i in range(1, 5))
    assert code.count('torch.ops.prm_det.block_tail') == blocks


@pytest.mark.slow
def test_inductor_matches_eager_in_float64():
    """Inductor's generated code around the op, float64, to 1e-9: outputs,
    every gradient, the running statistics."""
    torch.manual_seed(0)
    eager = MODELS.build(dict(type='PRMResNet', depth=18, base_channels=8,
                              attention=dict(groups=2), init_cfg=None))
    eager.double().train()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for size in SIZES[:2]:
        x = torch.randn(size, dtype=torch.float64)
        outs = train_step(compiled, x)
        expected = train_step(eager, x)
        for got, want in zip(outs, expected):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        assert_same_state(model, eager, 1e-9, 1e-9)
        model.zero_grad()
        eager.zero_grad()
