"""A 1x1 conv, BatchNorm and ReLU as one matmul
(``prm_det/ops/pointwise_norm.py``: LR-Net's stem): the batch moments from
the input's covariance against BatchNorm's, the folded layer against
``relu(batch_norm(conv2d(x)))`` (output and every gradient, float64), the
C++ kernels (``csrc/pointwise_relu_cpu.cpp``) against the torch ops
(float64 to 1e-12, float32; sizes around the kernel's chunk and lanes),
the same bits every run and thread count, and which route runs where."""
import pytest
import torch
import torch.nn.functional as F

from prm_det.ops import pointwise_norm, use_backend
from prm_det.ops.pointwise_norm import (pointwise_batch_moments,
                                        pointwise_norm_relu)

# (batch, in channels, out channels, height, width): positions around the
# kernel's chunk (1024) and partial sums (32), a 1x1 map, one input channel
SHAPES = [(2, 3, 11, 13, 17), (1, 3, 64, 32, 33), (3, 5, 4, 7, 3),
          (1, 1, 2, 1, 1), (2, 2, 3, 40, 52)]


def _relu_affine_torch(x, weight, bias):
    b = x.shape[0]
    return torch.baddbmm(bias[:, None], weight.expand(b, *weight.shape),
                         x).relu()


@pytest.mark.parametrize('shape', SHAPES, ids=str)
def test_moments_are_batch_norms_statistics(shape):
    b, ci, co, h, w = shape
    torch.manual_seed(0)
    x = torch.randn(b, ci, h, w, dtype=torch.float64) * 3 + 2
    weight = torch.randn(co, ci, 1, 1, dtype=torch.float64)
    y = F.conv2d(x, weight)
    mean, var = pointwise_batch_moments(x, weight)
    torch.testing.assert_close(mean, y.mean((0, 2, 3)), rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(var, y.var((0, 2, 3), unbiased=False),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('backend', ['cpu', 'torch'])
def test_folded_layer_is_conv_norm_relu_with_every_gradient(backend):
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 9, 7, dtype=torch.float64) + 1).requires_grad_()
    weight = torch.randn(6, 3, 1, 1, dtype=torch.float64,
                         requires_grad=True)
    gamma = torch.randn(6, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    leaves = (x, weight, gamma, beta)

    def folded(x, weight, gamma, beta):
        mean, var = pointwise_batch_moments(x, weight)
        return pointwise_norm_relu(x, weight, gamma, beta, mean, var, 1e-5)

    def modules(x, weight, gamma, beta):
        return F.relu(F.batch_norm(F.conv2d(x, weight), None, None, gamma,
                                   beta, training=True, eps=1e-5))

    with use_backend(backend):
        out = folded(*leaves)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, leaves, grad)
        assert torch.autograd.gradcheck(folded, leaves)
    want_out = modules(*leaves)
    want = torch.autograd.grad(want_out, leaves, grad)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(('x', 'weight', 'gamma', 'beta'), got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('shape', SHAPES, ids=str)
@pytest.mark.parametrize('input_grad', [True, False])
def test_kernel_matches_the_torch_ops(shape, dtype, input_grad):
    b, ci, co, h, w = shape
    torch.manual_seed(1)
    x = torch.randn(b, ci, h * w, dtype=dtype, requires_grad=input_grad)
    weight = torch.randn(co, ci, dtype=dtype, requires_grad=True)
    bias = torch.randn(co, dtype=dtype, requires_grad=True)
    leaves = (x, weight, bias) if input_grad else (weight, bias)
    out = pointwise_norm._PointwiseReLU.apply(x, weight, bias)
    want_out = _relu_affine_torch(x, weight, bias)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(want_out, leaves, grad)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(
        rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out, want_out, **tol)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)


def test_kernel_same_bits_every_run_and_thread_count():
    torch.manual_seed(2)
    x = torch.randn(3, 3, 5000, requires_grad=True)
    weight = torch.randn(16, 3, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    grad = torch.randn(3, 16, 5000)

    def run():
        out = pointwise_norm._PointwiseReLU.apply(x, weight, bias)
        return (out, *torch.autograd.grad(out, (x, weight, bias), grad))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        runs = [run(), run()]
        torch.set_num_threads(1)
        runs.append(run())
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_kernel_refuses_bad_inputs_by_name():
    ops = torch.ops.prm_det
    x = torch.randn(2, 3, 10)
    with pytest.raises(RuntimeError, match='weight'):
        ops.pointwise_relu_forward_cpu(x, torch.randn(4, 5), torch.randn(4))
    with pytest.raises(RuntimeError, match='float32 or float64'):
        ops.pointwise_relu_forward_cpu(x.half(), torch.randn(4, 3).half(),
                                       torch.randn(4).half())
    with pytest.raises(RuntimeError, match='bias'):
        ops.pointwise_relu_forward_cpu(x, torch.randn(4, 3), torch.randn(3))


@pytest.mark.parametrize('route', ['eager', 'autocast', 'torch backend',
                                   'compiling'])
def test_kernel_runs_in_eager_cpu_only(route, monkeypatch):
    """The kernel for float32/float64 CPU maps in eager mode on PRM's CPU
    backend; torch ops under autocast (the matmul in its dtype, as a conv
    would), the torch backends, and torch.compile (Inductor fuses them)."""
    calls = []
    apply = pointwise_norm._PointwiseReLU.apply
    monkeypatch.setattr(pointwise_norm._PointwiseReLU, 'apply',
                        lambda *a: calls.append(1) or apply(*a))
    if route == 'compiling':
        monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    x = torch.randn(2, 3, 8, 8)
    weight = torch.randn(4, 3, 1, 1)
    args = (x, weight, None, None, torch.zeros(4), torch.ones(4), 1e-5)
    if route == 'autocast':
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = pointwise_norm_relu(*args)
        assert out.dtype == torch.bfloat16
    elif route == 'torch backend':
        with use_backend('torch'):
            pointwise_norm_relu(*args)
    else:
        pointwise_norm_relu(*args)
    assert bool(calls) == (route == 'eager')
