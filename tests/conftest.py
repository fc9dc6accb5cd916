import os
import os.path as osp

import pytest

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
GOLDEN = osp.join(osp.dirname(REPO), 'shared', 'golden', 'prm_official.pt')


@pytest.fixture(scope='session')
def golden():
    import torch
    if not osp.isfile(GOLDEN):
        pytest.fail(f'golden vectors not found at {GOLDEN}: the repository '
                    f'expects shared/ beside it')
    return torch.load(GOLDEN, weights_only=True)


@pytest.fixture(scope='session', autouse=True)
def _mmdet_scope():
    """Build from mmdet's registries as mmdet's own tests do."""
    try:
        from mmdet.utils import register_all_modules
    except ImportError:
        return
    import prm_det  # noqa: F401
    register_all_modules()


@pytest.fixture(scope='session')
def repo():
    os.chdir(REPO)
    return REPO


@pytest.fixture(params=['kernel', 'torch ops'])
def prm_path(request):
    """Runs a test on each of PRM's fast implementations on CPU: the
    compiled kernel (what CPU runs by default; ``make setup`` builds it, so
    a kernel that does not build fails here with the reason) and the torch
    ops the fast path runs elsewhere (CUDA) or without the kernel."""
    from prm_det.ops import cpu_kernel
    if request.param == 'kernel':
        assert cpu_kernel.available(), (
            f'the PRM CPU kernel did not build: {cpu_kernel.error()}')
        yield request.param
    else:
        with cpu_kernel.kernel_disabled():
            yield request.param
