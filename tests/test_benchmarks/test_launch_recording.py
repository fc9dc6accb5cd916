"""benchmarks/triton_launches.py: the ``triton`` backend's launches
recorded from outside the backend, each with exactly the arguments its
kernel takes (the backend names them all; nothing is filtered)."""
import inspect
import os.path as osp
import sys

import pytest
import torch
from helpers import REPO

from prm_det.ops import PRMOptions, PRMParams
from prm_det.ops.backends import triton_backend
from prm_det.ops.contract import BatchNorm, Needs, Saved

pytest.importorskip('triton')


@pytest.fixture
def triton_launches(monkeypatch):
    monkeypatch.syspath_prepend(osp.join(REPO, 'benchmarks'))
    sys.modules.pop('triton_launches', None)
    import triton_launches
    return triton_launches


def test_recorded_launches_carry_each_kernels_own_arguments(
        triton_launches):
    # compiled on a GPU; on a CPU, Triton's interpreter (tests/conftest.py)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    torch.manual_seed(0)
    c = torch.randn(2, 8, 6, 5, device=device)
    assert triton_backend.check(c) is None, triton_backend.check(c)
    identity = torch.randn_like(c)
    one, zero = torch.ones(8, device=device), torch.zeros(8, device=device)
    norm = BatchNorm(one, zero, zero.clone(), one.clone(), True, 0.1, 1e-5)
    params = PRMParams(*(p.to(device) for p in (
        torch.randn(1, 2, 1, 1), torch.randn(1, 2, 1, 1),
        torch.randn(1, 2, 1), torch.randn(1, 2, 1),
        torch.rand(1, 2, 1, 1) + 0.1, torch.rand(1) + 0.5)))
    options = PRMOptions(groups=2)
    real_launch = triton_backend._launch
    with triton_launches.record_launches() as launches:
        out = triton_backend.forward(c, norm, identity, True, params,
                                     options)
        saved = Saved(c, out.y, norm, out.save_mean, out.save_invstd,
                      params, out.state, options, True)
        triton_backend.backward(torch.randn_like(c), saved,
                                Needs(True, True, True))
    assert triton_backend._launch is real_launch  # put back
    assert [launch.name for launch in launches] == [
        'channel_partial_kernel', 'fwd_sums_kernel', 'fwd_stats_kernel',
        'fwd_out_kernel', 'bwd_sums_kernel', 'bwd_out_kernel',
        'bn_backward_kernel']
    for launch in launches:
        taken = list(inspect.signature(launch.kernel.fn).parameters)
        assert sorted(launch.args) == sorted(taken), launch.name
