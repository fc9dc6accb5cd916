import os
import os.path as osp

import pytest
from helpers import REPO, write_demo_checkpoint

# Triton's interpreter runs the ``triton`` backend's kernels on CPU tensors;
# it must be chosen before triton is imported. A CUDA machine runs them
# compiled instead.
try:
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault('TRITON_INTERPRET', '1')
except ImportError:  # test_setup runs before the stack is installed
    pass


def _interpreted_device_calls_without_repatching():
    """Test speed only. Triton's interpreter patches the modules a jitted
    device function (tl.sum, tl.sigmoid, the kernels' helpers) sees on
    every call of it, ~0.5 ms each (measured: most of an interpreted
    test's time), and never undoes those patches. Patching once per
    function leaves the modules as every later call would: the same
    computation, several times faster."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    cls = interpreter.InterpretedFunction
    if not (hasattr(cls, 'rewrite') and hasattr(interpreter, '_patch_lang')):
        return  # another triton: leave it as it is
    patched = set()

    def call(self, *args, **kwargs):
        if self.fn not in patched:
            interpreter._patch_lang(self.fn)
            patched.add(self.fn)
        try:
            return self.rewrite()(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    cls.__call__ = call


if os.environ.get('TRITON_INTERPRET') == '1':
    _interpreted_device_calls_without_repatching()

GOLDEN_DIR = osp.join(osp.dirname(REPO), 'shared', 'golden')
GOLDEN = osp.join(GOLDEN_DIR, 'prm_official.pt')


def _load_golden(path):
    import torch
    if not osp.isfile(path):
        pytest.fail(f'golden vectors not found at {path}: the repository '
                    f'expects shared/ beside it')
    return torch.load(path, weights_only=True)


@pytest.fixture(scope='session')
def golden():
    """The official PRM layer's vectors."""
    return _load_golden(GOLDEN)


@pytest.fixture(scope='session')
def attention_golden():
    """The official SGE, CBAM, BAM, SK and GE code's vectors."""
    return _load_golden(osp.join(GOLDEN_DIR, 'attention_official.pt'))


@pytest.fixture(scope='session', autouse=True)
def _mmdet_scope():
    """Build from mmdet's registries as mmdet's own tests do."""
    try:
        from mmdet.utils import register_all_modules
    except ImportError:
        return
    import prm_det  # noqa: F401
    register_all_modules()


@pytest.fixture(scope='session', autouse=True)
def _safe_checkpoint_loading():
    """Checkpoints load as data in this process, as in prm_det's tools
    (they call this) and under its configs (custom_imports): importing
    prm_det alone changes no loader (test_checkpoint_safety, in a fresh
    interpreter)."""
    try:
        from prm_det.engine import install_safe_loading
    except ImportError:  # test_setup runs before the stack is installed
        return
    install_safe_loading()


@pytest.fixture(scope='session')
def repo():
    os.chdir(REPO)
    return REPO


@pytest.fixture(scope='session')
def demo_checkpoint(tmp_path_factory):
    """The demo PRM-RetinaNet's weights with random PRM parameters
    (helpers.write_demo_checkpoint), written once a run for the tests that
    load, test, export or draw a checkpoint: its path. Read it, copy it;
    do not change it."""
    return write_demo_checkpoint(
        str(tmp_path_factory.mktemp('demo_checkpoint') / 'demo.pth'))


@pytest.fixture(params=['cpu', 'torch', 'triton'])
def backend(request):
    """Runs a test on each of PRM's backends, forced with ``use_backend``:
    the compiled CPU kernel (``make setup`` builds it, so a kernel that does
    not build fails here with the reason), torch ops, and the Triton kernels
    (through Triton's interpreter on a machine without CUDA)."""
    from prm_det.ops import use_backend
    from prm_det.ops.backends import BACKENDS
    module = BACKENDS[request.param]
    assert module.available(), (
        f'PRM backend {request.param!r} is not available: '
        f'{module.unavailable_reason()}')
    with use_backend(request.param):
        yield request.param


# The expensive variants of tests whose other variants stay in the fast tier
# (make test-fast, -m "not slow"): (test function, predicate on its
# parameter id). Triton's interpreter runs its kernels a hundred times
# slower than the CPU kernel; batch 3 and whole backbones on it add no
# promise that batch 1 and the other backends do not already cover.
SLOW_VARIANTS = (
    ('test_prm_compiles_whole_on_the_other_backends',
     lambda id_: id_ == 'triton'),
    ('test_fused_batchnorm_backward_matches_torch_ops',
     lambda id_: id_.startswith('triton-') and '-b3-' in id_),
    ('test_prm_block_keeps_no_normalized_copy_for_backward',
     lambda id_: id_ == 'triton'),
    ('test_channels_last_backbone_matches_contiguous',
     lambda id_: id_ == 'triton'),
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        callspec = getattr(item, 'callspec', None)
        for name, slow in SLOW_VARIANTS:
            if (callspec is not None and item.originalname == name
                    and slow(callspec.id)):
                item.add_marker(pytest.mark.slow)
