"""PRM tensor math: the official results, every backend against the readable
reference, and the faults of the official code that ours must not have."""
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from prm_det.models.layers.prm import batch_norm_of
from prm_det.ops import (PRMOptions, PRMParams, prm_block_tail,
                         prm_reference, prm_reference_of, use_backend)
from prm_det.ops.backends import cpu as cpu_backend

NAMES = ('weight', 'bias', 'one', 'zero', 'theta', 'scale')


def prm(x, *params, groups, mode='dotproduct', identity=None, relu=False,
        **options):
    """The op as the old positional call read: PRM (+ identity, ReLU) on the
    backend in force."""
    return prm_block_tail(
        x, PRMParams(*params), PRMOptions(groups=groups, mode=mode,
                                          **options),
        identity=identity, relu=relu)


def init_params(groups, dtype=torch.float64, seed=0, away=True):
    """Official shapes; drawn away from the initial values when ``away``."""
    g = torch.Generator().manual_seed(seed)
    shapes = dict(weight=(1, groups, 1, 1), bias=(1, groups, 1, 1),
                  one=(1, groups, 1), zero=(1, groups, 1), theta=(1, 2, 1, 1),
                  scale=(1, ))
    if not away:
        return dict(weight=torch.zeros(shapes['weight'], dtype=dtype),
                    bias=torch.ones(shapes['bias'], dtype=dtype),
                    one=torch.ones(shapes['one'], dtype=dtype),
                    zero=torch.zeros(shapes['zero'], dtype=dtype),
                    theta=torch.rand(shapes['theta'], generator=g,
                                     dtype=dtype),
                    scale=torch.ones(1, dtype=dtype))
    params = {k: torch.randn(s, generator=g, dtype=dtype)
              for k, s in shapes.items()}
    params['theta'] = params['theta'].abs() + 0.1
    params['scale'] = params['scale'].abs() + 0.5
    return params


def run(fn, x, params, upstream, **kw):
    x = x.detach().clone().requires_grad_()
    ps = [params[k].detach().clone().requires_grad_() for k in NAMES]
    y = fn(x, *ps, **kw)
    (y * upstream).sum().backward()
    # a parameter an option switches off gets no gradient: count it as zero
    grads = {k: p.grad if p.grad is not None else torch.zeros_like(p)
             for k, p in zip(NAMES, ps)}
    return y.detach(), x.grad, grads


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def golden_errors(case, params, fn=prm):
    y, gx, gp = run(fn, case['x'], params, case['upstream'],
                    groups=case['groups'], mode=case['mode'])
    errs = {'y': rel(y, case['y']), 'grad_x': rel(gx, case['grad_x'])}
    errs.update({f'grad_{k}': rel(gp[k], case['grad_params'][k])
                 for k in NAMES})
    return errs


def test_golden_vectors_match_official_float64(golden, backend):
    assert len(golden['cases']) >= 8
    for i, case in enumerate(golden['cases']):
        errs = golden_errors(case, case['params'], prm)
        worst = max(errs.values())
        assert worst < 1e-9, (i, case['mode'], case['groups'], errs)


def test_reference_matches_official_float64(golden):
    for i, case in enumerate(golden['cases']):
        errs = golden_errors(case, case['params'], prm_reference)
        worst = max(errs.values())
        assert worst < 1e-9, (i, case['mode'], case['groups'], errs)


@pytest.mark.parametrize('name', NAMES)
def test_golden_check_fails_when_a_parameter_is_perturbed(golden, name):
    case = golden['cases'][0]
    params = dict(case['params'])
    params[name] = params[name] * (1 + 1e-6) + 1e-6
    errs = golden_errors(case, params)
    assert max(errs.values()) > 1e-9, errs


def random_case(b, c, h, w, groups, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g, dtype=dtype)
    upstream = torch.randn(b, c, h, w, generator=g, dtype=dtype)
    return x, upstream


# odd sizes, 1xN and Nx1 maps, 1x1, one channel per group; the last two
# span several of the kernel's 512-position chunks (several rows per chunk,
# and rows wider than a chunk)
SHAPES = [(2, 16, 7, 9, 4), (1, 8, 1, 13, 8), (3, 12, 5, 1, 3),
          (2, 64, 11, 6, 64), (1, 6, 2, 2, 1), (2, 32, 1, 1, 8),
          (1, 24, 13, 17, 6), (1, 8, 37, 29, 2), (2, 4, 3, 701, 2)]
OPTIONS = [dict(), dict(use_position=False), dict(use_norm=False),
           dict(normalized_positions=True),
           dict(use_position=False, use_norm=False)]


def _reference_matrix():
    """Every backend, shape, option set and dtype, except that Triton's
    interpreter (which runs the kernels' programs one after another in
    Python, ~10 s for a 64-group case) takes every shape with the default
    options and every option set on two small shapes."""
    for name in ('cpu', 'torch', 'triton'):
        for options in OPTIONS:
            for shape in SHAPES:
                if name == 'triton' and options and shape not in SHAPES[:2]:
                    continue
                for dtype, tol in ((torch.float64, 1e-10),
                                   (torch.float32, 2e-4)):
                    yield pytest.param(name, dtype, tol, shape, options,
                                       id=f'{name}-{options}-{shape}-{dtype}')


@pytest.mark.parametrize('name,dtype,tol,shape,options', _reference_matrix())
def test_fast_path_matches_reference(name, dtype, tol, shape, options):
    with use_backend(name):
        _check_against_reference(dtype, tol, shape, options)


def _check_against_reference(dtype, tol, shape, options):
    b, c, h, w, groups = shape
    x, upstream = random_case(b, c, h, w, groups, dtype, seed=sum(shape))
    params = init_params(groups, dtype, seed=c)
    ref = run(prm_reference, x, params, upstream, groups=groups, **options)
    fast = run(prm, x, params, upstream, groups=groups, **options)
    # relative to the tensor's norm, with a floor at tol of the input's scale
    # (some parameter gradients are ~0 by symmetry, e.g. one channel per group
    # without position: float32 leaves only rounding noise there)
    def close(a, b):
        return (a - b).norm().item() <= tol * max(b.norm().item(), 1.0)

    assert close(fast[0], ref[0])
    assert close(fast[1], ref[1])
    for k in NAMES:
        assert close(fast[2][k], ref[2][k]), (k, options)


@pytest.mark.parametrize('mode', ['dotproduct', 'cosine', 'l1norm'])
def test_one_by_one_map_is_finite_and_gates_by_xi(mode, backend):
    x = torch.randn(2, 16, 1, 1, dtype=torch.float64)
    params = init_params(4)
    y, gx, gp = run(prm, x, params, torch.ones_like(x), groups=4, mode=mode)
    expected = x.view(2, 4, 4) * torch.sigmoid(params['bias'].view(1, 4, 1))
    torch.testing.assert_close(y, expected.view_as(x))
    assert torch.isfinite(gx).all()
    assert all(torch.isfinite(g).all() for g in gp.values())


@pytest.mark.parametrize('mode', ['dotproduct', 'cosine', 'l1norm'])
@pytest.mark.parametrize('value', [0.0, 3.5])
def test_constant_input_is_finite(mode, value, backend):
    x = torch.full((2, 16, 6, 5), value)
    params = init_params(4, torch.float32)
    y, gx, gp = run(prm, x, params, torch.randn_like(x), groups=4, mode=mode)
    assert torch.isfinite(y).all() and torch.isfinite(gx).all()
    assert all(torch.isfinite(g).all() for g in gp.values())


def test_bfloat16_autocast_at_realistic_magnitudes_is_finite_and_close():
    # post-BN activations of a trained network: a few units, some channels
    # with outliers near 50, 256 channels in 64 groups as in stage 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, 28, 28, generator=g) * 4
    x[:, ::17] *= 12
    params = {k: v.float() for k, v in init_params(64).items()}
    ps = [params[k].requires_grad_() for k in NAMES]
    xa = x.clone().requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = prm(xa.to(torch.bfloat16), *ps, groups=64)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert torch.isfinite(y.float()).all() and torch.isfinite(xa.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in ps)
    ref = prm(x.to(torch.bfloat16).float(), *[p.detach() for p in ps],
              groups=64)
    assert rel(y.float(), ref) < 1e-2


def test_float16_inputs_with_large_dot_products_do_not_overflow():
    # <x_p, q> over 32 channels of magnitude 60 is ~1e5 > float16 max
    x = (torch.rand(1, 2048, 4, 4) * 60).half()
    params = {k: v.float() for k, v in init_params(64).items()}
    y = prm(x, *[params[k] for k in NAMES], groups=64)
    assert y.dtype == torch.float16 and torch.isfinite(y.float()).all()


class OpRecorder(TorchDispatchMode):

    def __init__(self):
        super().__init__()
        self.ops, self.full_size_outputs = [], []
        self.full_numel = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func.overloadpacket))
        outs = out if isinstance(out, (tuple, list)) else [out]
        inputs = {a.untyped_storage().data_ptr()
                  for a in list(args) + list((kwargs or {}).values())
                  if isinstance(a, torch.Tensor)}
        for o in outs:
            if (isinstance(o, torch.Tensor) and o.numel() == self.full_numel
                    and o.untyped_storage().data_ptr() not in inputs):
                self.full_size_outputs.append(str(func.overloadpacket))
        return out


@pytest.mark.parametrize('name', ['cpu', 'torch'])
def test_no_nonzero_no_sync_no_distribution_objects(monkeypatch, name):
    """(Triton's interpreter copies every map to the host by design, so the
    triton backend is checked for this on a GPU only.)"""
    import torch.distributions

    def forbidden(*a, **k):
        raise AssertionError('torch.distributions used in PRM')

    monkeypatch.setattr(torch.distributions.Normal, '__init__', forbidden)
    x = torch.randn(2, 32, 7, 5, requires_grad=True)
    params = [p.requires_grad_() for p in init_params(8, torch.float32)
              .values()]
    rec = OpRecorder()
    with rec, use_backend(name):
        y = prm(x, *params, groups=8)
        y.sum().backward()
    assert not any('nonzero' in op for op in rec.ops), rec.ops
    # .item() / bool(tensor) / nonzero force a device sync via these ops
    assert not any(op in ('aten._local_scalar_dense', 'aten.item')
                   for op in rec.ops), rec.ops


@pytest.mark.parametrize('name', ['cpu', 'torch'])
def test_forward_materializes_no_full_size_gate(name):
    x = torch.randn(2, 64, 9, 7)
    params = list(init_params(16, torch.float32).values())
    rec = OpRecorder()
    rec.full_numel = x.numel()
    with torch.no_grad(), rec, use_backend(name):
        prm(x, *params, groups=16)
    # the output y = x * gate is the only full-size tensor forward makes
    assert len(rec.full_size_outputs) == 1, rec.full_size_outputs


def test_query_argmax_takes_first_maximum_and_position_matters(backend):
    # two identical peaks: the first (row-major) one is the query
    x = torch.zeros(1, 4, 3, 3, dtype=torch.float64)
    x[0, :, 0, 1] = 1.0
    x[0, :, 2, 2] = 1.0
    x[0, :, 1, 1] = 0.3
    params = init_params(1)
    y = prm(x, *[params[k] for k in NAMES], groups=1)
    y_ref = prm_reference(x, *[params[k] for k in NAMES], groups=1)
    torch.testing.assert_close(y, y_ref)
    # the two peaks are equal features but at different distances from the
    # query, so their gates differ
    gate = y[0, 0] / torch.where(x[0, 0] == 0, torch.ones_like(x[0, 0]),
                                 x[0, 0])
    assert not torch.isclose(gate[0, 1], gate[2, 2])


def test_math_imports_with_torch_alone():
    code = ('import sys\n'
            'for m in ("mmdet", "mmcv", "mmengine"): sys.modules[m] = None\n'
            'import torch\n'
            'from prm_det.ops import prm, PRMOptions, PRMParams\n'
            'x = torch.randn(1, 8, 3, 3)\n'
            'p = [torch.zeros(1,2,1,1), torch.ones(1,2,1,1), torch.ones(1,2,1),'
            ' torch.zeros(1,2,1), torch.rand(1,2,1,1), torch.ones(1)]\n'
            'y = prm(x, PRMParams(*p), PRMOptions(groups=2))\n'
            'assert y.shape == x.shape\n'
            'import prm_det\n'
            'assert "prm_det.models" not in sys.modules\n'
            'print("ok")\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                         text=True)
    assert out.returncode == 0 and out.stdout.strip() == 'ok', out.stderr


@pytest.mark.parametrize('shape', [(2, 16, 7, 9, 4), (1, 8, 1, 13, 8),
                                   (2, 32, 1, 1, 8)])
def test_fused_residual_relu_matches_prm_plus_identity_then_relu(
        shape, backend):
    b, c, h, w, groups = shape
    x, upstream = random_case(b, c, h, w, groups, torch.float64, seed=3)
    identity = torch.randn(b, c, h, w, dtype=torch.float64)
    params = init_params(groups, torch.float64, seed=4)

    def fused(x, *ps, groups):
        return prm(x, *ps, groups=groups, identity=ident, relu=True)

    def unfused(x, *ps, groups):
        return torch.relu(prm_reference(x, *ps, groups=groups) + ident)

    results = []
    for fn in (fused, unfused):
        ident = identity.clone().requires_grad_()
        y, gx, gp = run(fn, x, params, upstream, groups=groups)
        results.append((y, gx, gp, ident.grad))
    (y1, gx1, gp1, gi1), (y2, gx2, gp2, gi2) = results
    assert rel(y1, y2) < 1e-10 and rel(gx1, gx2) < 1e-10
    assert rel(gi1, gi2) < 1e-10
    for k in NAMES:
        assert (gp1[k] - gp2[k]).norm() <= 1e-10 * max(gp2[k].norm(), 1), k


def test_channels_last_inputs_give_the_same_results(backend):
    x, upstream = random_case(2, 32, 9, 7, 8, torch.float64, seed=5)
    params = init_params(8, torch.float64, seed=6)
    ref = run(prm, x, params, upstream, groups=8)
    cl = run(prm, x.to(memory_format=torch.channels_last), params,
             upstream.to(memory_format=torch.channels_last), groups=8)
    for a, b in zip(ref[:2], cl[:2]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for k in NAMES:
        torch.testing.assert_close(ref[2][k], cl[2][k], rtol=1e-12,
                                   atol=1e-12)


def test_cpu_runs_the_compiled_kernel_by_default():
    x = torch.randn(2, 32, 7, 5, requires_grad=True)
    params = [p.requires_grad_() for p in init_params(8, torch.float32)
              .values()]
    rec = OpRecorder()
    with rec:
        prm(x, *params, groups=8).sum().backward()
        with torch.no_grad():
            prm(x, *params, groups=8)
    assert rec.ops.count('prm_det.prm_forward') == 2, rec.ops
    assert rec.ops.count('prm_det.prm_backward') == 1, rec.ops
    # the kernel computes everything: no torch math op runs a [b*g, h*w] map
    assert 'aten.bmm' not in rec.ops and 'aten.sigmoid' not in rec.ops


def test_inference_without_autograd_equals_the_training_forward(backend):
    x, _ = random_case(2, 48, 9, 11, 12, torch.float32, seed=8)
    identity = torch.randn_like(x)
    params = [p.requires_grad_() for p in init_params(12, torch.float32,
                                                      seed=9).values()]
    y_grad = prm(x, *params, groups=12, identity=identity, relu=True)
    with torch.no_grad():
        y_inference = prm(x, *params, groups=12, identity=identity,
                          relu=True)
    assert y_grad.requires_grad and not y_inference.requires_grad
    torch.testing.assert_close(y_inference, y_grad.detach(), rtol=0, atol=0)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_eval_op_writes_over_c_what_the_forward_op_returns(dtype):
    """bn_prm_eval_ (inference, result over the conv's output) equals
    bn_prm_forward in eval bit for bit, and refuses an identity that
    overlaps c's memory (it would be overwritten while being read); one in
    the same storage but elsewhere is fine."""
    assert cpu_backend.available()
    ops = torch.ops.prm_det
    torch.manual_seed(3)
    c = torch.randn(2, 64, 9, 13, dtype=dtype)
    identity = torch.randn_like(c)
    bn = [torch.rand(64, dtype=dtype) + 0.5, torch.randn(64, dtype=dtype),
          torch.randn(64, dtype=dtype), torch.rand(64, dtype=dtype) + 0.5]
    params = list(init_params(16, dtype, seed=4).values())
    options = (16, True, True, False, 1e-5)
    y = ops.bn_prm_forward(c, *bn, False, 0.1, 1e-5, identity,
                         True, *params, *options)[0]
    scratch = c.clone()
    out = ops.bn_prm_eval_(scratch, *bn, 1e-5, identity, True,
                                        *params, *options)
    assert out.data_ptr() == scratch.data_ptr()
    assert torch.equal(scratch, y)
    with pytest.raises(RuntimeError, match='identity must not overlap'):
        ops.bn_prm_eval_(scratch, *bn, 1e-5, scratch[:], True,
                                      *params, *options)
    shared = torch.cat([c.flatten(), identity.flatten()])
    halves = shared.view(2, *c.shape)  # c, then identity, one storage
    ops.bn_prm_eval_(halves[0], *bn, 1e-5, halves[1], True,
                                  *params, *options)
    assert torch.equal(halves[0], y)
    assert torch.equal(halves[1], identity)


def block_tail(c, bn, identity, *params, groups, **kw):
    """relu(prm(bn(c)) + identity) from an nn.BatchNorm2d, as a block runs
    it (the module unpacks itself into the op's BatchNorm)."""
    return prm_block_tail(c, PRMParams(*params), PRMOptions(groups=groups),
                          identity=identity, norm=batch_norm_of(bn, c),
                          relu=True, **kw)


def test_reuse_c_with_an_identity_sharing_c_makes_a_new_map(backend):
    """In inference with ``inplace`` the op writes over c only when the
    identity is another map; sharing c's memory, it leaves c alone."""
    torch.manual_seed(5)
    bn = torch.nn.BatchNorm2d(32).eval()
    c = torch.randn(2, 32, 6, 7)
    params = list(init_params(8, torch.float32, seed=6).values())
    before = c.clone()
    with torch.no_grad():
        y = block_tail(c, bn, c[:], *params, groups=8, inplace=True)
        expected = block_tail(before.clone(), bn, before, *params, groups=8)
        scratch = before.clone()
        over = block_tail(scratch, bn, before, *params, groups=8,
                          inplace=True)
    assert torch.equal(c, before)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(over, expected, rtol=0, atol=0)


def _bn_prm_tail_grads(shape, groups, dtype, bn_training, frozen, seed):
    """relu(prm(bn(c)) + identity)'s output and every gradient, from
    the op, with the inputs in ``frozen`` not requiring grad."""
    torch.manual_seed(seed)
    bn = torch.nn.BatchNorm2d(shape[1]).to(dtype).train(bn_training)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    c = torch.randn(shape, dtype=dtype, requires_grad='c' not in frozen)
    identity = torch.randn(shape, dtype=dtype, requires_grad=True)
    bn.weight.requires_grad_('bn' not in frozen)
    bn.bias.requires_grad_('bn' not in frozen)
    params = [p.requires_grad_() for p in init_params(
        groups, dtype, seed=seed).values()]
    y = block_tail(c, bn, identity, *params, groups=groups)
    y.backward(torch.randn_like(y))
    leaves = [c, identity, bn.weight, bn.bias, *params]
    return [y.detach(), bn.running_mean, bn.running_var] + [
        t.grad for t in leaves]


def _batchnorm_matrix():
    """Every case on the CPU kernel; on Triton's interpreter (slow, see
    _reference_matrix) float64 with every BatchNorm mode and frozen input
    at a batch of 3, plus float32 and a batch of 1."""
    for name in ('cpu', 'triton'):
        for dtype, tol in ((torch.float32, 2e-4), (torch.float64, 1e-9)):
            for batch in (1, 3):
                for bn_training in (True, False):
                    for frozen in ((), ('c', ), ('bn', )):
                        if name == 'triton' and not (
                                (dtype == torch.float64 and batch == 3)
                                or (bn_training and frozen == ())):
                            continue
                        yield pytest.param(
                            dtype, tol, batch, bn_training, frozen, name,
                            id=f'{name}-{dtype}-b{batch}-'
                            f'{"train" if bn_training else "eval"}-{frozen}')


@pytest.mark.parametrize('dtype,tol,batch,bn_training,frozen,name',
                         _batchnorm_matrix())
def test_fused_batchnorm_backward_matches_torch_ops(dtype, tol, batch,
                                                    bn_training, frozen,
                                                    name):
    """Every backend's BatchNorm + PRM (the CPU kernel: a task per channel
    group over the whole batch, scratch kept per thread across calls;
    Triton: BatchNorm folded into the passes) gives the torch backend's
    output, running statistics and gradients through the one autograd
    Function, whichever inputs need them; on the kernel a large map run
    first leaves its scratch to a small one, then a large one again."""
    for shape, groups in (((batch, 48, 23, 17), 12), ((batch, 24, 5, 1), 6),
                          ((batch, 32, 9, 31), 8)):
        args = (shape, groups, dtype, bn_training, frozen, 11)
        with use_backend(name):
            fast = _bn_prm_tail_grads(*args)
        with use_backend('torch'):
            plain = _bn_prm_tail_grads(*args)
        for i, (a, b) in enumerate(zip(fast, plain)):
            if b is None:
                assert a is None, i
            else:
                torch.testing.assert_close(a, b, rtol=tol, atol=tol,
                                           msg=f'{shape} output {i}')


def test_batch_statistics_of_one_value_per_channel_are_refused(backend):
    """As nn.BatchNorm2d: training on one value per channel has no
    variance; the error names the shape and the ways out."""
    bn = torch.nn.BatchNorm2d(16).train()
    c = torch.randn(1, 16, 1, 1)
    params = list(init_params(4, torch.float32).values())
    with pytest.raises(ValueError, match=r'more than 1 value per channel.*'
                       r'\(1, 16, 1, 1\)'):
        block_tail(c, bn, torch.randn_like(c), *params, groups=4)
    assert bn.num_batches_tracked.item() == 0


def _fresh_backend_state(monkeypatch):
    """The backends as in a new process: PRM_DET_BACKEND not read yet, the
    CPU kernel neither built nor warned about."""
    from prm_det.ops import backends
    monkeypatch.setattr(backends, '_from_env', [])
    monkeypatch.setattr(cpu_backend, '_state',
                        dict(loaded=None, error=None, warned=False))


def test_environment_variable_forces_a_backend(monkeypatch):
    x = torch.randn(1, 16, 5, 5)
    params = list(init_params(4, torch.float32).values())
    monkeypatch.setenv('PRM_DET_BACKEND', 'torch')
    _fresh_backend_state(monkeypatch)
    rec = OpRecorder()
    with rec, torch.no_grad():
        y = prm(x, *params, groups=4)
    assert not any(op.startswith('prm_det.') for op in rec.ops), rec.ops
    monkeypatch.delenv('PRM_DET_BACKEND')
    _fresh_backend_state(monkeypatch)
    rec = OpRecorder()
    with rec, torch.no_grad():
        y_kernel = prm(x, *params, groups=4)
    assert any(op.startswith('prm_det.') for op in rec.ops), rec.ops
    torch.testing.assert_close(y, y_kernel)
    monkeypatch.setenv('PRM_DET_BACKEND', 'cuda-kernel')
    _fresh_backend_state(monkeypatch)
    with pytest.raises(ValueError, match="PRM_DET_BACKEND: unknown PRM "
                       "backend 'cuda-kernel'.*'torch'"):
        prm(x, *params, groups=4)


def test_a_forced_backend_that_cannot_take_the_map_says_why():
    x = torch.randn(1, 16, 5, 5, dtype=torch.float16)
    params = list(init_params(4, torch.float32).values())
    with use_backend('cpu'), pytest.raises(
            RuntimeError, match="backend 'cpu'.*cpu torch.float16 map.*"
            "float32 and float64"):
        prm(x, *params, groups=4)
    with pytest.raises(ValueError, match='unknown PRM backend'):
        with use_backend('cuda'):
            pass


def test_kernel_that_cannot_build_falls_back_with_a_warning_naming_why(
        monkeypatch):
    def no_compiler(verbose=False):
        raise RuntimeError('no C++ compiler found')

    monkeypatch.setattr(cpu_backend, 'build', no_compiler)
    _fresh_backend_state(monkeypatch)
    x = torch.randn(1, 16, 5, 5)
    params = list(init_params(4, torch.float32).values())
    with pytest.warns(UserWarning, match='no C.. compiler found.*Fix:'):
        y = prm(x, *params, groups=4)
    torch.testing.assert_close(y, prm_reference(x, *params, groups=4))
    assert 'no C++ compiler found' in cpu_backend.unavailable_reason()


@pytest.mark.parametrize('relu', [False, True])
def test_saturated_gates_stay_finite_and_match_the_reference(relu):
    """Large lambdas push some gates' pre-activations past +-88, where a
    float exp overflows: gates are then 0 or 1, never NaN, forward and
    backward, on the kernel as on the torch ops (a NaN gate hides behind
    the ReLU in forward, so both are checked)."""
    torch.manual_seed(0)
    groups = 8
    x = torch.randn(2, 32, 23, 29) * 3
    identity = torch.randn_like(x)
    params = init_params(groups, torch.float32, seed=9)
    params['weight'] = params['weight'] * 40  # |gain * (S - mean)| > 88
    upstream = torch.randn_like(x)
    results = []
    paths = ('cpu', 'torch', 'triton', 'reference')
    for path in paths:
        xs = x.clone().requires_grad_()
        ps = [p.clone().requires_grad_() for p in params.values()]
        with use_backend(path):
            y = prm(xs, *ps, groups=groups, identity=identity, relu=relu)
        y.backward(upstream)
        results.append([y.detach(), xs.grad] + [p.grad for p in ps])
    pre = params['weight'].abs().max() * 2  # gain * |S - mean| can pass 88
    assert pre > 88
    for path, result in zip(paths, results[:3]):
        for name, got, want in zip(('y', 'x', *params), result, results[2]):
            assert torch.isfinite(got).all(), (path, name)
            torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-3,
                                       msg=f'{path} {name}')


@pytest.mark.parametrize('relu', [False, True])
def test_nan_and_inf_propagate_as_in_torch(backend, relu):
    """A NaN or Inf in the map or in the shortcut reaches the output as
    ``relu(x * gate + identity)`` in torch ops carries it (the CPU kernel's
    fused ReLU once turned NaN into 0: a diverging run looked healthy on
    CPU), and the backward gives the reference's non-finite pattern."""
    torch.manual_seed(0)
    x = torch.randn(2, 16, 5, 6)
    identity = torch.randn_like(x)
    x[0, 3, 2, 2] = float('nan')  # group 0 of sample 0
    identity[1, 9, 0, 4] = float('nan')
    identity[1, 12, 3, 1] = float('inf')
    identity[1, 13, 4, 5] = float('-inf')
    params = list(init_params(4, torch.float32, seed=2).values())
    outs = {}
    for name in (backend, 'reference'):
        xs = x.clone().requires_grad_()
        with use_backend(name):
            y = prm(xs, *params, groups=4, identity=identity, relu=relu)
        y.backward(torch.ones_like(y))
        outs[name] = (y.detach(), xs.grad)
    (y, gx), (y_ref, gx_ref) = outs[backend], outs['reference']
    assert torch.isnan(y[0, :4]).all()  # the NaN's group, whole
    assert torch.isnan(y[1, 9, 0, 4]) and y[1, 12, 3, 1] == float('inf')
    expected_low = 0.0 if relu else float('-inf')
    assert y[1, 13, 4, 5] == expected_low
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))
    assert torch.equal(torch.isinf(y), torch.isinf(y_ref))
    finite = torch.isfinite(y_ref)
    torch.testing.assert_close(y[finite], y_ref[finite], rtol=1e-4,
                               atol=1e-5)
    assert torch.equal(torch.isfinite(gx), torch.isfinite(gx_ref))


@pytest.mark.parametrize('mode', ['dotproduct', 'cosine', 'l1norm'])
@pytest.mark.parametrize('use_position', [True, False])
def test_reference_intermediates_are_what_its_output_is_made_of(
        mode, use_position):
    """prm_reference_with_intermediates: the same output as prm_reference,
    and its parts make that output (y = x * gate, the queries are the first
    argmax of each group's channel sum, D as position_weight gives it)."""
    from prm_det.ops.reference import (position_weight,
                                       prm_reference_with_intermediates)
    torch.manual_seed(0)
    b, c, g, h, w = 2, 12, 3, 5, 7
    x = torch.randn(b, c, h, w, dtype=torch.float64)
    params = PRMParams(
        torch.randn(1, g, 1, 1, dtype=torch.float64),
        torch.randn(1, g, 1, 1, dtype=torch.float64),
        torch.randn(1, g, 1, dtype=torch.float64),
        torch.randn(1, g, 1, dtype=torch.float64),
        torch.rand(1, 2, 1, 1, dtype=torch.float64),
        torch.rand(1, dtype=torch.float64) + 0.5)
    options = PRMOptions(groups=g, mode=mode, use_position=use_position)
    y, parts = prm_reference_with_intermediates(
        x, *params, groups=g, mode=mode, use_position=use_position)
    expected = prm_reference(x, *params, groups=g, mode=mode,
                             use_position=use_position)
    assert torch.equal(y, expected)
    assert torch.equal(prm_reference_of(x, params, options), expected)
    torch.testing.assert_close(
        (x.view(b, g, c // g, h, w) * parts.gate[:, :, None]).view_as(x), y)
    index = x.view(b, g, c // g, h * w).sum(2).argmax(2)
    assert torch.equal(parts.query_index, index)
    assert torch.equal(parts.query_rc[..., 0] * w + parts.query_rc[..., 1],
                       index)
    d = position_weight(index.flatten(), h, w, params.theta, params.scale)
    assert torch.equal(parts.position_weight, d.view(b, g, h, w))
    assert parts.similarity.shape == parts.gate.shape == (b, g, h, w)
