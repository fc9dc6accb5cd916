"""Every backend against the reference on randomly drawn cases (fixed seed):
map sizes 1x1 to 13x11, batch 1-3, memory layouts (contiguous,
channels_last, strided, expanded), float32 and float64, BatchNorm in
training and eval mode or none, with and without the shortcut. The oracle
is the reference layer in float64 on the same values, so a float32 backend
is held to float32's rounding, not to another backend's.

The similarity modes other than 'dotproduct' run on the reference only,
whatever backend is asked for (``select`` routes them there): their cases
check that each backend's request gives the reference's results, on every
layout and in float32 too."""
import copy
import random

import pytest
import torch
import torch.nn as nn

from prm_det.models.layers import PRM

CHANNELS, GROUPS = 16, 4
LAYOUTS = ('contiguous', 'channels_last', 'strided', 'expanded')
TOLERANCE = {torch.float64: dict(rtol=1e-7, atol=1e-9),
             torch.float32: dict(rtol=2e-4, atol=2e-5)}


def draw_cases(count=16, seed=20261203, modes=('dotproduct', )):
    rng = random.Random(seed)
    cases = [dict(batch=2, size=(1, 1), layout='strided', dtype=torch.float32,
                  norm='train', shortcut=True,
                  mode=modes[0])]  # the case that was wrong
    while len(cases) < count:
        case = dict(
            batch=rng.randint(1, 3),
            size=rng.choice([(1, 1), (1, rng.randint(2, 11)),
                             (rng.randint(2, 13), rng.randint(1, 11))]),
            layout=rng.choice(LAYOUTS),
            dtype=rng.choice([torch.float32, torch.float64]),
            norm=rng.choice(['train', 'eval', None]),
            shortcut=rng.random() < 0.7,
            mode=modes[len(cases) % len(modes)])
        h, w = case['size']
        if case['norm'] == 'train' and case['batch'] * h * w == 1:
            continue  # one value a channel: BatchNorm refuses to train
        cases.append(case)
    return cases


CASES = draw_cases() + draw_cases(8, seed=20261204,
                                  modes=('cosine', 'l1norm'))


def name(case):
    h, w = case['size']
    return (f"{case['mode']}-b{case['batch']}-{h}x{w}-{case['layout']}-"
            f"{str(case['dtype'])[6:]}-bn_{case['norm']}-"
            f"{'shortcut' if case['shortcut'] else 'plain'}")


def laid_out(values, layout):
    """``values`` [b, c, h, w] as a tensor of the given memory layout with
    the same contents."""
    b, c, h, w = values.shape
    if layout == 'channels_last':
        return values.contiguous(memory_format=torch.channels_last)
    if layout == 'strided':  # every other row and column of a larger map
        big = values.new_zeros(b, c, 2 * h, 2 * w)
        big[:, :, ::2, ::2] = values
        return big[:, :, ::2, ::2]
    if layout == 'expanded':  # one sample seen b times (stride 0)
        return values[:1].expand(b, c, h, w)
    return values.contiguous()


def modules(case, seed):
    """A PRM and a BatchNorm (or None) with random parameters and running
    statistics, in the case's dtype."""
    g = torch.Generator().manual_seed(seed)
    layer = PRM(CHANNELS, groups=GROUPS, mode=case['mode'])
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        layer.theta.copy_(torch.rand(layer.theta.shape, generator=g) + 0.1)
        layer.scale.copy_(torch.rand(1, generator=g) + 0.5)
    norm = None
    if case['norm'] is not None:
        norm = nn.BatchNorm2d(CHANNELS)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(CHANNELS, generator=g) + 0.5)
            norm.bias.copy_(torch.randn(CHANNELS, generator=g))
            norm.running_mean.copy_(torch.randn(CHANNELS, generator=g))
            norm.running_var.copy_(torch.rand(CHANNELS, generator=g) + 0.5)
        norm.train(case['norm'] == 'train')
    return layer.to(case['dtype']), (
        None if norm is None else norm.to(case['dtype']))


def run(layer, norm, c, identity, upstream):
    """Output and gradients (input, shortcut, PRM's and the norm's
    parameters) of ``relu(prm(norm(c)) + identity)`` (no ReLU without a
    shortcut), and the norm's running statistics after it."""
    c = c.detach().requires_grad_()
    inputs = [c]
    if identity is not None:
        identity = identity.detach().requires_grad_()
        inputs.append(identity)
    if identity is None:
        y = layer(c if norm is None else norm(c))
    elif norm is None:
        y = layer.forward_residual(c, identity)
    else:
        y = layer.forward_norm_residual(c, norm, identity)
    params = list(layer.parameters()) + (
        [] if norm is None else list(norm.parameters()))
    grads = torch.autograd.grad(y, inputs + params, upstream,
                                allow_unused=True)
    stats = [] if norm is None else [norm.running_mean, norm.running_var]
    return [y] + list(grads) + stats


@pytest.mark.parametrize('case', CASES, ids=[name(c) for c in CASES])
def test_backend_matches_the_float64_reference(backend, case):
    seed = CASES.index(case)
    g = torch.Generator().manual_seed(1000 + seed)
    h, w = case['size']
    shape = (case['batch'], CHANNELS, h, w)
    values = torch.randn(shape, generator=g, dtype=torch.float64)
    if case['layout'] == 'expanded':
        values = values[:1].expand(shape).clone()
    identity = (torch.randn(shape, generator=g, dtype=torch.float64)
                if case['shortcut'] else None)
    upstream = torch.randn(shape, generator=g, dtype=torch.float64)

    layer, norm = modules(case, seed)
    want_layer = copy.deepcopy(layer).double()
    want_layer.options = want_layer.options._replace(backend='reference')
    want_norm = None if norm is None else copy.deepcopy(norm).double()

    dtype = case['dtype']
    got = run(layer, norm, laid_out(values.to(dtype), case['layout']),
              None if identity is None else identity.to(dtype),
              upstream.to(dtype))
    want = run(want_layer, want_norm, values, identity, upstream)
    names = (['y', 'grad c'] + (['grad identity'] if identity is not None
                                else []) +
             [f'grad prm.{n}' for n, _ in layer.named_parameters()] +
             ([] if norm is None else ['grad bn.weight', 'grad bn.bias',
                                       'bn.running_mean', 'bn.running_var']))
    assert len(names) == len(got) == len(want)
    for what, a, b in zip(names, got, want):
        if b is None:
            assert a is None or not a.abs().max() > 0, what
            continue
        torch.testing.assert_close(a.double(), b, **TOLERANCE[dtype],
                                   msg=lambda m: f'{what}: {m}')
