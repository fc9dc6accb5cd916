"""The ``triton`` backend compiled on a CUDA GPU, against the readable
reference on the same device: the golden vectors, odd and detection-sized
maps, every dtype, BatchNorm in train and eval, channels_last, NaN, a whole
PRM-ResNet-50 (fp32 and bf16 autocast) and no host synchronization.

tests/test_ops runs the same kernels on CPU tensors through Triton's
interpreter; these run them compiled. Skipped without CUDA (CI has none);
``benchmarks/gpu_run.sh`` runs them on a lent GPU. To check this file on a
machine without one, ``PRM_DET_CUDA_TESTS_ON_CPU=1`` runs it on CPU tensors
through the interpreter, detection-sized cases left out.
"""
import contextlib
import copy

import pytest
import torch
from cuda_device import DEVICE, needs_cuda, on_the_device

from prm_det.ops import (BatchNorm, PRMOptions, PRMParams, prm_block_tail,
                         use_backend)

pytestmark = on_the_device

NAMES = ('weight', 'bias', 'one', 'zero', 'theta', 'scale')
ORACLE_FACTOR = 30  # see assert_same


def rel(a, b, floor=1e-30):
    """Relative error in norm; below ``floor`` the error is absolute."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


def make_params(groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = [torch.randn(1, groups, 1, 1, generator=g, dtype=torch.float64),
         torch.randn(1, groups, 1, 1, generator=g, dtype=torch.float64),
         torch.randn(1, groups, 1, generator=g, dtype=torch.float64),
         torch.randn(1, groups, 1, generator=g, dtype=torch.float64),
         torch.rand(1, 2, 1, 1, generator=g, dtype=torch.float64) + 0.1,
         torch.rand(1, generator=g, dtype=torch.float64) + 0.5]
    return [t.to(DEVICE) for t in p]


def make_norm(channels, training, seed=0):
    """A BatchNorm2d's tensors (float64; cast per run)."""
    g = torch.Generator().manual_seed(seed + 1)
    t = [torch.rand(channels, generator=g, dtype=torch.float64) + 0.5,
         torch.randn(channels, generator=g, dtype=torch.float64),
         torch.randn(channels, generator=g, dtype=torch.float64) * 0.1,
         torch.rand(channels, generator=g, dtype=torch.float64) + 0.5]
    return [x.to(DEVICE) for x in t], training


def run_tail(backend, c, identity, params, options, norm=None, relu=True,
             upstream=None, param_dtype=None):
    """Output, gradients of every input (None where unused) and the
    running statistics after one call on ``backend``."""
    param_dtype = param_dtype or c.dtype
    c = c.detach().clone().requires_grad_()
    inputs = [c]
    if identity is not None:
        identity = identity.detach().clone().requires_grad_()
        inputs.append(identity)
    ps = [p.detach().to(param_dtype).requires_grad_() for p in params]
    inputs += ps
    bn = None
    if norm is not None:
        (w, b, rm, rv), training = norm
        w = w.detach().to(param_dtype).requires_grad_()
        b = b.detach().to(param_dtype).requires_grad_()
        rm, rv = rm.to(param_dtype).clone(), rv.to(param_dtype).clone()
        bn = BatchNorm(w, b, rm, rv, training, 0.1, 1e-5)
        inputs += [w, b]
    with use_backend(backend):
        y = prm_block_tail(c, PRMParams(*ps), options, identity=identity,
                           norm=bn, relu=relu)
    if upstream is None:
        upstream = torch.randn(y.shape, generator=torch.Generator(
            ).manual_seed(7), dtype=torch.float64).to(y.device)
    grads = torch.autograd.grad((y.double() * upstream).sum(), inputs,
                                allow_unused=True)
    stats = (bn.running_mean, bn.running_var) if bn is not None else ()
    return y.detach(), grads, stats


def assert_same(got, want, tol, what='', oracle=None):
    """Output, gradients (index 1 on: the inputs' order in run_tail) and
    running statistics of ``got`` within ``tol`` of ``want``, relative, in
    norm; a gradient that nearly cancels (norm < 1e-4) in absolute terms.
    With ``oracle`` (the reference run in got's dtype), a quantity may also
    be off by up to ORACLE_FACTOR times the oracle's own error: some cases
    are ill-conditioned in float32 (one channel a group with BatchNorm
    training: there the float32 reference's gradients are off by 1e-4 to
    1e-3 and every backend's by more)."""
    got_all = [got[0], *got[1]]
    want_all = [want[0], *want[1]]
    oracle_all = ([oracle[0], *oracle[1]] if oracle is not None
                  else [None] * len(want_all))
    for i, (g, w, o) in enumerate(zip(got_all, want_all, oracle_all)):
        if w is None:  # no gradient: an option switched the input off
            assert g is None or not g.abs().max() > 0, (what, i)
            continue
        assert g is not None, (what, i)
        limit = tol
        if o is not None:
            limit = max(tol, ORACLE_FACTOR * rel(o, w, floor=1e-4))
        err = rel(g, w, floor=1e-4)
        assert err < limit, (what, i, err, limit)
    for s, s_ref in zip(got[2], want[2]):
        assert rel(s, s_ref) < tol, (what, 'running stats')


def test_triton_is_what_runs_on_this_device():
    from prm_det.ops import select_backend
    from prm_det.ops.backends import BACKENDS
    x = torch.zeros(1, 64, 2, 2, device=DEVICE)
    if DEVICE == 'cuda':  # chosen by default there
        assert select_backend(x, PRMOptions(groups=64)) is BACKENDS['triton']
    with use_backend('triton'):
        assert select_backend(x, PRMOptions(groups=64)) is BACKENDS['triton']


def test_golden_vectors_float64(golden):
    """The official layer's outputs and gradients, to 1e-9."""
    for i, case in enumerate(golden['cases']):
        x = case['x'].to(DEVICE)
        params = [case['params'][k].to(DEVICE) for k in NAMES]
        upstream = case['upstream'].to(DEVICE)
        y, grads, _ = run_tail('triton', x, None, params, PRMOptions(
            groups=case['groups'], mode=case['mode']), relu=False,
            upstream=upstream)
        want = [case['grad_x']] + [case['grad_params'][k] for k in NAMES]
        errs = [rel(y.cpu(), case['y'])] + [
            rel(g.cpu() if g is not None else torch.zeros_like(w), w)
            for g, w in zip(grads, want)]
        assert max(errs) < 1e-9, (i, case['mode'], case['groups'], errs)


# odd sizes, 1xN, Nx1 and 1x1 maps, one channel per group, rows wider than
# a tile, many positions per group
SHAPES = [(2, 16, 7, 9, 4), (1, 8, 1, 13, 8), (3, 12, 5, 1, 3),
          (2, 64, 11, 6, 64), (1, 6, 2, 2, 1), (2, 32, 1, 1, 8),
          (1, 24, 13, 17, 6), (2, 4, 3, 701, 2), (2, 256, 14, 14, 64)]
# BatchNorm (none, training, eval) with PRM's options
NORM_OPTIONS = [(None, {}), ('train', {}), ('eval', {}),
                ('train', {'use_position': False}),
                (None, {'use_norm': False}),
                ('eval', {'normalized_positions': True})]


@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-9),
                                       (torch.float32, 2e-4)])
@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('norm,options', NORM_OPTIONS)
def test_block_tail_matches_the_reference(dtype, tol, shape, norm, options):
    """relu(prm(bn(c)) + identity), every gradient and the running
    statistics, against the float64 reference on the same values."""
    b, ch, h, w, groups = shape
    if norm == 'train' and b * h * w == 1:
        pytest.skip('batch statistics of one value')
    g = torch.Generator().manual_seed(sum(shape))
    c = (torch.randn(b, ch, h, w, generator=g, dtype=torch.float64) * 2
         ).to(DEVICE)
    identity = torch.randn(b, ch, h, w, generator=g,
                           dtype=torch.float64).to(DEVICE)
    params = make_params(groups, seed=ch)
    bn = None if norm is None else make_norm(ch, norm == 'train')
    opts = PRMOptions(groups=groups, **options)
    got = run_tail('triton', c.to(dtype), identity.to(dtype), params, opts,
                   bn, param_dtype=dtype)
    want = run_tail('reference', c.to(dtype).double(),
                    identity.to(dtype).double(), params, opts, bn)
    assert got[0].dtype == dtype
    oracle = None
    if dtype != torch.float64:  # the reference in this dtype
        oracle = run_tail('reference', c.to(dtype), identity.to(dtype),
                          params, opts, bn, param_dtype=dtype)
    assert_same(got, want, tol, (shape, norm, options), oracle)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('norm', [None, 'train', 'eval'])
@pytest.mark.parametrize('shape', [(2, 32, 9, 7, 8), (2, 256, 28, 28, 64)])
def test_half_precision_maps(dtype, norm, shape):
    """float16 / bfloat16 maps in and out, float32 parameters (autocast's
    arrangement): equal to the float64 reference on the same values to
    half precision's tolerance."""
    b, ch, h, w, groups = shape
    g = torch.Generator().manual_seed(3)
    c = (torch.randn(b, ch, h, w, generator=g) * 3).to(DEVICE, dtype)
    identity = torch.randn(b, ch, h, w, generator=g).to(DEVICE, dtype)
    params = make_params(groups, seed=3)
    bn = None if norm is None else make_norm(ch, norm == 'train')
    opts = PRMOptions(groups=groups)
    got = run_tail('triton', c, identity, params, opts, bn,
                   param_dtype=torch.float32)
    want = run_tail('reference', c.double(), identity.double(), params,
                    opts, bn)
    assert got[0].dtype == dtype and got[1][0].dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert_same(got, want, tol, (dtype, norm, shape))


@pytest.mark.parametrize('norm', ['train', 'eval'])
def test_channels_last_maps(norm):
    g = torch.Generator().manual_seed(5)
    c = torch.randn(2, 128, 10, 13, generator=g, dtype=torch.float64)
    identity = torch.randn(2, 128, 10, 13, generator=g, dtype=torch.float64)
    c, identity = (t.to(DEVICE).to(memory_format=torch.channels_last)
                   for t in (c, identity))
    params = make_params(32, seed=5)
    bn = make_norm(128, norm == 'train')
    opts = PRMOptions(groups=32)
    got = run_tail('triton', c, identity, params, opts, bn)
    want = run_tail('reference', c.contiguous(), identity.contiguous(),
                    params, opts, bn)
    assert_same(got, want, 1e-9, norm)


@needs_cuda
@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-4),
                                       (torch.bfloat16, 2e-2),
                                       (torch.float16, 4e-3)])
@pytest.mark.parametrize('shape', [(2, 256, 200, 304), (32, 2048, 7, 7),
                                   (2, 1024, 50, 76)])
def test_detection_sized_maps(dtype, tol, shape):
    """The sizes the benchmarks time (a detection stage-1 map, a 32-image
    stage-4 map), BatchNorm training: equal to the torch backend in float64."""
    g = torch.Generator().manual_seed(11)
    c = torch.randn(*shape, generator=g).to(DEVICE, dtype)
    identity = torch.randn(*shape, generator=g).to(DEVICE, dtype)
    params = make_params(64, seed=11)
    bn = make_norm(shape[1], True)
    opts = PRMOptions(groups=64)
    got = run_tail('triton', c, identity, params, opts, bn,
                   param_dtype=torch.float32)
    want = run_tail('torch', c.double(), identity.double(), params, opts, bn)
    assert_same(got, want, tol, (shape, dtype))


def test_inference_written_over_the_input_equals_a_new_map():
    g = torch.Generator().manual_seed(2)
    c = torch.randn(2, 64, 9, 11, generator=g).to(DEVICE)
    identity = torch.randn(2, 64, 9, 11, generator=g).to(DEVICE)
    params = PRMParams(*(p.float() for p in make_params(16)))
    (w, b, rm, rv), _ = make_norm(64, False)
    norm = BatchNorm(w.float(), b.float(), rm.float(), rv.float(), False,
                     0.1, 1e-5)
    with torch.no_grad(), use_backend('triton'):
        y = prm_block_tail(c, params, PRMOptions(groups=16), identity,
                           norm, relu=True)
        scratch = c.clone()
        y2 = prm_block_tail(scratch, params, PRMOptions(groups=16), identity,
                            norm, relu=True, inplace=True)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)


def test_nan_and_inf_propagate_as_in_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 5, 6, generator=g)
    identity = torch.randn(2, 16, 5, 6, generator=g)
    x[0, 3, 2, 2] = float('nan')
    identity[1, 9, 0, 4] = float('nan')
    identity[1, 12, 3, 1] = float('inf')
    x, identity = x.to(DEVICE), identity.to(DEVICE)
    params = PRMParams(*(p.float() for p in make_params(4, seed=2)))
    outs = {}
    for name in ('triton', 'reference'):
        with torch.no_grad(), use_backend(name):
            outs[name] = prm_block_tail(x, params, PRMOptions(groups=4),
                                        identity, relu=True)
    y, y_ref = outs['triton'], outs['reference']
    assert torch.isnan(y[0, :4]).all()
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))
    assert torch.equal(torch.isinf(y), torch.isinf(y_ref))


@needs_cuda
def test_no_host_synchronization():
    """Forward and backward queue their kernels without waiting for the
    GPU (no .item(), no host-side shape from a device value)."""
    c = torch.randn(2, 256, 56, 56, device=DEVICE, requires_grad=True)
    identity = torch.randn_like(c, requires_grad=True)
    params = PRMParams(*(p.float().requires_grad_()
                         for p in make_params(64)))
    (w, b, rm, rv), _ = make_norm(256, True)
    norm = BatchNorm(w.float().requires_grad_(), b.float().requires_grad_(),
                     rm.float(), rv.float(), True, 0.1, 1e-5)
    with use_backend('triton'):  # compile first: compiling may sync
        y = prm_block_tail(c, params, PRMOptions(groups=64), identity, norm,
                           relu=True)
        y.sum().backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode('error')
        try:
            y = prm_block_tail(c, params, PRMOptions(groups=64), identity,
                               norm, relu=True)
            y.backward(torch.ones_like(y))
            with torch.no_grad():
                prm_block_tail(c, params, PRMOptions(groups=64), identity,
                               norm._replace(training=False), relu=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize('precision', ['fp64', 'fp32', 'bf16'])
def test_prm_resnet_on_triton_equals_torch(precision):
    """A whole PRM-ResNet (BatchNorm training; depth 50 on CUDA, 18 on the
    interpreter): outputs, parameter gradients and running statistics of
    the Triton kernels equal the torch backend's: to 1e-8 in float64; in
    float32 the outputs to 1e-3 and the gradients to 10% (some are
    ill-conditioned through a whole network: PRM-ResNet-18's first sigma
    gradient is 6% off its float64 value on the CPU kernel, 5% on the
    reference, 3% on Triton); under bfloat16 autocast finite results of the
    right dtype."""
    from mmdet.registry import MODELS
    torch.manual_seed(0)
    depth = 50 if DEVICE == 'cuda' else 18
    model = MODELS.build(dict(type='PRMResNet', depth=depth,
                              norm_eval=False)).to(DEVICE)
    model.train()
    with torch.no_grad():  # make every PRM term matter
        for name, p in model.named_parameters():
            if '.prm.' in name:
                p.add_(torch.randn_like(p) * 0.3)
    size = 128 if DEVICE == 'cuda' else 32
    x = torch.randn(2, 3, size, size, device=DEVICE)
    if precision == 'fp64':
        model, x = model.double(), x.double()
    dtype = torch.bfloat16 if precision == 'bf16' else None
    results = []
    for name in ('torch', 'triton'):
        m = copy.deepcopy(model)
        autocast = (torch.autocast(DEVICE, dtype=dtype) if dtype else
                    contextlib.nullcontext())
        with use_backend(name), autocast:
            outs = m(x)
        sum((o.double() ** 2).mean() for o in outs).backward()
        results.append((outs, m))
    (outs_t, m_t), (outs_k, m_k) = results
    if dtype is not None:
        # bfloat16 rounds differently on the two backends, and a rounding
        # can move a group's query (an argmax) and so its whole map: only
        # finite results of the right dtype, and outputs close overall
        # (not on the interpreter's 1x1 last stage)
        for a, b in zip(outs_k, outs_t):
            assert a.dtype == b.dtype == dtype and torch.isfinite(a).all()
            if DEVICE == 'cuda':
                assert rel(a, b) < 0.1
        for name, p in m_k.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), name
        return
    tol_y, tol_grad = (1e-8, 1e-8) if precision == 'fp64' else (1e-3, 0.1)
    for a, b in zip(outs_k, outs_t):
        assert rel(a, b) < tol_y
    grads_t = dict(m_t.named_parameters())
    for name, p in m_k.named_parameters():
        if p.grad is None:
            assert grads_t[name].grad is None, name
            continue
        assert rel(p.grad, grads_t[name].grad, floor=1e-4) < tol_grad, name
    buffers_t = dict(m_t.named_buffers())
    for name, b in m_k.named_buffers():
        if b.is_floating_point():
            assert rel(b, buffers_t[name]) < tol_y, name


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_forward_and_backward_twice_give_identical_bits(dtype):
    """The kernels split each (sample, group)'s positions over programs and
    reduce in a fixed order, without atomics: one input twice gives the
    same bits in the output, every gradient and the running statistics.
    A detection stage map on CUDA (2 images, 64 heads: 5 splits a pair),
    a small one through the interpreter."""
    shape = (2, 512, 100, 152) if DEVICE == 'cuda' else (2, 16, 24, 24)
    groups = 64 if DEVICE == 'cuda' else 4
    c = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) *
         2).to(DEVICE, dtype)
    identity = torch.randn(shape, generator=torch.Generator().manual_seed(1)
                           ).to(DEVICE, dtype)
    params = make_params(groups)
    norm = make_norm(shape[1], True)
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(2),
                           dtype=torch.float64).to(DEVICE)
    runs = [run_tail('triton', c, identity, params, PRMOptions(groups=groups),
                     norm=norm, upstream=upstream, param_dtype=torch.float32)
            for _ in range(2)]
    (y1, grads1, stats1), (y2, grads2, stats2) = runs
    assert torch.equal(y1, y2)
    for i, (a, b) in enumerate(zip(grads1, grads2)):
        assert torch.equal(a, b), i
    for a, b in zip(stats1, stats2):
        assert torch.equal(a, b)
