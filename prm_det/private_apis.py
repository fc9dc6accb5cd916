"""Every private API of torch and mmengine that prm_det uses, in one place.

Each is reached through a function here and nowhere else, with why no
public one does. ``tests/test_private_apis.py`` checks every one against the
installed libraries and fails naming the library, its version and what is
gone, so an upgrade that moves one fails there, not in a user's training.
(The tests' own use of Triton's interpreter internals, a speed-up in
``tests/conftest.py``, is checked there too.)
"""
from typing import Callable, Optional

import torch
import torch.nn as nn

# --- torch -----------------------------------------------------------------

#: The base class of torch's BatchNorm modules (BatchNorm2d, SyncBatchNorm,
#: mmengine's _BatchNormXd): no public name covers them all.
BATCH_NORM_BASE = nn.modules.batchnorm._BatchNorm


def torch_export_in_progress() -> bool:
    """Whether ``torch.export`` is tracing. ``torch.compiler.is_exporting()``
    is the public call, but torch.compile before torch 2.13 folds it to True
    (which sent compiled PRM to the reference composition); the flag it
    reads is not folded. torch 2.5 has neither."""
    return bool(getattr(torch.compiler, '_is_exporting_flag', False))


HOOK_KINDS = ('forward', 'forward_pre', 'backward', 'backward_pre')


def hooks_on(module: nn.Module, *kinds: str) -> bool:
    """Whether a hook of these kinds (of :data:`HOOK_KINDS`) would run
    when ``module`` is called: its own (``register_forward_hook`` and its
    kin) or a global one (``register_module_forward_hook`` and its kin).
    torch has registration functions but no query."""
    everywhere = nn.modules.module
    return any(getattr(module, f'_{kind}_hooks') or
               getattr(everywhere, f'_global_{kind}_hooks', None)
               for kind in kinds)


def module_tensors(module: nn.Module):
    """A module's own parameter and buffer dicts, read without
    ``nn.Module.__getattr__`` (measured: a PRM block tail reads a
    BatchNorm's six tensors on every call)."""
    return module._parameters, module._buffers


# --- mmengine --------------------------------------------------------------

def mmengine_home() -> str:
    """mmengine's cache folder for ``open-mmlab://`` files
    (``~/.cache/mmengine``), as its own loader finds it."""
    from mmengine.runner.checkpoint import _get_mmengine_home
    return _get_mmengine_home()


def mmcls_to_backbone(checkpoint):
    """An ``mmcls://`` checkpoint made an mmdet backbone's, as mmengine's own
    ``mmcls://`` loader does."""
    from mmengine.runner.checkpoint import _process_mmcls_checkpoint
    return _process_mmcls_checkpoint(checkpoint)


def history_buffer_statistics() -> set:
    """The statistics methods registered on mmengine's ``HistoryBuffer``
    (``register_statistics`` adds to them; no getter)."""
    from mmengine.logging import HistoryBuffer
    return set(HistoryBuffer._statistics_methods)


def registry_locations(registry) -> list:
    """The modules an mmengine ``Registry`` imports to fill itself (a
    constructor argument with no getter)."""
    return list(registry._locations)


def format_size(value: float) -> str:
    """A count as mmengine's complexity analysis prints it (``4.1G``)."""
    from mmengine.analysis.print_helper import _format_size
    return _format_size(value)


def config_base_resolver() -> Optional[Callable]:
    """The function mmengine's ``Config`` turns a ``_base_`` name into a file
    and a scope with (``Config._get_cfg_path``, a staticmethod taking
    ``(cfg_path, filename)``), or None when this mmengine has none: the only
    way to resolve ``PKG::PATH`` bases from a checkout."""
    from mmengine.config import Config
    resolver = Config.__dict__.get('_get_cfg_path')
    return resolver.__func__ if isinstance(resolver, staticmethod) else None


def set_config_base_resolver(resolve: Callable) -> None:
    """Make ``resolve(cfg_path, filename)`` mmengine's base resolver."""
    from mmengine.config import Config
    Config._get_cfg_path = staticmethod(resolve)
