"""PRM's backends: one op, one saved state, the choice made in one place."""
import pytest
import torch
from op_params import params_for

from prm_det.ops import (BatchNorm, PRMOptions, PRMParams, prm_block_tail,
                         select_backend, use_backend)
from prm_det.ops.backends import BACKENDS


@pytest.mark.parametrize('with_norm', [False, True])
def test_every_backend_keeps_the_same_state(with_norm):
    """The state forward hands backward is one contract: the same query
    positions, query and context vectors and S statistics, and the same
    BatchNorm batch statistics, from every backend."""
    torch.manual_seed(0)
    c = torch.randn(2, 24, 7, 5, dtype=torch.float64)
    identity = torch.randn_like(c)
    options = PRMOptions(groups=6)
    params = params_for(6)
    weight = torch.rand(24, dtype=torch.float64) + 0.5
    bias = torch.randn(24, dtype=torch.float64)
    outs = {}
    for name, backend in BACKENDS.items():
        norm = None
        if with_norm:
            norm = BatchNorm(weight, bias, torch.zeros(24, dtype=torch.float64),
                             torch.ones(24, dtype=torch.float64), True, 0.1,
                             1e-5)
        outs[name] = (backend.forward(c, norm, identity, True, params,
                                      options), norm)
    (ref, ref_norm) = outs['torch']
    for name, (out, norm) in outs.items():
        assert out.state.query_index.dtype == torch.int64
        assert torch.equal(out.state.query_index, ref.state.query_index), name
        for got, want in zip(out.state[1:], ref.state[1:]):
            assert got.shape == want.shape, name
            torch.testing.assert_close(got.double(), want.double(),
                                       rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(out.y, ref.y, rtol=1e-10, atol=1e-12)
        if with_norm:
            torch.testing.assert_close(out.save_mean.double(),
                                       ref.save_mean.double(), msg=name)
            torch.testing.assert_close(out.save_invstd.double(),
                                       ref.save_invstd.double(), msg=name)
            torch.testing.assert_close(norm.running_var,
                                       ref_norm.running_var, msg=name)


def test_the_choice_of_backend_by_device_dtype_and_mode():
    options = PRMOptions(groups=4)
    x = torch.randn(1, 16, 3, 3)
    assert select_backend(x, options) is BACKENDS['cpu']
    assert select_backend(x.double(), options) is BACKENDS['cpu']
    assert select_backend(x.half(), options) is BACKENDS['torch']
    assert select_backend(x, options._replace(mode='cosine')) is None
    assert select_backend(x, options._replace(backend='reference')) is None
    with use_backend('triton'):
        assert select_backend(x, options) is BACKENDS['triton']
        # a layer's own choice comes first
        assert select_backend(x, options._replace(
            backend='torch')) is BACKENDS['torch']
    if torch.cuda.is_available():
        assert select_backend(x.cuda(), options) is BACKENDS['triton']


def test_tracing_takes_the_reference_route():
    """While exporting or tracing, PRM is the traceable reference (standard
    ops only: no custom op, no autograd.Function)."""
    from prm_det.models.layers import PRM
    layer = PRM(16, groups=4).eval()
    x = torch.randn(1, 16, 6, 5)
    traced = torch.jit.trace(layer, x)
    graph = str(traced.graph)
    assert 'prm_det::' not in graph and 'PythonOp' not in graph
    torch.testing.assert_close(traced(x), layer(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('with_norm', [False, True])
def test_triton_reads_half_precision_maps_directly(dtype, with_norm):
    """float16 and bfloat16 maps in, the same dtype out, float32 inside:
    equal to the float32 reference on the same values to half precision's
    tolerance, gradients included."""
    torch.manual_seed(1)
    groups = 8
    c = (torch.randn(2, 32, 9, 7) * 3).to(dtype)
    identity = torch.randn(2, 32, 9, 7).to(dtype)
    params = PRMParams(*(p.float().requires_grad_()
                         for p in params_for(groups, seed=3)))
    norm = None
    if with_norm:
        norm = BatchNorm(torch.rand(32) + 0.5, torch.randn(32),
                         torch.zeros(32), torch.ones(32), False, 0.1, 1e-5)
    upstream = torch.randn(2, 32, 9, 7)

    def run(name, c):
        c = c.clone().requires_grad_()
        with use_backend(name):
            y = prm_block_tail(c, params, PRMOptions(groups=groups),
                               identity=identity.to(c.dtype), norm=norm,
                               relu=True)
        grads = torch.autograd.grad((y.float() * upstream).sum(),
                                    [c, *params])
        return y, grads

    y, grads = run('triton', c)
    y_ref, grads_ref = run('reference', c.float())
    assert y.dtype == dtype and grads[0].dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    for got, want in zip((y, *grads), (y_ref, *grads_ref)):
        err = (got.float() - want).norm() / want.norm().clamp_min(1e-6)
        assert err < tol, err


def test_prm_resnet18_on_triton_equals_torch_forward_and_backward():
    """A whole PRMResNet-18 (BatchNorm training, every block's tail on the
    op) gives the torch backend's outputs, parameter gradients and running
    statistics on the Triton kernels. Narrow (16 base channels, 4 heads)
    and in float64: the interpreter runs each (sample, group) program in
    Python, and float32 rounding is amplified by BatchNorm over the last
    stage's two values per channel."""
    import copy

    from mmdet.registry import MODELS
    torch.manual_seed(0)
    model = MODELS.build(dict(type='PRMResNet', depth=18, norm_eval=False,
                              base_channels=16,
                              attention=dict(type='PRM', groups=4)))
    model = model.double()
    model.train()
    with torch.no_grad():  # make every PRM term matter
        for name, p in model.named_parameters():
            if '.prm.' in name:
                p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    results = []
    for name in ('torch', 'triton'):
        m = copy.deepcopy(model)
        with use_backend(name):
            outs = m(x)
            sum((o * o).mean() for o in outs).backward()
        results.append((outs, m))
    (outs_t, m_t), (outs_k, m_k) = results
    for a, b in zip(outs_k, outs_t):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    grads_t = dict(m_t.named_parameters())
    for name, p in m_k.named_parameters():
        if p.grad is None:
            assert grads_t[name].grad is None, name
            continue
        torch.testing.assert_close(p.grad, grads_t[name].grad, rtol=1e-8,
                                   atol=1e-10, msg=name)
    buffers_t = dict(m_t.named_buffers())
    for name, b in m_k.named_buffers():
        torch.testing.assert_close(b, buffers_t[name], msg=name)

