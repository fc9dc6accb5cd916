"""The gate tails' Triton kernels (``prm_det::gate_moments``,
``prm_det::gate_tail``) compiled on a CUDA GPU, against the modules run one
after another on the same device: SE, GE, GC, SGE and CBAM after a
BatchNorm2d with the shortcut add and ReLU; output, every gradient and the
running statistics, float64 and float32, training and eval, an odd map and
a detection stage's; bf16 autocast finite and near float32.

tests/test_ops/test_gate_tail.py runs the same kernels through Triton's
interpreter on CPU tensors. Skipped without CUDA; ``benchmarks/gpu_run.sh``
runs this file. ``PRM_DET_CUDA_TESTS_ON_CPU=1`` runs it on CPU tensors
through the interpreter, the detection size left out.
"""
import copy

import pytest
import torch
from cuda_device import DEVICE, on_the_device
from torch import nn

from prm_det.models.layers import CBAM, GC, GE, SE, SGE
from prm_det.ops import use_backend
from prm_det.ops.gate_tail import tail_backend

pytestmark = on_the_device

GATES = {
    'se': lambda ch: SE(ch),
    'ge': lambda ch: GE(ch),
    'gc': lambda ch: GC(ch),
    'sge': lambda ch: SGE(ch, groups=8),
    'cbam': lambda ch: CBAM(ch),
}
SHAPES = {'odd': (3, 32, 7, 9), 'stage': (2, 256, 100, 152)}
# relative error in norm against the modules in the same dtype
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def pair(kind, channels, dtype):
    torch.manual_seed(0)
    gate, norm = GATES[kind](channels), nn.BatchNorm2d(channels)
    with torch.no_grad():
        for p in list(gate.parameters()) + list(norm.parameters()):
            p.copy_(torch.randn_like(p) * 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        norm.running_mean.normal_()
    modules = [m.to(DEVICE, dtype) for m in (gate, norm)]
    return modules, copy.deepcopy(modules)


def run(gate, norm, c, identity, grad, fused):
    c = c.detach().clone().requires_grad_()
    identity = identity.detach().clone().requires_grad_()
    if fused:
        y = gate.forward_norm_residual(c, norm, identity)
    else:
        y = torch.relu(gate(norm(c)) + identity)
    y.backward(grad)
    grads = {'c': c.grad, 'identity': identity.grad}
    for prefix, module in (('gate.', gate), ('norm.', norm)):
        grads.update({prefix + n: p.grad
                      for n, p in module.named_parameters()})
    return y.detach(), grads, (norm.running_mean.clone(),
                               norm.running_var.clone())


def inputs(shape, dtype):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(shape, generator=g, dtype=torch.float64) * s + o)
            .to(DEVICE, dtype) for s, o in ((2, 0.5), (1, 0), (1, 0))]


@pytest.mark.parametrize('size', list(SHAPES))
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32],
                         ids=['fp64', 'fp32'])
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('kind', list(GATES))
def test_triton_tail_equals_the_modules(kind, training, dtype, size):
    if size == 'stage' and DEVICE != 'cuda':
        pytest.skip('detection sizes: CUDA only')
    shape = SHAPES[size]
    (gate, norm), (gate0, norm0) = pair(kind, shape[1], dtype)
    for module in (gate, norm, gate0, norm0):
        module.train(training)
    c, identity, grad = inputs(shape, dtype)
    with use_backend('triton'):
        assert tail_backend(c, identity) == 'triton'
        y, grads, running = run(gate, norm, c, identity, grad, fused=True)
    y0, grads0, running0 = run(gate0, norm0, c, identity, grad, fused=False)
    tol = TOLERANCE[dtype]
    assert rel(y, y0) < tol
    assert grads.keys() == grads0.keys()
    for name, expected in grads0.items():
        assert grads[name] is not None, name
        assert rel(grads[name], expected) < tol * 10, name
    for got, expected in zip(running, running0):
        assert rel(got, expected) < tol


@pytest.mark.parametrize('kind', list(GATES))
def test_triton_tail_under_bf16_autocast(kind):
    """Finite and near the modules under the same autocast (bf16 rounds
    the MLPs' and convs' inputs in both)."""
    shape = (3, 64, 7, 9)
    (gate, norm), (gate0, norm0) = pair(kind, shape[1], torch.float32)
    c, identity, grad = inputs(shape, torch.float32)
    with torch.autocast(DEVICE, torch.bfloat16):
        with use_backend('triton'):
            y, grads, _ = run(gate, norm, c, identity, grad, fused=True)
        y0, grads0, _ = run(gate0, norm0, c, identity, grad, fused=False)
    assert torch.isfinite(y).all()
    assert rel(y, y0) < 3e-2
    for name, expected in grads0.items():
        assert torch.isfinite(grads[name]).all(), name
        if name == 'gate.conv_mask.bias':
            continue  # GC's softmax ignores it: 0 exactly, both rounding
        assert rel(grads[name], expected) < 1e-1, name
