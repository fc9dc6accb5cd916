"""The gate block tail (``prm_det::gate_moments``, ``prm_det::gate_tail``)
equals the modules run one after another: SE, GE, GC, SGE and CBAM after a
BatchNorm2d, with the shortcut add and ReLU, in float64 on each backend:
the output, every gradient (the map, the shortcut, BatchNorm's and the
module's parameters), the running statistics; training and eval; the
layouts and sizes the PRM op is tested on."""
import copy

import pytest
import torch
from torch import nn

import prm_det  # noqa: F401
from prm_det.models.layers import CBAM, GC, GE, SE, SGE
from prm_det.ops import use_backend
from prm_det.ops.gate_tail import (GateLogits, channel_moments, gate_tail,
                                   normalize, position_pool, tail_backend)

GATES = {
    'se': lambda ch: SE(ch, ratio=1 / 4),
    'ge': lambda ch: GE(ch),
    'gc': lambda ch: GC(ch, ratio=1 / 4),
    'gc_mul_avg': lambda ch: GC(ch, ratio=1 / 4, pooling_type='avg',
                                fusion_types=('channel_add', 'channel_mul')),
    'sge': lambda ch: SGE(ch, groups=4),
    'cbam': lambda ch: CBAM(ch, ratio=1 / 4, kernel_size=3),
}
BACKENDS = ('cpu', 'torch', 'triton')


def _randomize(module: nn.Module, seed: int) -> None:
    """Every parameter random (the fresh ones are zeros and ones, which
    would hide a wrong gradient)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)


def _pair(kind: str, ch: int, dtype=torch.float64):
    """(gate, norm) and an identical copy of both."""
    torch.manual_seed(0)
    gate = GATES[kind](ch).to(dtype)
    norm = nn.BatchNorm2d(ch).to(dtype)
    _randomize(gate, 1)
    _randomize(norm, 2)
    with torch.no_grad():
        norm.running_var.uniform_(0.5, 2.0)
        norm.running_mean.normal_()
    return (gate, norm), copy.deepcopy((gate, norm))


def _unfused(gate, norm, c, identity):
    return torch.relu(gate(norm(c)) + identity)


def _run(fn, gate, norm, c, identity, grad):
    c = c.detach().clone().requires_grad_()
    identity = identity.detach().clone().requires_grad_()
    y = fn(gate, norm, c, identity)
    y.backward(grad)
    params = {n: p.grad for n, p in gate.named_parameters()}
    params.update({'norm.' + n: p.grad for n, p in norm.named_parameters()})
    return y, c.grad, identity.grad, params, {
        'running_mean': norm.running_mean.clone(),
        'running_var': norm.running_var.clone()}


def _assert_same(fused, unfused, atol=1e-10):
    y, gc, gi, params, running = fused
    y0, gc0, gi0, params0, running0 = unfused
    torch.testing.assert_close(y, y0, atol=atol, rtol=1e-8)
    torch.testing.assert_close(gc, gc0, atol=atol, rtol=1e-7)
    torch.testing.assert_close(gi, gi0, atol=atol, rtol=1e-8)
    assert params.keys() == params0.keys()
    for name in params0:
        assert params[name] is not None, name
        torch.testing.assert_close(params[name], params0[name], atol=atol,
                                   rtol=1e-7, msg=name)
    for name in running0:
        torch.testing.assert_close(running[name], running0[name])


def _inputs(shape, channels_last=False, dtype=torch.float64, seed=3):
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(shape, generator=gen, dtype=dtype) * 2 + 0.5
    identity = torch.randn(shape, generator=gen, dtype=dtype)
    grad = torch.randn(shape, generator=gen, dtype=dtype)
    if channels_last:
        c, identity, grad = (t.contiguous(memory_format=torch.channels_last)
                             for t in (c, identity, grad))
    return c, identity, grad


def _fused(gate, norm, c, identity):
    return gate.forward_norm_residual(c, norm, identity)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('kind', list(GATES))
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
def test_fused_tail_equals_the_modules(kind, backend, training):
    (gate, norm), (gate0, norm0) = _pair(kind, 16)
    for module in (gate, norm, gate0, norm0):
        module.train(training)
    c, identity, grad = _inputs((3, 16, 5, 7))
    with use_backend(backend):
        assert tail_backend(c, identity) == backend
        fused = _run(_fused, gate, norm, c, identity, grad)
    _assert_same(fused, _run(_unfused, gate0, norm0, c, identity, grad))
    if training:
        assert int(norm.num_batches_tracked) == 1


@pytest.mark.parametrize('kind', list(GATES))
@pytest.mark.parametrize('case', ['channels_last', 'one_position', 'batch1',
                                  'strided'])
def test_fused_tail_layouts_and_sizes(kind, case):
    (gate, norm), (gate0, norm0) = _pair(kind, 8)
    shape = {'one_position': (4, 8, 1, 1), 'batch1': (1, 8, 6, 3)}.get(
        case, (2, 8, 6, 5))
    c, identity, grad = _inputs(shape, channels_last=case == 'channels_last')
    if case == 'strided':  # a view: every other column of a wider map
        wide, wide_id, _ = _inputs((2, 8, 6, 10))
        c, identity = wide[..., ::2], wide_id[..., ::2]
    expected = _run(_unfused, gate0, norm0, c, identity, grad)
    for backend in BACKENDS:
        g, n = copy.deepcopy((gate, norm))
        with use_backend(backend):
            result = _run(_fused, g, n, c, identity, grad)
        _assert_same(result, expected)
        if case == 'channels_last':
            assert result[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize('backend', BACKENDS)
def test_ops_gradcheck(backend):
    """Each op alone against numerical gradients (float64); Triton's
    interpreter in gradcheck's fast mode (a random projection of the
    Jacobian: the full one takes minutes there)."""
    gen = torch.Generator().manual_seed(0)
    fast = backend == 'triton'

    def rand(*shape):
        return torch.randn(*shape, generator=gen,
                           dtype=torch.float64).requires_grad_()

    c, identity = rand(2, 4, 3, 5), rand(2, 4, 3, 5)
    scale, shift, gate = rand(2, 4), rand(2, 4), rand(2, 2, 3, 5)
    gate_scale, gate_shift = rand(2, 2), rand(2, 2)
    for extrema in (False, True):  # (distinct values: no ties)
        torch.autograd.gradcheck(
            lambda c: tuple(t for t in channel_moments(c, backend, extrema)
                            if t.numel()), (c, ), fast_mode=fast)
    for groups in (1, 2):  # (distinct values: no ties for the max)
        for with_max in (False, True):
            torch.autograd.gradcheck(
                lambda c, s, t: [p for p in position_pool(
                    c, s, t, backend, groups=groups, with_max=with_max)
                    if p is not None],
                (c, scale, shift), fast_mode=fast)
    for gate_kind in (None, 'values', 'logits'):
        for with_identity in (False, True):
            def tail(c, i, s, t, g, gs, gt):
                return gate_tail(
                    c, s, t, backend, identity=i if with_identity else None,
                    gate=g if gate_kind == 'values' else None,
                    gate_logits=GateLogits(g, gs, gt)
                    if gate_kind == 'logits' else None, relu=True)

            torch.autograd.gradcheck(tail, (c, identity, scale, shift, gate,
                                            gate_scale, gate_shift),
                                     fast_mode=fast)


@pytest.mark.parametrize('backend', BACKENDS)
def test_ops_opcheck(backend):
    """torch.library.opcheck: schemas, fake tensors, autograd registration
    (the C++ kernels through the same ops)."""
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(2, 4, 3, 5, generator=gen, requires_grad=True)
    identity = torch.randn(2, 4, 3, 5, generator=gen, requires_grad=True)
    scale = torch.randn(2, 4, generator=gen, requires_grad=True)
    shift = torch.randn(2, 4, generator=gen, requires_grad=True)
    gate = torch.rand(2, 2, 3, 5, generator=gen, requires_grad=True)
    affine = torch.randn(2, 2, 2, generator=gen, requires_grad=True)
    for extrema in (False, True):
        torch.library.opcheck(torch.ops.prm_det.gate_moments.default,
                              (c, extrema, backend))
    for with_max in (False, True):
        torch.library.opcheck(torch.ops.prm_det.gate_position_pool.default,
                              (c, scale, shift, 2, with_max, backend))
    for args in ((c, identity, scale, shift, gate, None, True),
                 (c, identity, scale, shift, gate, affine, True),
                 (c, None, scale, shift, None, None, False)):
        torch.library.opcheck(torch.ops.prm_det.gate_tail.default,
                              (*args, backend))


@pytest.mark.parametrize('offset,spread', [(20.0, 3.0), (1000.0, 0.01)])
def test_normalize_running_statistics_as_batch_norm(offset, spread):
    """Chan's combination of the per-sample moments gives BatchNorm's batch
    statistics and running update in float32, also for a mean 1e5 times
    the spread (sums of squares would cancel to nothing there); the folded
    affine ``c * alpha + beta`` is BatchNorm's output to float32's
    resolution of ``c``."""
    from prm_det.models.layers.prm import batch_norm_of
    c = torch.randn(4, 6, 9, 9) * spread + offset
    norm = nn.BatchNorm2d(6)
    reference = copy.deepcopy(norm)
    nmap = normalize(c, batch_norm_of(norm, c), 'torch')
    x = c * nmap.alpha[:, None, None] + nmap.beta[:, None, None]
    expected = reference(c)
    resolution = torch.finfo(torch.float32).eps * offset / spread
    torch.testing.assert_close(x, expected, atol=4 * resolution, rtol=0)
    torch.testing.assert_close(norm.running_var, reference.running_var)
    torch.testing.assert_close(norm.running_mean, reference.running_mean)


@pytest.mark.parametrize('kind', list(GATES))
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_fused_tail_autocast_finite(kind, dtype):
    """Under autocast the tail runs (torch backend for half maps) and every
    gradient is finite; the result is close to the modules'."""
    (gate, norm), (gate0, norm0) = _pair(kind, 16, dtype=torch.float32)
    c, identity, grad = _inputs((2, 16, 6, 6), dtype=torch.float32)
    outs = []
    for fn, g, n in ((_fused, gate, norm), (_unfused, gate0, norm0)):
        with torch.autocast('cpu', dtype=dtype):
            c_half = c.to(dtype).requires_grad_()
            y = fn(g, n, c_half, identity.to(dtype))
        y.float().backward(grad)
        assert y.dtype == dtype
        assert torch.isfinite(c_half.grad).all()
        assert all(torch.isfinite(p.grad).all() for p in g.parameters())
        outs.append(y.float())
    torch.testing.assert_close(outs[0], outs[1], atol=0.1, rtol=0.05)


def test_reference_backend_and_export_run_the_modules():
    """'reference' (and exporting) leave the tail to the modules."""
    c = torch.randn(2, 4, 3, 3)
    with use_backend('reference'):
        assert tail_backend(c) is None
    assert tail_backend(c[:0]) is None


@pytest.mark.parametrize('type_', ['SEResNet', 'GEResNet', 'GCResNet',
                                   'SGEResNet', 'CBAMResNet'])
def test_backbones_fused_equal_the_modules(type_):
    """A whole (tiny) backbone in float64: every block's tail fused (the
    default backend) against the modules one after another ('reference'):
    outputs, every parameter's gradient, every buffer."""
    from helpers import tiny_backbone
    torch.manual_seed(0)
    model = tiny_backbone(type_, stages=2).double()
    for name, p in model.named_parameters():  # the gates off their init
        if not name.startswith(('conv1', 'bn1')):
            with torch.no_grad():
                p.add_(torch.randn_like(p) * 0.1)
    model.train()
    modules = copy.deepcopy(model)
    x = torch.randn(2, 3, 40, 24, dtype=torch.float64)
    calls = []
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: calls.append(t.grad_fn) or t, lambda t: t):
        outs = model(x)
    # the op's autograd node (eager mode: its autograd.Function's)
    assert any('TailFunction' in type(f).__name__ for f in calls)
    sum(o.square().mean() for o in outs).backward()
    with use_backend('reference'):
        expected = modules(x)
        sum(o.square().mean() for o in expected).backward()
    for got, want in zip(outs, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    for (name, p), (_, q) in zip(model.named_parameters(),
                                 modules.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-10,
                                   msg=name)
    for (name, b), (_, b0) in zip(model.named_buffers(),
                                  modules.named_buffers()):
        torch.testing.assert_close(b, b0, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize('kind', ['se', 'sge', 'cbam'])
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_triton_reads_half_precision_maps(kind, dtype):
    """float16 and bfloat16 maps on the Triton kernels (what a CUDA
    autocast run gives them): the map's dtype out, float32 inside, equal
    to the modules on the same values in float32 to half precision's
    tolerance, gradients included."""
    (gate, norm), (gate0, norm0) = _pair(kind, 16, dtype=torch.float32)
    c, identity, grad = _inputs((2, 16, 6, 5), dtype=torch.float32)
    c_half, id_half = c.to(dtype), identity.to(dtype)
    with use_backend('triton'):
        assert tail_backend(c_half, id_half) == 'triton'
        got = _run(_fused, gate, norm, c_half, id_half, grad.to(dtype))
    want = _run(_unfused, gate0, norm0, c_half.float(), id_half.float(),
                grad)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    for g, w in zip((got[0], got[1], *got[3].values()),
                    (want[0], want[1], *want[3].values())):
        err = (g.float() - w).norm() / w.norm().clamp_min(1e-6)
        assert err < tol, err


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('kind', ['se', 'sge', 'cbam', 'gc'])
def test_nan_and_inf_propagate_as_the_modules(kind, backend):
    """A NaN in the map and an Inf in the shortcut reach the output and the
    gradient where the modules put them (eval: the norm's running
    statistics keep a NaN local to its sample): the fused ReLU, pooling
    maxima and reductions do not drop them."""
    (gate, norm), (gate0, norm0) = _pair(kind, 8)
    for module in (gate, norm, gate0, norm0):
        module.eval()
    c, identity, grad = _inputs((2, 8, 5, 6))
    c[0, 3, 2, 2] = float('nan')
    identity[1, 5, 0, 4] = float('inf')
    with use_backend(backend):
        y, gc, gi, _, _ = _run(_fused, gate, norm, c, identity, grad)
    y0, gc0, gi0, _, _ = _run(_unfused, gate0, norm0, c, identity, grad)
    assert torch.isnan(y0).any() and torch.isinf(y0).any()
    for got, want in ((y, y0), (gc, gc0), (gi, gi0)):
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        assert torch.equal(torch.isinf(got), torch.isinf(want))
