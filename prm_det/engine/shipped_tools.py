"""The tools prm_det ships (``tools/`` of a checkout, ``prm_det/.mim/tools/``
of an installed wheel): where they are, and one loaded as a module by
another (tools are scripts, not a package)."""
import importlib.util
import os.path as osp
from functools import lru_cache
from types import ModuleType


def package_dir() -> str:
    """The folder of the prm_det package imported here."""
    return osp.dirname(osp.dirname(osp.abspath(__file__)))


def shipped_tool(name: str) -> str:
    """The path of ``tools/NAME``: the installed package's
    (``prm_det/.mim/tools/``) or the checkout's; shown relative to the
    working directory when it is under it."""
    package = package_dir()
    installed = osp.join(package, '.mim', 'tools', name)
    path = installed if osp.exists(installed) else osp.join(
        osp.dirname(package), 'tools', name)
    relative = osp.relpath(path)
    return path if relative.startswith('..') else relative


@lru_cache(maxsize=None)
def load_tool(path: str) -> ModuleType:
    """The tool script at ``path`` as a module, imported once per process
    (its ``main(argv)`` and helpers), under a name of its own so that
    ``tools/test.py`` does not shadow a package named ``test``."""
    path = osp.abspath(path)
    name = 'prm_det_tools_' + osp.splitext(osp.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise FileNotFoundError(f'no tool script at {path}')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
