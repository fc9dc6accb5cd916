"""The local relation aggregation (LR-Net): the readable reference against
the paper's equations written as loops, the op ``prm_det::local_relation``
on every backend against the reference (output and every gradient), its
custom-op contract (gradcheck, opcheck, torch.compile, ONNX export through
the reference), what it keeps for backward, and the edges: maps smaller
than the window, 1x1 maps, batch 1, non-square maps, half precision, NaN.
"""
import io
import math

import pytest
import torch

from prm_det.models.layers import LocalRelation2d
from prm_det.ops import use_backend
from prm_det.ops.local_relation import (SIMILARITIES,
                                        local_relation_reference)
from prm_det.ops.local_relation_op import (_local_relation, local_relation,
                                           relation_backend)

BACKENDS = ('torch', 'cpu', 'triton')
# (b, groups, m, h, w, kernel, stride)
CASES = [(2, 2, 3, 7, 9, 3, 1), (1, 3, 2, 8, 5, 5, 2), (2, 2, 2, 1, 1, 7, 1),
         (1, 1, 4, 3, 4, 7, 2), (2, 2, 1, 6, 6, 3, 3), (1, 2, 2, 2, 9, 7, 1)]
CASE_IDS = ['odd', 'stride2', '1x1', 'smaller_than_window', 'stride3',
            'thin']


def make(b, groups, m, h, w, kernel, stride, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    return (rand(b, groups, ho, wo), rand(b, groups, h, w),
            rand(b, groups * m, h, w), rand(groups, kernel, kernel))


def by_the_equations(query, key, value, prior, kernel, stride, method):
    """The paper's definition, one output position and group at a time."""
    b, channels, h, w = value.shape
    groups = key.shape[1]
    m, r = channels // groups, kernel // 2
    phi = {'squared_difference': lambda q, k: -(q - k)**2,
           'dot_product': lambda q, k: q * k,
           'absolute_difference': lambda q, k: -abs(q - k)}[method]
    out = torch.zeros(b, channels, *query.shape[2:], dtype=value.dtype)
    for n in range(b):
        for g in range(groups):
            for i in range(query.shape[2]):
                for j in range(query.shape[3]):
                    logits, points = [], []
                    for di in range(kernel):
                        for dj in range(kernel):
                            y, x = i * stride + di - r, j * stride + dj - r
                            if 0 <= y < h and 0 <= x < w:
                                logits.append(float(phi(
                                    query[n, g, i, j], key[n, g, y, x]) +
                                    prior[g, di, dj]))
                                points.append((y, x))
                    top = max(logits)
                    weights = [math.exp(t - top) for t in logits]
                    total = sum(weights)
                    for c in range(g * m, (g + 1) * m):
                        out[n, c, i, j] = sum(
                            wt / total * float(value[n, c, y, x])
                            for wt, (y, x) in zip(weights, points))
    return out


@pytest.mark.parametrize('method', SIMILARITIES)
@pytest.mark.parametrize('case', CASES[:4], ids=CASE_IDS[:4])
def test_reference_is_the_papers_equations(case, method):
    *_, kernel, stride = case
    inputs = make(*case)
    torch.testing.assert_close(
        local_relation_reference(*inputs, kernel, stride, method),
        by_the_equations(*inputs, kernel, stride, method))


def _run(backend, inputs, kernel, stride, method, grad_seed=1):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    if backend == 'reference':
        out = local_relation_reference(*inputs, kernel, stride, method)
    else:
        with use_backend(backend):
            assert relation_backend(inputs[2]) == backend
            out = local_relation(*inputs, kernel, stride, method)
    g = torch.Generator().manual_seed(grad_seed)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64).to(
        out.dtype)
    grads = torch.autograd.grad(out, inputs, grad)
    return out.detach(), grads


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('method', SIMILARITIES)
@pytest.mark.parametrize('case', CASES, ids=CASE_IDS)
def test_op_equals_the_reference(case, method, backend):
    *_, kernel, stride = case
    inputs = make(*case)
    out, grads = _run(backend, inputs, kernel, stride, method)
    out0, grads0 = _run('reference', inputs, kernel, stride, method)
    torch.testing.assert_close(out, out0, rtol=1e-10, atol=1e-12)
    for name, got, expected in zip(('query', 'key', 'value', 'prior'),
                                   grads, grads0):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11,
                                   msg=name)


@pytest.mark.parametrize('backend', BACKENDS)
def test_op_float32_close_to_float64(backend):
    case = (2, 4, 8, 12, 10, 7, 2)
    inputs = make(*case)
    out64, grads64 = _run(backend, inputs, 7, 2, 'squared_difference')
    out32, grads32 = _run(backend, [t.float() for t in inputs], 7, 2,
                          'squared_difference')
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-5)
    for got, expected in zip(grads32, grads64):
        torch.testing.assert_close(got.double(), expected, rtol=1e-3,
                                   atol=1e-4)


def test_reference_gradcheck():
    inputs = [t.requires_grad_() for t in make(1, 2, 2, 4, 5, 3, 2)]
    assert torch.autograd.gradcheck(
        lambda *t: local_relation_reference(*t, 3, 2, 'squared_difference'),
        inputs)


# (the interpreter took 20-25 s an element-wise gradcheck: there one
# similarity, in gradcheck's fast mode, a random projection of the Jacobian
# against its finite differences; every similarity's gradients are held to
# the reference above on every backend)
@pytest.mark.parametrize('backend,method', [
    (b, m) for b in BACKENDS for m in SIMILARITIES
    if b != 'triton' or m == 'squared_difference'])
def test_op_gradcheck(backend, method):
    inputs = [t.requires_grad_() for t in make(1, 2, 2, 4, 5, 3, 2, seed=4)]
    with use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda *t: local_relation(*t, 3, 2, method), inputs,
            fast_mode=backend == 'triton')


@pytest.mark.parametrize('backend', BACKENDS)
def test_opcheck(backend):
    query, key, value, prior = make(2, 2, 2, 5, 6, 3, 2, dtype=torch.float32)
    for t in (query, key, value, prior):
        t.requires_grad_()
    torch.library.opcheck(
        _local_relation, (query, key, value, prior, 3, 2,
                          'squared_difference', backend))


def test_compile_fullgraph_one_op_per_layer():
    torch.manual_seed(0)
    layer = LocalRelation2d(16, 16, kernel_size=5, stride=2,
                            channels_per_group=4)
    x = torch.randn(2, 16, 11, 9, requires_grad=True)
    with use_backend('reference'):
        expected = layer(x)
    seen = []

    def backend(gm, example_inputs):
        # the layer's autograd node: its forward and backward bodies are
        # subgraphs
        seen.extend(str(n.target) for sub in gm.modules()
                    if isinstance(sub, torch.fx.GraphModule)
                    for n in sub.graph.nodes if n.op == 'call_function')
        return gm.forward

    with use_backend('torch'):
        compiled = torch.compile(layer, fullgraph=True, backend=backend)
        out = compiled(x)
    ops = [t for t in seen if 'local_relation' in t]
    assert sorted(ops) == ['prm_det.local_relation.default',
                           'prm_det.local_relation_backward.default'], seen
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_onnx_export_runs_the_reference_in_onnxruntime():
    onnx = pytest.importorskip('onnx')
    onnxruntime = pytest.importorskip('onnxruntime')
    torch.manual_seed(0)
    layer = LocalRelation2d(16, 8, kernel_size=5, stride=2,
                            channels_per_group=4).eval()
    x = torch.randn(1, 16, 13, 10)
    buffer = io.BytesIO()
    torch.onnx.export(layer, (x, ), buffer, dynamo=False, opset_version=17,
                      input_names=['x'],
                      dynamic_axes={'x': {2: 'height', 3: 'width'}})
    model = onnx.load_from_string(buffer.getvalue())
    assert not any(n.domain.startswith('prm_det') for n in model.graph.node)
    session = onnxruntime.InferenceSession(
        buffer.getvalue(), providers=['CPUExecutionProvider'])
    for size in ((13, 10), (8, 15)):  # the exported size and another
        image = torch.randn(1, 16, *size)
        got = session.run(None, {'x': image.numpy()})[0]
        with torch.no_grad(), use_backend('torch'):
            torch.testing.assert_close(torch.from_numpy(got), layer(image),
                                       rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('backend', BACKENDS)
def test_backward_keeps_the_inputs_and_lse_only(backend):
    """Saved for backward: the four inputs and one value per (sample,
    group, position) - not the output (backward recomputes it), nothing of
    k * k times the map."""
    b, groups, m, h, w, kernel = 2, 4, 8, 16, 16, 7
    inputs = [t.float().requires_grad_()
              for t in make(b, groups, m, h, w, kernel, 1)]
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with use_backend(backend), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        local_relation(*inputs, kernel, 1, 'squared_difference')
    value_size = b * groups * m * h * w
    allowed = sum(t.numel() for t in inputs) + b * groups * h * w
    assert sum(saved) <= allowed, (saved, allowed)
    assert max(saved) <= value_size


def test_half_precision_cpu_maps_take_the_torch_backend():
    value = torch.randn(1, 4, 5, 5, dtype=torch.bfloat16)
    assert relation_backend(value) == 'torch'  # the C++ kernels: fp32/64
    assert relation_backend(value.float()) == 'cpu'


@pytest.mark.parametrize('backend', ['torch', 'triton'])
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_finite_and_close(backend, dtype):
    inputs = make(2, 2, 4, 6, 7, 7, 1, seed=2)
    out, grads = _run(backend, [t.to(dtype) for t in inputs], 7, 1,
                      'squared_difference')
    out0, grads0 = _run('reference', inputs, 7, 1, 'squared_difference')
    assert out.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(out.double(), out0, rtol=tol, atol=tol)
    for got, expected in zip(grads, grads0):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), expected, rtol=5 * tol,
                                   atol=5 * tol)


def test_layer_under_autocast_is_finite():
    torch.manual_seed(0)
    layer = LocalRelation2d(16, 16, channels_per_group=8)
    x = torch.randn(1, 16, 5, 6, requires_grad=True)
    with use_backend('torch'), torch.autocast('cpu', torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('where', ['value', 'key', 'query', 'inf_value'])
def test_nan_and_inf_reach_what_they_touch_as_the_reference(backend, where):
    query, key, value, prior = make(1, 2, 2, 6, 7, 3, 1, seed=5)
    target = {'value': value, 'key': key, 'query': query,
              'inf_value': value}[where]
    target[0, 1, 2, 3] = float('inf') if where == 'inf_value' else float(
        'nan')
    inputs = (query, key, value, prior)
    expected = local_relation_reference(*inputs, 3, 1, 'squared_difference')
    with use_backend(backend):
        got = local_relation(*inputs, 3, 1, 'squared_difference')
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.isfinite(expected).any()  # the rest untouched
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite], expected[finite])


def test_empty_batch():
    inputs = [t[:0] if i < 3 else t
              for i, t in enumerate(make(1, 2, 2, 4, 4, 3, 1))]
    with use_backend('torch'):
        out = local_relation(*inputs, 3, 1, 'squared_difference')
    assert out.shape == (0, 4, 4, 4)


@pytest.mark.parametrize('bad,match', [
    (dict(kernel=4), 'kernel_size must be a positive odd'),
    (dict(stride=0), 'stride must be a positive int'),
    (dict(method='cosine'), 'similarity must be one of'),
    (dict(key_groups=3), 'must split'),
    (dict(query_size=5), 'query must be'),
    (dict(prior_kernel=5), 'prior must be'),
])
def test_bad_inputs_name_the_problem(bad, match):
    kernel, stride = bad.get('kernel', 3), bad.get('stride', 1)
    query, key, value, prior = make(1, 2, 2, 6, 6, 3, 1)
    if 'key_groups' in bad:
        key = torch.randn(1, 3, 6, 6, dtype=torch.float64)
        query = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    if 'query_size' in bad:
        query = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    if 'prior_kernel' in bad:
        prior = torch.randn(2, 5, 5, dtype=torch.float64)
    with use_backend('torch'), pytest.raises(ValueError, match=match):
        local_relation(query, key, value, prior, kernel, stride,
                       bad.get('method', 'squared_difference'))


@pytest.mark.parametrize('bad,match', [
    (dict(channels_per_group=3), 'must divide in_channels=16'),
    (dict(kernel_size=6), 'kernel_size must be odd'),
    (dict(similarity='cosine'), 'similarity must be one of'),
])
def test_layer_refuses_options_that_cannot_work(bad, match):
    with pytest.raises(ValueError, match=match):
        LocalRelation2d(16, 16, **bad)
