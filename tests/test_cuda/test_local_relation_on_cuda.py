"""The local relation aggregation's Triton kernels compiled on a CUDA GPU
against the readable reference on the same device: float64 and float32,
strides 1 and 2, an odd map and LR-ResNet-50's detection stage sizes (the
reference's unfold fits there in float32), every gradient; bf16 finite and
near float32; the same bits every run.

tests/test_ops/test_local_relation*.py run the same kernels through
Triton's interpreter on CPU tensors. Skipped without CUDA;
``benchmarks/gpu_run.sh`` runs this file. ``PRM_DET_CUDA_TESTS_ON_CPU=1``
runs it on CPU tensors through the interpreter, detection sizes left out.
"""

import pytest
import torch
from cuda_device import DEVICE, on_the_device

from prm_det.ops import use_backend
from prm_det.ops.local_relation import local_relation_reference
from prm_det.ops.local_relation_op import local_relation, relation_backend

pytestmark = on_the_device

# (b, groups, m, h, w, stride): an odd map; LR-ResNet-50 at 2x800x1216,
# stage 1 and stage 2's first (strided) block
SHAPES = {'odd': (2, 3, 8, 11, 9, 1), 'odd_stride2': (1, 2, 8, 9, 12, 2),
          'stage1': (2, 13, 8, 200, 304, 1),
          'stage2_first': (2, 25, 8, 200, 304, 2)}
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def inputs(b, groups, m, h, w, stride, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    shapes = ((b, groups, ho, wo), (b, groups, h, w), (b, groups * m, h, w),
              (groups, 7, 7))
    return [torch.randn(s, generator=g, dtype=torch.float64).to(DEVICE, dtype)
            .requires_grad_() for s in shapes]


def run(fn, tensors, stride):
    out = fn(*tensors, 7, stride, 'squared_difference')
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64).to(DEVICE, out.dtype)
    return out.detach(), torch.autograd.grad(out, tensors, grad)


def triton_op(*args):
    with use_backend('triton'):
        assert relation_backend(args[2]) == 'triton'
        return local_relation(*args)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32],
                         ids=['fp64', 'fp32'])
@pytest.mark.parametrize('shape', list(SHAPES))
def test_triton_equals_the_reference(shape, dtype):
    if shape.startswith('stage') and DEVICE != 'cuda':
        pytest.skip('detection sizes: CUDA only')
    if shape.startswith('stage') and dtype == torch.float64:
        pytest.skip('the reference unfolds 49 copies: float32 only there')
    *dims, stride = SHAPES[shape]
    tensors = inputs(*dims, stride, dtype)
    out, grads = run(triton_op, tensors, stride)
    out0, grads0 = run(local_relation_reference, tensors, stride)
    tol = TOLERANCE[dtype]
    assert rel(out, out0) < tol
    for name, got, expected in zip(('query', 'key', 'value', 'prior'),
                                   grads, grads0):
        assert rel(got, expected) < 10 * tol, name


def test_bf16_finite_and_near_float32():
    tensors = inputs(*SHAPES['odd'][:-1], 1, torch.float32)
    out32, grads32 = run(triton_op, tensors, 1)
    half = [t.detach().to(torch.bfloat16).requires_grad_() for t in tensors]
    out, grads = run(triton_op, half, 1)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel(out, out32) < 3e-2
    for got, expected in zip(grads, grads32):
        assert torch.isfinite(got).all()
        assert rel(got, expected) < 1e-1


def test_the_same_bits_every_run():
    tensors = inputs(*SHAPES['odd_stride2'][:-1], 2, torch.float32)
    first, second = run(triton_op, tensors, 2), run(triton_op, tensors, 2)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
