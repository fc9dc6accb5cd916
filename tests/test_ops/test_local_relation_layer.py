"""The local relation layer as one autograd node
(:func:`prm_det.ops.local_relation_layer.local_relation_layer`): the same
output and gradients as its modules one after another, on every backend,
strided or not, with or without the final conv's bias, under autocast; and
what its backward keeps: the input, the weights and the log-sum-exp."""
import pytest
import torch

from prm_det.models.layers import LocalRelation2d
from prm_det.ops import use_backend
from prm_det.ops.local_relation_layer import _LayerFunction
from prm_det.ops.local_relation_op import local_relation

BACKENDS = ('torch', 'cpu', 'triton')


def modules_one_after_another(layer, x):
    """The layer as modules (autograd through each), the op's own node."""
    s = layer.stride
    query = layer.query(x[:, :, ::s, ::s])
    aggregated = local_relation(query, layer.key(x), x, layer.prior(),
                                layer.kernel_size, s, layer.similarity)
    return layer.out(aggregated)


def _grads(fn, layer, x, grad):
    layer.zero_grad()
    x = x.detach().requires_grad_()
    out = fn(x)
    out.backward(grad)
    return out.detach(), [x.grad] + [p.grad.clone()
                                     for p in layer.parameters()]


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('stride,bias', [(1, False), (2, True), (3, False)])
def test_layer_equals_its_modules(backend, stride, bias):
    torch.manual_seed(0)
    layer = LocalRelation2d(12, 10, kernel_size=5, stride=stride,
                            channels_per_group=3, bias=bias).double()
    x = torch.randn(2, 12, 9, 7, dtype=torch.float64)
    ho, wo = (9 - 1) // stride + 1, (7 - 1) // stride + 1
    grad = torch.randn(2, 10, ho, wo, dtype=torch.float64)
    with use_backend(backend):
        out, grads = _grads(layer, layer, x, grad)
        out0, grads0 = _grads(lambda t: modules_one_after_another(layer, t),
                              layer, x, grad)
    torch.testing.assert_close(out, out0, rtol=1e-10, atol=1e-12)
    names = ['x'] + [n for n, _ in layer.named_parameters()]
    assert len(grads) == len(grads0) == len(names)
    for name, got, expected in zip(names, grads, grads0):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11,
                                   msg=name)


def test_layer_gradcheck():
    torch.manual_seed(0)
    layer = LocalRelation2d(4, 6, kernel_size=3, stride=2,
                            channels_per_group=2, bias=True).double()
    x = torch.randn(1, 4, 5, 4, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in
              (layer.query.weight, layer.key.weight, layer.out.weight,
               layer.out.bias)]
    prior = layer.prior().detach().requires_grad_()

    def run(x, wq, wk, wo, bo, prior):
        return _LayerFunction.apply(x, wq, wk, prior, wo, bo, 3, 2,
                                    'squared_difference', 'cpu')

    assert torch.autograd.gradcheck(run, (x, *params, prior))


def test_layer_keeps_the_input_weights_and_lse_only():
    """Saved for backward: x, the weights, the prior's network (its own
    small tensors) and 1/m of a map: 1.125 maps at m = 8, where the
    modules one after another keep x, the query, the key, the aggregated
    map and the log-sum-exp (2.375 maps)."""
    torch.manual_seed(0)
    layer = LocalRelation2d(32, 32, kernel_size=7, channels_per_group=8)
    x = torch.randn(2, 32, 16, 16, requires_grad=True)
    weights = sum(p.numel() for p in layer.parameters())

    def saved_by(fn):
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x)
        return sum(saved.values())

    with use_backend('cpu'):
        layer_saved = saved_by(layer)
        modules_saved = saved_by(
            lambda t: modules_one_after_another(layer, t))
    positions = layer.positions.numel()
    assert layer_saved <= x.numel() * 1.125 + weights + 4 * positions, (
        layer_saved, x.numel())
    assert modules_saved >= 2.3 * x.numel()


@pytest.mark.parametrize('backend', ['torch', 'cpu'])
def test_layer_under_autocast_computes_each_conv_as_the_modules(backend):
    """bfloat16 autocast: the 1x1 convs in bfloat16, the aggregation in the
    value's dtype; the node's gradients are the modules' (same casts)."""
    torch.manual_seed(0)
    layer = LocalRelation2d(16, 16, kernel_size=5, channels_per_group=4)
    x = torch.randn(2, 16, 7, 6)
    grad = torch.randn(2, 16, 7, 6)
    with use_backend(backend), torch.autocast('cpu', torch.bfloat16):
        out, grads = _grads(layer, layer, x, grad)
        out0, grads0 = _grads(lambda t: modules_one_after_another(layer, t),
                              layer, x, grad)
    assert out.dtype == out0.dtype == torch.bfloat16
    torch.testing.assert_close(out, out0)
    for got, expected in zip(grads, grads0):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)


def test_without_gradients_the_layer_runs_its_modules():
    torch.manual_seed(0)
    layer = LocalRelation2d(8, 8, kernel_size=3, channels_per_group=4)
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        out = layer(x)
    assert out.grad_fn is None
    torch.testing.assert_close(out, modules_one_after_another(layer, x))
