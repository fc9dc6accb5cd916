"""PRM as custom ops (torch.library): the schema, the fake (meta)
implementations, the registered autograd and AOT dispatch, checked by
``torch.library.opcheck`` on every backend, and the op being what runs."""
from typing import NamedTuple, Optional

import pytest
import torch

from prm_det.ops import BatchNorm, PRMOptions, prm_block_tail
from prm_det.ops import library
from prm_det.ops.backends import BACKENDS
from prm_det.ops.contract import norm_tensors
from prm_det.ops.functions import PRMFunction
from op_params import params_for


class Case(NamedTuple):
    """One input of the matrix."""
    norm: Optional[str]  # None, 'train' or 'eval'
    identity: bool
    relu: bool
    size: tuple = (2, 12, 5, 3)
    channels_last: bool = False
    dtype: torch.dtype = torch.float64
    use_position: bool = True


# every BatchNorm mode with and without the shortcut and ReLU; the layouts,
# dtypes, odd sizes and the position-free ablation on some of them
CASES = [
    *(Case(norm, identity, relu) for norm in (None, 'train', 'eval')
      for identity, relu in ((False, False), (True, True))),
    Case('train', True, False), Case(None, False, True),
    Case('train', True, True, channels_last=True),
    Case('eval', False, True, channels_last=True, dtype=torch.float32),
    Case('train', True, True, dtype=torch.float32),
    Case('train', True, True, size=(1, 6, 1, 7)),
    Case('eval', True, True, size=(3, 4, 7, 1), dtype=torch.float32),
    Case(None, True, True, size=(2, 6, 3, 4), use_position=False),
]


def structures(case: Case):
    """The op's arguments for ``case`` as the structures the caller holds:
    (c, identity, norm, params, options); the tensors take gradients."""
    b, ch, h, w = case.size
    groups = ch // 2 if ch % 2 == 0 else ch
    dtype = case.dtype
    g = torch.Generator().manual_seed(1)
    c = torch.randn(case.size, generator=g, dtype=dtype)
    if case.channels_last:
        c = c.to(memory_format=torch.channels_last)
    identity = torch.randn(case.size, generator=g, dtype=dtype) \
        if case.identity else None
    norm = None
    if case.norm is not None:
        norm = BatchNorm(
            torch.rand(ch, generator=g, dtype=dtype) + 0.5,
            torch.randn(ch, generator=g, dtype=dtype),
            torch.randn(ch, generator=g, dtype=dtype),
            torch.rand(ch, generator=g, dtype=dtype) + 0.5,
            case.norm == 'train', 0.1, 1e-5)
    params = params_for(groups, dtype)
    for t in (c, identity, *params) + ((norm.weight, norm.bias)
                                       if norm else ()):
        if t is not None:
            t.requires_grad_()
    options = PRMOptions(groups=groups, use_position=case.use_position)
    return c, identity, norm, params, options


def op_inputs(case: Case, backend: str, held=None):
    """block_tail's arguments for ``case`` (from ``held``, its
    :func:`structures`, when given): tensors positional, settings by name
    (the schema's scalars)."""
    c, identity, norm, params, options = held or structures(case)
    args = (c, identity, *norm_tensors(norm), *params)
    return args, library.block_tail_kwargs(norm, case.relu, options, backend)


@pytest.mark.parametrize('case', CASES, ids=str)
def test_opcheck_passes_on_every_backend(backend, case):
    """Schema, fake tensors (shapes, dtypes, strides of every output),
    registered autograd and AOT dispatch with dynamic shapes."""
    args, kwargs = op_inputs(case, backend)
    result = torch.library.opcheck(torch.ops.prm_det.block_tail.default,
                                   args, kwargs)
    assert set(result.values()) == {'SUCCESS'}, result


@pytest.mark.parametrize('case', [Case('train', True, True),
                                  Case('eval', True, False)], ids=str)
def test_eager_mode_computes_what_the_registered_op_computes(backend, case):
    """Eager mode runs the op's implementation and autograd on the
    structures, without the dispatcher (PRMFunction); the registered op
    (what torch.compile traces) gives the same bits: outputs, every
    gradient."""
    held = structures(case)
    c, identity, norm, params, options = held
    args, kwargs = op_inputs(case, backend, held)
    grad = torch.randn_like(args[0])
    results = []
    for run in (lambda: PRMFunction.apply(
                    norm, case.relu, options, backend, c, identity,
                    *norm_tensors(norm)[:2], *params),
                lambda: torch.ops.prm_det.block_tail(*args, **kwargs)):
        out = run()
        inputs = [t for t in args if t is not None and t.requires_grad]
        grads = torch.autograd.grad(out[0], inputs, grad, allow_unused=True)
        results.append((out[0], grads))
    (y_eager, g_eager), (y_op, g_op) = results
    assert 'PRMFunction' in type(y_eager.grad_fn).__name__
    assert 'prm_det_block_tail' in y_op.grad_fn.name()
    assert torch.equal(y_eager, y_op)
    for a, b in zip(g_eager, g_op):
        assert (a is None) == (b is None)
        assert a is None or torch.equal(a, b)


def test_training_updates_the_running_statistics_as_batch_norm(backend):
    """The functional op returns the running statistics; the caller copies
    them into the module's buffers, as nn.BatchNorm2d updates its own."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(12).double().train()
    c = torch.randn(2, 12, 5, 3, dtype=torch.float64)
    norm = BatchNorm(bn.weight, bn.bias, bn.running_mean, bn.running_var,
                     True, 0.1, bn.eps)
    expected = torch.nn.BatchNorm2d(12).double().train()
    expected.load_state_dict(bn.state_dict())
    prm_block_tail(c, params_for(6, torch.float64), PRMOptions(groups=6),
                   norm=norm)
    expected(c)
    torch.testing.assert_close(bn.running_mean, expected.running_mean)
    torch.testing.assert_close(bn.running_var, expected.running_var)
    assert not bn.running_mean.requires_grad


@pytest.mark.parametrize('case', [Case('train', True, True),
                                  Case('eval', True, False),
                                  Case(None, False, False)], ids=str)
def test_eager_mode_hands_the_backend_the_callers_options(
        backend, case, monkeypatch):
    """Eager mode, forward and backward, gives the backend the caller's
    PRMOptions object itself and never the schema's scalars: the
    conversions to and from them, and the registered op's implementation,
    fail here. (The options pin the backend, a field the schema drops: a
    trip through the scalars would hand on a copy without it.)"""
    c, identity, norm, params, _ = structures(case)
    options = PRMOptions(groups=params.weight.shape[1], backend=backend)
    module = BACKENDS[backend]
    real_forward, real_backward = module.forward, module.backward
    seen = []

    def forward(c, norm, identity, relu, params, options, inplace=False):
        seen.append(('forward', options))
        return real_forward(c, norm, identity, relu, params, options, inplace)

    def backward(grad_y, saved, needs):
        seen.append(('backward', saved.options))
        return real_backward(grad_y, saved, needs)

    def scalars(*args, **kwargs):
        raise AssertionError('eager mode went through the schema scalars')

    monkeypatch.setattr(module, 'forward', forward)
    monkeypatch.setattr(module, 'backward', backward)
    for name in ('options_to_schema', 'options_from_schema',
                 'norm_to_schema', 'norm_from_schema', 'block_tail_impl',
                 'block_tail_backward_impl'):
        monkeypatch.setattr(library, name, scalars)
    y = prm_block_tail(c, params, options, identity=identity, norm=norm,
                       relu=case.relu)
    y.backward(torch.randn_like(y))
    assert [step for step, _ in seen] == ['forward', 'backward']
    assert all(got is options for _, got in seen)
    assert c.grad is not None and params.weight.grad is not None
