"""The local relation aggregation's Triton kernels
(``backends.local_relation_triton``, run here through Triton's interpreter
on CPU tensors) against the torch backend and the readable reference's
autograd: the output, the log-sum-exp and every gradient, in float64 (to
1e-12) and float32, across strides 1-3, kernel sizes 1, 3, 5 and 7, maps
smaller than the window, 1x1, single-row and non-square odd maps, batch 1,
1, 2, 3 and 8 channels a group and the three similarities; several
position and channel blocks a program; float16 and bfloat16 inputs; NaN and
Inf inputs give the torch backend's non-finite pattern; the same bits every
run; Triton's compile and fit errors raise KernelsBroken; nothing of k * k
times a map is allocated."""
import pytest
import torch

from prm_det.ops.backends import local_relation_torch as torch_backend
from prm_det.ops.backends import local_relation_triton as lr
from prm_det.ops.backends import triton_backend
from prm_det.ops.contract import KernelsBroken
from prm_det.ops.local_relation import (SIMILARITIES,
                                        local_relation_reference,
                                        output_size)

# numpy's warnings of the interpreter's masked-off lanes (-inf - -inf,
# log(0)) and of the NaN tests' inputs
pytestmark = [
    pytest.mark.filterwarnings('ignore:invalid value encountered'),
    pytest.mark.filterwarnings('ignore:divide by zero encountered'),
    pytest.mark.filterwarnings('ignore:overflow encountered')]

SQ, DOT, ABS = SIMILARITIES
# (batch, channels, groups, height, width, kernel_size, stride, similarity)
CASES = [
    (2, 6, 2, 5, 7, 3, 1, SQ),     # m = 3, odd non-square map
    (1, 8, 1, 6, 5, 3, 2, DOT),    # m = 8, stride 2
    (1, 4, 4, 9, 7, 7, 1, ABS),    # m = 1, window of 7
    (1, 4, 2, 7, 9, 7, 2, SQ),     # window of 7, stride 2
    (1, 16, 2, 8, 11, 3, 2, ABS),  # m = 8, stride 2
    (1, 4, 2, 11, 10, 5, 3, DOT),  # stride 3
    (1, 2, 2, 9, 8, 7, 3, SQ),     # stride 3, window of 7, m = 1
    (2, 4, 2, 5, 6, 1, 1, DOT),    # kernel 1: the weights are all 1
    (1, 4, 2, 7, 5, 1, 3, ABS),    # kernel 1, stride 3
    (1, 8, 4, 3, 2, 7, 1, ABS),    # a map smaller than the window
    (2, 2, 1, 2, 3, 7, 2, DOT),    # smaller than the window, stride 2
    (1, 8, 1, 1, 1, 7, 1, SQ),     # a 1x1 map, m = 8
    (1, 2, 1, 1, 1, 3, 3, DOT),    # a 1x1 map, stride 3
    (1, 2, 2, 1, 9, 3, 1, ABS),    # a single row
    (2, 2, 2, 8, 1, 7, 2, SQ),     # a single column
]
NAMES = ('grad_query', 'grad_key', 'grad_value', 'grad_prior')


def _case_id(case):
    b, c, g, h, w, k, s, method = case
    return f'b{b}c{c}g{g}_{h}x{w}_k{k}s{s}_{method.split("_")[0]}'


def _inputs(case, dtype, seed=0):
    b, c, g, h, w, k, s, _ = case
    gen = torch.Generator().manual_seed(seed)
    ho, wo = output_size(h, s), output_size(w, s)

    def rand(*shape):
        return torch.randn(*shape, generator=gen,
                           dtype=torch.float64).to(dtype)

    return [rand(b, g, ho, wo), rand(b, g, h, w), rand(b, c, h, w),
            rand(g, k, k)]


def _grad_out(case, dtype, seed=1):
    b, c, _, h, w, _, s, _ = case
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, output_size(h, s), output_size(w, s),
                       generator=gen, dtype=torch.float64).to(dtype)


def _reference(inputs, grad_out, k, s, method):
    """The reference's output and autograd gradients, in float64."""
    leaves = [t.detach().to(torch.float64).requires_grad_() for t in inputs]
    out = local_relation_reference(*leaves, k, s, method)
    grads = torch.autograd.grad(out, leaves, grad_out.to(torch.float64))
    return out.detach(), grads


def _run(backend, inputs, grad_out, k, s, method):
    out, lse = backend.forward(*inputs, k, s, method)
    *grads, again = backend.backward(grad_out, *inputs, lse, k, s, method)
    torch.testing.assert_close(again, out, equal_nan=True)  # recomputed
    return out, lse, tuple(grads)


def _check(case, dtype, tol, ref_tol):
    k, s, method = case[5:]
    inputs = _inputs(case, dtype)
    grad_out = _grad_out(case, dtype)
    out, lse, grads = _run(lr, inputs, grad_out, k, s, method)
    t_out, t_lse, t_grads = _run(torch_backend, inputs, grad_out, k, s,
                                 method)
    ref_out, ref_grads = _reference(inputs, grad_out, k, s, method)
    assert out.dtype == dtype and lse.dtype == t_lse.dtype
    assert out.shape == t_out.shape and lse.shape == t_lse.shape
    torch.testing.assert_close(out, t_out, **tol)
    torch.testing.assert_close(lse, t_lse, **tol)
    torch.testing.assert_close(out.double(), ref_out, **ref_tol)
    for name, got, want, ref, inp in zip(NAMES, grads, t_grads, ref_grads,
                                         inputs):
        assert got.shape == inp.shape and got.dtype == inp.dtype, name
        torch.testing.assert_close(got, want, **tol, msg=name)
        torch.testing.assert_close(got.double(), ref, **ref_tol, msg=name)


@pytest.mark.parametrize('case', CASES, ids=_case_id)
def test_float64_matches_torch_backend_and_reference(case):
    tol = dict(rtol=1e-12, atol=1e-12)
    _check(case, torch.float64, tol, tol)


@pytest.mark.parametrize('case', [CASES[i] for i in (0, 1, 3, 5, 9, 12)],
                         ids=_case_id)
def test_float32_matches_torch_backend_and_reference(case):
    _check(case, torch.float32, dict(rtol=1e-5, atol=1e-5),
           dict(rtol=1e-4, atol=1e-4))


@pytest.mark.parametrize('stride,method', [(1, SQ), (2, DOT), (3, ABS)])
def test_several_position_and_channel_blocks(monkeypatch, stride, method):
    """Programs of 16 positions and 4 channels: the group's 5 channels in
    two blocks (the second one part empty), maps of several position blocks
    and residue classes."""
    monkeypatch.setattr(lr, 'BLOCK_P', 16)
    monkeypatch.setattr(lr, 'MAX_BLOCK_M', 4)
    case = (2, 5, 1, 9, 11, 3, stride, method)
    tol = dict(rtol=1e-12, atol=1e-12)
    _check(case, torch.float64, tol, tol)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('case', [CASES[1], CASES[3]], ids=_case_id)
def test_half_inputs_are_computed_in_float32(case, dtype):
    """float16/bfloat16 maps: out in their dtype, the log-sum-exp in
    float32, each gradient in its input's dtype; finite, as the torch
    backend's (the same float32 arithmetic: backward given the same saved
    lse) and close to float32's."""
    k, s, method = case[5:]
    inputs = _inputs(case, dtype)
    grad_out = _grad_out(case, dtype)
    out, lse = lr.forward(*inputs, k, s, method)
    t_out, t_lse = torch_backend.forward(*inputs, k, s, method)
    grads = lr.backward(grad_out, *inputs, t_lse, k, s, method)[:4]
    t_grads = torch_backend.backward(grad_out, *inputs, t_lse, k, s,
                                     method)[:4]
    f_out, f_lse, f_grads = _run(torch_backend, [t.float() for t in inputs],
                                 grad_out.float(), k, s, method)
    assert out.dtype == dtype and lse.dtype == torch.float32
    eps = torch.finfo(dtype).eps
    for name, got, want, full, like in zip(('out', 'lse') + NAMES,
                                           (out, lse) + grads,
                                           (t_out, t_lse) + t_grads,
                                           (f_out, f_lse) + f_grads,
                                           [t_out, t_lse] + inputs):
        assert got.dtype == like.dtype and got.shape == like.shape, name
        assert torch.isfinite(got).all(), name
        # the same float32 values, rounded to the half dtype: a step apart
        torch.testing.assert_close(got.float(), want.float(), rtol=eps,
                                   atol=1e-6, msg=name)
        scale = full.abs().max().item()
        torch.testing.assert_close(got.float(), full, rtol=0,
                                   atol=8 * eps * max(scale, 1.0), msg=name)


def _poke(t, value, index):
    t = t.clone()
    t.view(-1)[index] = value
    return t


# (input: 0 query, 1 key, 2 value, 3 prior, 4 grad_out; value; index)
PATTERNS = [
    (2, float('nan'), 17), (2, float('inf'), 30), (2, -float('inf'), 3),
    (1, float('nan'), 12), (1, float('inf'), 25), (0, float('nan'), 5),
    (0, float('inf'), 2), (0, -float('inf'), 7), (3, -float('inf'), 4),
    (3, float('inf'), 1), (4, float('nan'), 6), (4, float('inf'), 9),
]


@pytest.mark.parametrize('method', SIMILARITIES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_nan_and_inf_spread_as_on_the_torch_backend(dtype, method):
    """A NaN or an Inf in any input, or in the gradient of the output:
    NaN and Inf where the torch backend has them (and the same finite
    values elsewhere)."""
    stride = 2 if dtype == torch.float32 else 1
    for case in [(1, 4, 2, 7, 6, 3, stride, method)]:
        k, s = case[5:7]
        for which, value, index in PATTERNS:
            inputs = _inputs(case, dtype) + [_grad_out(case, dtype)]
            inputs[which] = _poke(inputs[which], value,
                                  index % inputs[which].numel())
            *maps, grad_out = inputs
            got = _run(lr, maps, grad_out, k, s, method)
            want = _run(torch_backend, maps, grad_out, k, s, method)
            for name, a, b in zip(('out', 'lse') + NAMES,
                                  got[:2] + got[2], want[:2] + want[2]):
                msg = f'{name}, input {which} = {value} at {index}'
                assert torch.equal(a.isnan(), b.isnan()), msg
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5,
                                           equal_nan=True, msg=msg)


def test_the_same_bits_every_run(monkeypatch):
    monkeypatch.setattr(lr, 'BLOCK_P', 32)
    case = (2, 8, 2, 13, 12, 3, 1, SQ)
    inputs = _inputs(case, torch.float32)
    grad_out = _grad_out(case, torch.float32)
    first = _run(lr, inputs, grad_out, 3, 1, SQ)
    second = _run(lr, inputs, grad_out, 3, 1, SQ)
    for a, b in zip(first[:2] + first[2], second[:2] + second[2]):
        assert torch.equal(a, b)


def test_non_contiguous_inputs():
    case = (1, 4, 2, 6, 7, 3, 2, DOT)
    k, s, method = case[5:]
    inputs = [t.transpose(-1, -2).contiguous().transpose(-1, -2)
              for t in _inputs(case, torch.float64)]
    inputs[2] = inputs[2].contiguous(memory_format=torch.channels_last)
    grad_out = _grad_out(case, torch.float64).contiguous(
        memory_format=torch.channels_last)
    out, lse, grads = _run(lr, inputs, grad_out, k, s, method)
    t_out, t_lse, t_grads = _run(torch_backend, inputs, grad_out, k, s,
                                 method)
    for a, b in zip((out, lse) + grads, (t_out, t_lse) + t_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.fixture
def recorded(monkeypatch):
    """The backend's launches recorded instead of run."""
    launches = []

    def record(kernel, grid, num_warps, **args):
        launches.append((kernel.fn.__name__, tuple(grid), args))

    monkeypatch.setattr(triton_backend, '_launch', record)
    return launches


@pytest.mark.parametrize('stride', [1, 2])
def test_nothing_of_k_squared_times_a_map_is_allocated(recorded, stride):
    """Every tensor a launch takes is at most the value map's size (the
    prior's partial sums: a few per 128 positions), and the grids cover
    each (sample, group) and position once."""
    case = (1, 16, 2, 64, 48, 7, stride, SQ)
    inputs = _inputs(case, torch.float32)
    out, lse = lr.forward(*inputs, 7, stride, SQ)
    lr.backward(_grad_out(case, torch.float32), *inputs, lse, 7, stride, SQ)
    assert [name for name, _, _ in recorded] == [
        'lr_fwd_kernel', 'lr_fwd_kernel', 'lr_bwd_query_kernel',
        'lr_bwd_kv_kernel']  # forward; backward: the output recomputed...
    assert not recorded[0][2]['RECOMPUTE'] and recorded[1][2]['RECOMPUTE']
    value = inputs[2]
    for name, grid, args in recorded:
        for arg, t in args.items():
            if isinstance(t, torch.Tensor):
                assert t.numel() <= value.numel(), (name, arg)
    ho, wo = output_size(64, stride), output_size(48, stride)
    blocks = -(-ho * wo // lr.BLOCK_P)
    assert recorded[0][1] == recorded[1][1] == (blocks, 2, 1)
    assert recorded[2][1] == (blocks, 2)
    rows, cols = -(-64 // stride), -(-48 // stride)
    assert recorded[3][1] == (-(-rows * cols // lr.BLOCK_P), 2,
                              stride * stride)


@pytest.fixture
def not_broken(monkeypatch):
    monkeypatch.setitem(triton_backend._state, 'broken', None)


def test_a_kernel_triton_cannot_fit_raises_kernels_broken(monkeypatch,
                                                          not_broken):
    from triton.runtime.errors import OutOfResources

    def launch(kernel, grid, num_warps, **args):
        raise OutOfResources(300000, 232448, 'shared memory')

    monkeypatch.setattr(triton_backend, '_launch', launch)
    case = CASES[0]
    inputs = _inputs(case, torch.float32)
    with pytest.warns(RuntimeWarning, match='PRM_DET_BACKEND=torch'), \
            pytest.raises(KernelsBroken, match='shared memory'):
        lr.forward(*inputs, 3, 1, SQ)
    assert 'OutOfResources' in triton_backend.broken_reason()
    out, lse = torch_backend.forward(*inputs, 3, 1, SQ)
    with pytest.raises(KernelsBroken):  # no second warning
        lr.backward(torch.ones_like(out), *inputs, lse, 3, 1, SQ)


def test_a_launcher_bug_is_raised_not_hidden(monkeypatch, not_broken):
    def launch(kernel, grid, num_warps, **args):
        raise ValueError('a launcher bug')

    monkeypatch.setattr(triton_backend, '_launch', launch)
    with pytest.raises(ValueError, match='a launcher bug'):
        lr.forward(*_inputs(CASES[0], torch.float32), 3, 1, SQ)
    assert triton_backend.broken_reason() is None
