"""The ``triton`` backend's launches: positions split over programs so a
detection batch fills an H100/H200, exact two-level reductions (the same
bits run after run, on every backend), and the fallback to torch ops when
Triton cannot compile or launch on the user's GPU."""
import math
import warnings

import pytest
import torch

from prm_det.ops import BatchNorm, PRMOptions, PRMParams, prm_block_tail
from prm_det.ops import use_backend
from prm_det.ops import backends
from prm_det.ops.backends import torch_ops, triton_backend, triton_plan
from prm_det.ops.contract import Needs, Saved
from op_params import params_for

# PRM-ResNet-50's block tails at 2x3x800x1216 (64 heads): the stage maps
DETECTION_STAGES = [(2, 256, 200, 304), (2, 512, 100, 152),
                    (2, 1024, 50, 76), (2, 2048, 25, 38)]
# a map small enough for the interpreter that still splits its positions
# (2 forward splits, 5 backward, 2 for BatchNorm's statistics)
SPLIT_SHAPE, SPLIT_GROUPS = (2, 8, 24, 24), 2


def make_norm(channels, dtype, training=True):
    g = torch.Generator().manual_seed(5)
    return BatchNorm(torch.rand(channels, generator=g, dtype=dtype) + 0.5,
                     torch.randn(channels, generator=g, dtype=dtype),
                     torch.zeros(channels, dtype=dtype),
                     torch.ones(channels, dtype=dtype), training, 0.1, 1e-5)


def warps_if_all_resident(programs, warps, sms=132):
    return programs / sms * warps


@pytest.mark.parametrize('kind', ['forward', 'backward'])
def test_prm_launches_fill_an_h200_at_detection_batch_sizes(kind):
    """2 images x 64 heads are 128 (sample, group) pairs, fewer than an
    H200 has SMs: the plan splits each pair's positions so that every
    stage launches enough programs for 8+ warps on each of 132 SMs."""
    for shape in DETECTION_STAGES:
        launch = triton_plan.prm_launch(shape, 64, kind, 4, 132)
        programs = math.prod(launch.grid)
        assert launch.splits > 1, shape
        assert warps_if_all_resident(programs, launch.num_warps) >= 8, shape
        # the splits cover every position once, in whole tiles
        positions = shape[2] * shape[3]
        assert launch.chunk % launch.block_p == 0
        assert (launch.splits - 1) * launch.chunk < positions
        assert launch.splits * launch.chunk >= positions


def test_batch_statistics_launches_fill_an_h200():
    for shape in DETECTION_STAGES + [(32, 2048, 7, 7), (32, 256, 56, 56)]:
        launch = triton_plan.channel_launch(shape, 4, 132)
        programs = math.prod(launch.grid)
        assert warps_if_all_resident(programs, launch.num_warps) >= 8, shape
        b, _, h, w = shape
        assert (launch.psplits - 1) * launch.chunk < h * w <= (
            launch.psplits * launch.chunk)
        assert launch.splits == launch.psplits * math.ceil(
            b / launch.samples)


def test_the_plan_is_a_function_of_shape_dtype_groups_and_sms():
    args = ((2, 1024, 50, 76), 64, 'forward', 4)
    assert triton_plan.prm_launch(*args, 132) == triton_plan.prm_launch(
        *args, 132)
    # fewer SMs, fewer programs wanted
    assert math.prod(triton_plan.prm_launch(*args, 16).grid) < math.prod(
        triton_plan.prm_launch(*args, 132).grid)
    # CPU tensors (the interpreter) are planned as on an H100/H200
    assert triton_backend.sm_count(torch.device('cpu')) == 132


def test_the_test_map_splits_its_positions():
    """What the interpreter tests below run is the split path."""
    fwd = triton_plan.prm_launch(SPLIT_SHAPE, SPLIT_GROUPS, 'forward', 4,
                                 132)
    bwd = triton_plan.prm_launch(SPLIT_SHAPE, SPLIT_GROUPS, 'backward', 4,
                                 132)
    stats = triton_plan.channel_launch(SPLIT_SHAPE, 4, 132)
    assert (fwd.splits, bwd.splits, stats.splits) == (2, 5, 2)


def _tail_on(backend, dtype=torch.float64, norm_training=True,
             channels_last=False):
    """Output, gradients of every input and running statistics of one
    training step of a block tail on ``backend``."""
    torch.manual_seed(0)
    c = torch.randn(SPLIT_SHAPE, dtype=dtype) * 2
    if channels_last:
        c = c.to(memory_format=torch.channels_last)
    c.requires_grad_()
    identity = torch.randn(SPLIT_SHAPE, dtype=dtype, requires_grad=True)
    params = PRMParams(*(p.requires_grad_()
                         for p in params_for(SPLIT_GROUPS, dtype)))
    norm = make_norm(SPLIT_SHAPE[1], dtype, norm_training)
    norm = norm._replace(weight=norm.weight.requires_grad_(),
                         bias=norm.bias.requires_grad_())
    with use_backend(backend):
        y = prm_block_tail(c, params, PRMOptions(groups=SPLIT_GROUPS),
                           identity=identity, norm=norm, relu=True)
    upstream = torch.randn(SPLIT_SHAPE, generator=torch.Generator(
        ).manual_seed(3), dtype=dtype)
    grads = torch.autograd.grad((y * upstream).sum(),
                                [c, identity, norm.weight, norm.bias,
                                 *params])
    return [y, *grads, norm.running_mean, norm.running_var]


@pytest.mark.parametrize('norm_training', [True, False])
@pytest.mark.parametrize('channels_last', [False, True])
def test_split_kernels_equal_the_torch_backend(norm_training,
                                               channels_last):
    """Positions split over programs (2 forward, 5 backward), BatchNorm's
    statistics over 2: the same output, gradients and running statistics
    as torch ops, to float64 rounding."""
    got = _tail_on('triton', norm_training=norm_training,
                   channels_last=channels_last)
    want = _tail_on('torch', norm_training=norm_training,
                    channels_last=channels_last)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11,
                                   msg=f'output {i}')


def test_forward_and_backward_twice_give_identical_bits(backend):
    """The same input twice: the same bits in the output, every gradient
    and the running statistics (no atomics, reductions in a fixed order;
    ``randomness=dict(deterministic=True)`` holds)."""
    first = _tail_on(backend, dtype=torch.float32)
    second = _tail_on(backend, dtype=torch.float32)
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), (backend, i)


# -- the fallback --------------------------------------------------------------

@pytest.fixture
def kernels_that_fail(monkeypatch):
    """Triton's launch of the kernels named in ``failing`` fails as on a
    GPU they cannot fit (the others run); ``launched`` lists every kernel
    the backend launched."""
    from triton.runtime.errors import OutOfResources
    monkeypatch.setitem(triton_backend._state, 'broken', None)
    record = dict(failing=set(), launched=[])
    real_launch = triton_backend._launch

    def launch(kernel, grid, num_warps, **args):
        name = kernel.fn.__name__
        record['launched'].append(name)
        if name in record['failing']:
            raise OutOfResources(300000, 232448, 'shared memory')
        return real_launch(kernel, grid, num_warps, **args)

    monkeypatch.setattr(triton_backend, '_launch', launch)
    return record


def _tail_inputs(dtype=torch.float32):
    torch.manual_seed(1)
    c = torch.randn(2, 8, 6, 5, dtype=dtype)
    identity = torch.randn_like(c)
    return c, identity, params_for(2, dtype), make_norm(8, dtype)


def test_triton_that_cannot_launch_warns_once_and_runs_on_torch(
        kernels_that_fail):
    # fails after BatchNorm's statistics and the channel sums ran
    kernels_that_fail['failing'].add('fwd_stats_kernel')
    c, identity, params, norm = _tail_inputs()
    options = PRMOptions(groups=2)
    norm_torch = norm._replace(running_mean=norm.running_mean.clone(),
                               running_var=norm.running_var.clone())
    want = torch_ops.forward(c, norm_torch, identity, True, params, options)
    with pytest.warns(RuntimeWarning) as caught:
        got = backends.forward('triton', c, norm, identity, True, params,
                               options)
    message = str(caught[0].message)
    assert 'OutOfResources' in message and 'shared memory' in message
    assert 'cpu (Triton interpreter)' in message  # the device it ran on
    assert 'PRM_DET_BACKEND=torch' in message
    assert 'OutOfResources' in triton_backend.broken_reason()
    torch.testing.assert_close(got.y, want.y)
    for a, b in zip(got.state, want.state):
        torch.testing.assert_close(a, b)
    # the running statistics moved once, as torch ops move them
    torch.testing.assert_close(norm.running_mean, norm_torch.running_mean)
    torch.testing.assert_close(norm.running_var, norm_torch.running_var)
    # later calls go to torch ops at once, without a warning
    launched = len(kernels_that_fail['launched'])
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        again = backends.forward('triton', c, norm_torch._replace(
            training=False), identity, True, params, options)
    assert len(kernels_that_fail['launched']) == launched
    assert again.y.shape == c.shape


def test_backward_of_a_triton_forward_falls_back_to_torch(
        kernels_that_fail):
    """Forward ran on the kernels; backward cannot launch: torch ops take
    it from the same saved state."""
    c, identity, params, norm = _tail_inputs(torch.float64)
    options = PRMOptions(groups=2)
    out = triton_backend.forward(c, norm, identity, True, params, options)
    assert triton_backend.broken_reason() is None  # forward: no failure
    kernels_that_fail['failing'].add('bwd_out_kernel')
    saved = Saved(c, out.y, norm, out.save_mean, out.save_invstd, params,
                  out.state, options, True)
    upstream = torch.randn_like(c)
    needs = Needs(True, True, True)
    want = torch_ops.backward(upstream, saved, needs)
    with pytest.warns(RuntimeWarning, match='PRM_DET_BACKEND=torch'):
        got = backends.backward('triton', upstream, saved, needs)
    for a, b in zip((got.c, got.identity, got.bn_weight, got.bn_bias,
                     *got.params), (want.c, want.identity, want.bn_weight,
                                    want.bn_bias, *want.params)):
        torch.testing.assert_close(a, b)


def test_a_bug_on_the_interpreter_is_raised_not_hidden(monkeypatch):
    """Only compile and launch failures fall back: an error of the
    launcher's own (here a ValueError) surfaces."""
    monkeypatch.setitem(triton_backend._state, 'broken', None)

    def launch(kernel, grid, num_warps, **args):
        raise ValueError('a launcher bug')

    monkeypatch.setattr(triton_backend, '_launch', launch)
    c, identity, params, norm = _tail_inputs()
    with pytest.raises(ValueError, match='a launcher bug'):
        triton_backend.forward(c, None, identity, True, params,
                               PRMOptions(groups=2))
    assert triton_backend.broken_reason() is None


def test_the_broken_kernels_raise_and_select_names_the_stand_in(
        kernels_that_fail):
    """The backend does not switch itself: it raises KernelsBroken (on
    this call and every later one) and select() names torch ops in its
    place, for a forced triton as for the default."""
    from prm_det.ops.contract import KernelsBroken
    kernels_that_fail['failing'].add('fwd_sums_kernel')
    c, identity, params, _ = _tail_inputs()
    options = PRMOptions(groups=2)
    with use_backend('triton'):
        assert backends.select(c, options) is triton_backend
    with pytest.warns(RuntimeWarning, match='OutOfResources'), \
            pytest.raises(KernelsBroken, match='shared memory'):
        triton_backend.forward(c, None, identity, True, params, options)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        with pytest.raises(KernelsBroken):
            triton_backend.forward(c, None, identity, True, params, options)
    with use_backend('triton'):
        assert backends.select(c, options) is torch_ops
        y = prm_block_tail(c, params, options, identity=identity, relu=True)
    with use_backend('torch'):
        want = prm_block_tail(c, params, options, identity=identity,
                              relu=True)
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize('error', [RuntimeError('a driver error'),
                                   TypeError('a launcher bug')])
def test_only_tritons_compile_and_resource_errors_fall_back(monkeypatch,
                                                           error):
    """Anything but Triton's CompilationError, OutOfResources and
    PTXASError is raised as it is, and the kernels stay in use."""
    monkeypatch.setitem(triton_backend._state, 'broken', None)

    def launch(kernel, grid, num_warps, **args):
        raise error

    monkeypatch.setattr(triton_backend, '_launch', launch)
    c, identity, params, _ = _tail_inputs()
    with pytest.raises(type(error), match=str(error)):
        backends.forward('triton', c, None, identity, True, params,
                         PRMOptions(groups=2))
    assert triton_backend.broken_reason() is None


def test_gate_tail_triton_that_cannot_launch_runs_on_torch(kernels_that_fail):
    """A gate tail kernel Triton cannot fit: one warning, the call's result
    from torch ops (the same as the modules'), later tails on torch ops
    without launching."""
    from prm_det.models.layers import SE
    from prm_det.ops.gate_tail import tail_backend
    kernels_that_fail['failing'].add('tail_fwd_kernel')
    torch.manual_seed(0)
    se, norm = SE(8, ratio=1 / 4), torch.nn.BatchNorm2d(8)
    c, identity = torch.randn(2, 8, 6, 5), torch.randn(2, 8, 6, 5)
    with torch.no_grad():
        want = torch.relu(se(norm(c)) + identity)
    norm.num_batches_tracked.zero_()
    norm.running_mean.zero_()
    norm.running_var.fill_(1)
    with use_backend('triton'), torch.no_grad():
        assert tail_backend(c) == 'triton'
        with pytest.warns(RuntimeWarning, match='OutOfResources'):
            got = se.forward_norm_residual(c, norm, identity)
        torch.testing.assert_close(got, want)
        launched = len(kernels_that_fail['launched'])
        assert tail_backend(c) == 'torch'  # the stand-in from now on
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            se.forward_norm_residual(c, norm, identity)
    assert len(kernels_that_fail['launched']) == launched
