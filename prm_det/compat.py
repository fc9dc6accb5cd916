"""What prm_det needs of the installed torch, checked at import."""
import re
from typing import Optional

# torch.library custom ops with register_fake and register_autograd (the PRM
# op), torch.serialization.safe_globals (checkpoints loaded as data)
MIN_TORCH = (2, 5)


def check_torch(version: Optional[str] = None) -> None:
    """Raise ImportError, naming the fix, when torch (``version``, by default
    the installed one) is older than :data:`MIN_TORCH`."""
    if version is None:
        import torch
        version = torch.__version__
    found = tuple(int(part) for part in re.findall(r'\d+', version)[:2])
    if found < MIN_TORCH:
        need = '.'.join(map(str, MIN_TORCH))
        raise ImportError(
            f'prm_det needs torch >= {need} (its PRM op is a torch.library '
            f'custom op; checkpoints load through torch\'s weights-only '
            f'unpickler); this environment has torch {version}. Install a '
            f'newer torch (pip install "torch>={need}") and an mmcv built for '
            f'it: mmcv\'s published wheels stop at older torch, so build it '
            f'from source (MMCV_WITH_OPS=1 pip install mmcv==2.1.0 '
            f'--no-build-isolation).')
