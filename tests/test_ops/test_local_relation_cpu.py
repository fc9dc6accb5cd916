"""The local relation aggregation's C++ CPU kernels
(``csrc/local_relation_cpu.cpp`` through ``backends.local_relation_cpu``)
against the torch backend and the readable reference's autograd: the
output, the log-sum-exp and every gradient, in float64 (to 1e-12) and
float32, across strides, kernel sizes, maps smaller than the window, 1x1
and non-square maps, channels per group and the three similarities; NaN
and Inf inputs give the torch backend's non-finite pattern; the same bits
every run and at any thread count; bad inputs are refused by name."""
import pytest
import torch

from prm_det.ops.backends import cpu
from prm_det.ops.backends import local_relation_cpu as kernel
from prm_det.ops.backends import local_relation_torch as torch_backend
from prm_det.ops.local_relation import (SIMILARITIES,
                                        local_relation_reference,
                                        output_size)

# (batch, channels, groups, height, width, kernel_size, stride)
CASES = [
    (2, 8, 4, 9, 7, 3, 1),     # m = 2, odd non-square map
    (1, 8, 1, 6, 5, 3, 1),     # m = 8
    (2, 4, 4, 10, 12, 7, 1),   # m = 1, window of 7
    (1, 6, 3, 7, 9, 7, 2),     # stride 2, odd sizes
    (2, 16, 2, 8, 11, 3, 2),   # stride 2, m = 8
    (1, 4, 2, 11, 10, 5, 3),   # stride 3
    (1, 2, 2, 9, 8, 7, 3),     # stride 3, window of 7
    (2, 4, 2, 5, 6, 1, 1),     # kernel 1: the weights are all 1
    (1, 4, 2, 7, 5, 1, 2),     # kernel 1, stride 2
    (1, 8, 4, 3, 2, 7, 1),     # a map smaller than the window
    (2, 2, 1, 2, 3, 7, 2),     # smaller than the window, stride 2
    (1, 8, 4, 1, 1, 7, 1),     # a 1x1 map
    (1, 2, 1, 1, 1, 3, 3),     # a 1x1 map, stride 3
    (1, 2, 2, 1, 9, 3, 1),     # a single row
    (2, 2, 2, 8, 1, 7, 2),     # a single column
]
# rows of several vector blocks (16 float32 / 8 float64 lanes) and a
# remainder: the stride-2 phases split and merged a vector at a time
WIDE = [
    (1, 8, 2, 5, 37, 7, 2),
    (1, 4, 2, 4, 40, 7, 1),
]


def _case_id(case):
    b, c, g, h, w, k, s = case
    return f'b{b}c{c}g{g}_{h}x{w}_k{k}s{s}'


def _inputs(case, dtype, seed=0):
    b, c, g, h, w, k, s = case
    gen = torch.Generator().manual_seed(seed)
    ho, wo = output_size(h, s), output_size(w, s)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(
            dtype)

    return rand(b, g, ho, wo), rand(b, g, h, w), rand(b, c, h, w), rand(
        g, k, k)


def _reference(inputs, grad_out, k, s, method):
    """The reference's output and autograd gradients, in float64."""
    leaves = [t.detach().to(torch.float64).requires_grad_() for t in inputs]
    out = local_relation_reference(*leaves, k, s, method)
    grads = torch.autograd.grad(out, leaves, grad_out.to(torch.float64))
    return out.detach(), grads


def _torch_backend(inputs, grad_out, k, s, method):
    with torch.no_grad():
        out, lse = torch_backend.forward(*inputs, k, s, method)
        *grads, again = torch_backend.backward(grad_out, *inputs, lse, k, s,
                                               method)
    torch.testing.assert_close(again, out, equal_nan=True)  # recomputed
    return out, lse, tuple(grads)


def _kernel(inputs, grad_out, k, s, method):
    out, lse = kernel.forward(*inputs, k, s, method)
    *grads, again = kernel.backward(grad_out, *inputs, lse, k, s, method)
    torch.testing.assert_close(again, out, equal_nan=True)  # recomputed
    return out, lse, tuple(grads)


def _grad_out(case, dtype, seed=1):
    b, c, _, h, w, _, s = case
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, output_size(h, s), output_size(w, s),
                       generator=gen, dtype=torch.float64).to(dtype)


NAMES = ('grad_query', 'grad_key', 'grad_value', 'grad_prior')


@pytest.mark.parametrize('method', SIMILARITIES)
@pytest.mark.parametrize('case', CASES + WIDE, ids=_case_id)
def test_float64_matches_reference_and_torch_backend(case, method):
    k, s = case[5], case[6]
    inputs = _inputs(case, torch.float64)
    grad_out = _grad_out(case, torch.float64)
    out, lse, grads = _kernel(inputs, grad_out, k, s, method)
    ref_out, ref_grads = _reference(inputs, grad_out, k, s, method)
    t_out, t_lse, t_grads = _torch_backend(inputs, grad_out, k, s, method)
    assert out.dtype == lse.dtype == torch.float64
    assert out.shape == ref_out.shape and lse.shape == t_lse.shape
    tol = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(out, t_out, **tol)
    torch.testing.assert_close(lse, t_lse, **tol)
    for name, got, ref, other, inp in zip(NAMES, grads, ref_grads, t_grads,
                                          inputs):
        assert got.shape == inp.shape and got.dtype == inp.dtype, name
        torch.testing.assert_close(got, ref, **tol, msg=name)
        torch.testing.assert_close(got, other, **tol, msg=name)


@pytest.mark.parametrize('method', SIMILARITIES)
@pytest.mark.parametrize('case', CASES[:7] + CASES[9:10] + WIDE,
                         ids=_case_id)
def test_float32_matches_reference_and_torch_backend(case, method):
    k, s = case[5], case[6]
    inputs = _inputs(case, torch.float32)
    grad_out = _grad_out(case, torch.float32)
    out, lse, grads = _kernel(inputs, grad_out, k, s, method)
    # the reference on the same (float32) values, computed in float64
    ref_out, ref_grads = _reference(inputs, grad_out, k, s, method)
    t_out, t_lse, t_grads = _torch_backend(inputs, grad_out, k, s, method)
    assert out.dtype == lse.dtype == torch.float32
    tol = dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out, ref_out.float(), **tol)
    torch.testing.assert_close(out, t_out, **tol)
    torch.testing.assert_close(lse, t_lse, **tol)
    for name, got, ref, other in zip(NAMES, grads, ref_grads, t_grads):
        assert got.dtype == torch.float32, name
        # the prior's gradient sums over every sample and position
        scale = max(1.0, ref.abs().max().item())
        torch.testing.assert_close(got, ref.float(), rtol=2e-5,
                                   atol=2e-5 * scale, msg=name)
        torch.testing.assert_close(got, other, rtol=2e-5,
                                   atol=2e-5 * scale, msg=name)


def _same_non_finite(got, want, what):
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (
        f'{what}: NaN at {torch.isnan(got).nonzero().tolist()}, the torch '
        f'backend at {torch.isnan(want).nonzero().tolist()}')
    assert torch.equal(torch.isposinf(got), torch.isposinf(want)), what
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), what
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5,
                               atol=1e-5, msg=what)


SPECIALS = [float('nan'), float('inf'), float('-inf')]
TARGETS = ('query', 'key', 'value', 'prior', 'grad_out')


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('method', SIMILARITIES)
@pytest.mark.parametrize('target', TARGETS)
@pytest.mark.parametrize('special', SPECIALS, ids=('nan', 'inf', '-inf'))
def test_non_finite_inputs_match_torch_backend(special, target, method,
                                               dtype):
    case = (2, 8, 4, 9, 8, 5, 1) if target != 'query' else (
        1, 4, 2, 10, 9, 3, 2)
    k, s = case[5], case[6]
    query, key, value, prior = _inputs(case, dtype, seed=3)
    grad_out = _grad_out(case, dtype, seed=4)
    t = dict(query=query, key=key, value=value, prior=prior,
             grad_out=grad_out)[target]
    flat = t.view(-1)
    gen = torch.Generator().manual_seed(5)
    # a few scattered entries, one of them on a border of the map
    picks = torch.randperm(flat.numel(), generator=gen)[:3].tolist() + [0]
    flat[picks] = special
    inputs = (query, key, value, prior)
    out, lse, grads = _kernel(inputs, grad_out, k, s, method)
    t_out, t_lse, t_grads = _torch_backend(inputs, grad_out, k, s, method)
    _same_non_finite(out, t_out, 'out')
    _same_non_finite(lse, t_lse, 'lse')
    for name, got, want in zip(NAMES, grads, t_grads):
        _same_non_finite(got, want, name)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_non_finite_mixture_matches_torch_backend(dtype):
    """NaN and both infinities in every input at once, every similarity."""
    case = (2, 8, 4, 11, 9, 7, 2)
    k, s = case[5], case[6]
    gen = torch.Generator().manual_seed(7)
    for method in SIMILARITIES:
        query, key, value, prior = _inputs(case, dtype, seed=8)
        grad_out = _grad_out(case, dtype, seed=9)
        for t in (query, key, value, prior, grad_out):
            flat = t.view(-1)
            for special in SPECIALS:
                flat[torch.randint(flat.numel(), (1,), generator=gen)] = (
                    special)
        inputs = (query, key, value, prior)
        out, lse, grads = _kernel(inputs, grad_out, k, s, method)
        t_out, t_lse, t_grads = _torch_backend(inputs, grad_out, k, s,
                                               method)
        _same_non_finite(out, t_out, f'{method} out')
        _same_non_finite(lse, t_lse, f'{method} lse')
        for name, got, want in zip(NAMES, grads, t_grads):
            _same_non_finite(got, want, f'{method} {name}')


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_same_bits_every_run_and_thread_count(dtype):
    case = (2, 16, 4, 15, 13, 7, 1)
    k, s = case[5], case[6]
    inputs = _inputs(case, dtype, seed=11)
    grad_out = _grad_out(case, dtype, seed=12)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        runs = [_kernel(inputs, grad_out, k, s, 'squared_difference')
                for _ in range(2)]
        torch.set_num_threads(1)
        runs.append(_kernel(inputs, grad_out, k, s, 'squared_difference'))
    finally:
        torch.set_num_threads(threads)
    first = [runs[0][0], runs[0][1], *runs[0][2]]
    for run in runs[1:]:
        for a, b in zip(first, [run[0], run[1], *run[2]]):
            assert torch.equal(a, b)


def test_non_contiguous_inputs_through_the_backend():
    case = (2, 8, 4, 9, 7, 3, 2)
    k, s = case[5], case[6]
    inputs = _inputs(case, torch.float64)
    grad_out = _grad_out(case, torch.float64)
    # the same values in channels-last layout
    strided = tuple(t.contiguous(memory_format=torch.channels_last)
                    if t.dim() == 4 else
                    t.transpose(1, 2).contiguous().transpose(1, 2)
                    for t in inputs)
    assert not any(t.is_contiguous() for t in strided)
    want = _kernel(inputs, grad_out, k, s, 'dot_product')
    got = _kernel(strided, grad_out.contiguous(
        memory_format=torch.channels_last), k, s, 'dot_product')
    for a, b in zip([want[0], want[1], *want[2]], [got[0], got[1], *got[2]]):
        assert torch.equal(a, b)


def test_refuses_bad_inputs_by_name():
    ops = cpu._ops()
    case = (1, 4, 2, 5, 5, 3, 1)
    q, key, v, p = _inputs(case, torch.float32)
    with pytest.raises(RuntimeError, match='float32 or float64'):
        ops.local_relation_forward_cpu(q.half(), key.half(), v.half(),
                                       p.half(), 3, 1, 'dot_product')
    with pytest.raises(RuntimeError, match="key must be a CPU Double"):
        ops.local_relation_forward_cpu(q.double(), key, v.double(),
                                       p.double(), 3, 1, 'dot_product')
    with pytest.raises(RuntimeError, match='method must be one of'):
        ops.local_relation_forward_cpu(q, key, v, p, 3, 1, 'cosine')
    with pytest.raises(RuntimeError, match='kernel_size must be a positive '
                                           'odd'):
        ops.local_relation_forward_cpu(q, key, v, p, 2, 1, 'dot_product')
    with pytest.raises(RuntimeError, match='stride must be positive'):
        ops.local_relation_forward_cpu(q, key, v, p, 3, 0, 'dot_product')
    with pytest.raises(RuntimeError, match='query must have shape'):
        ops.local_relation_forward_cpu(q, key, v, p, 3, 2, 'dot_product')
    with pytest.raises(RuntimeError, match='prior must have shape'):
        ops.local_relation_forward_cpu(q, key, v, p[:, :1], 3, 1,
                                       'dot_product')
    with pytest.raises(RuntimeError, match='must divide'):
        ops.local_relation_forward_cpu(q, key, v[:, :3].contiguous(), p, 3,
                                       1, 'dot_product')
    with pytest.raises(RuntimeError, match='value must be contiguous'):
        ops.local_relation_forward_cpu(q, key, v.transpose(2, 3), p, 3, 1,
                                       'dot_product')
    out, lse = ops.local_relation_forward_cpu(q, key, v, p, 3, 1,
                                              'dot_product')
    with pytest.raises(RuntimeError, match='lse must have shape'):
        ops.local_relation_backward_cpu(out, q, key, v, p, lse[:, :1],
                                        3, 1, 'dot_product')
    with pytest.raises(RuntimeError, match='grad_out must be a CPU Float'):
        ops.local_relation_backward_cpu(out.double(), q, key, v, p, lse, 3,
                                        1, 'dot_product')


@pytest.mark.parametrize('case', [(0, 4, 2, 5, 6, 3, 2),
                                  (1, 4, 2, 0, 6, 3, 1)], ids=_case_id)
def test_empty_maps(case):
    b, c, g, h, w, k, s = case
    inputs = _inputs(case, torch.float64)
    grad_out = _grad_out(case, torch.float64)
    out, lse, grads = _kernel(inputs, grad_out, k, s, 'squared_difference')
    size = (output_size(h, s), output_size(w, s))
    assert out.shape == (b, c, *size) and lse.shape == (b, g, *size)
    assert [tuple(g.shape) for g in grads] == [
        tuple(t.shape) for t in inputs]
    assert torch.equal(grads[3], torch.zeros_like(inputs[3]))


def test_no_value_channels_still_give_the_log_sum_exp():
    case = (1, 0, 2, 5, 4, 3, 1)
    inputs = _inputs(case, torch.float64)
    grad_out = _grad_out(case, torch.float64)
    out, lse, grads = _kernel(inputs, grad_out, 3, 1, 'dot_product')
    t_out, t_lse, t_grads = _torch_backend(inputs, grad_out, 3, 1,
                                           'dot_product')
    assert out.shape == t_out.shape == (1, 0, 5, 4)
    torch.testing.assert_close(lse, t_lse, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, t_grads):
        assert torch.equal(got, want)
