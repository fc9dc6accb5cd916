"""prm_det's configs as mmengine's config loader reads them.

* ``import prm_det`` lets a user's config inherit ours from the installed
  package: ``_base_ = 'prm_det::configs/retinanet_prm_r50.py'``. mmengine
  resolves ``PKG::PATH`` to ``PKG/.mim/configs/PATH`` (where the wheel puts
  this repository's ``configs/`` under ``configs/``, see setup.py) only for
  the packages named in its ``MODULE2PACKAGE`` table (module name to pip
  name), which lists OpenMMLab's own: prm_det adds itself there (and
  :mod:`prm_det.registry` gives the ``prm_det`` scope such bases get).
  mmengine reads ``_base_`` before ``custom_imports``, so prm_det must be
  imported first: our tools, ``mim train prm_det`` and ``mim test prm_det``
  do that.
* mmengine reads every ``PKG::`` base (``mmdet::`` in each of our configs)
  with ``pkg_resources``, which setuptools 81 removed.
  :func:`load_config_file` says so, with the one-line fix, instead of
  mmengine's traceback.
"""
import os.path as osp

from mmengine.config import Config

PACKAGE = 'prm_det'
SETUPTOOLS_FIX = "pip install 'setuptools<81'"


class ConfigLoaderUnavailable(ImportError):
    """mmengine's config loader lacks ``pkg_resources``."""


def shipped_tool(name: str) -> str:
    """The path of ``tools/NAME``: the checkout's, or the installed
    package's (``prm_det/.mim/tools/``); shown relative to the working
    directory when it is under it."""
    package = osp.dirname(osp.dirname(osp.abspath(__file__)))
    installed = osp.join(package, '.mim', 'tools', name)
    path = installed if osp.exists(installed) else osp.join(
        osp.dirname(package), 'tools', name)
    relative = osp.relpath(path)
    return path if relative.startswith('..') else relative


def register_config_scope() -> None:
    """Make ``prm_det::PATH`` a base mmengine can load."""
    from mmengine.config import utils
    utils.MODULE2PACKAGE.setdefault(PACKAGE, PACKAGE)


def load_config_file(path: str) -> Config:
    """``Config.fromfile(path)``, or :class:`ConfigLoaderUnavailable` with
    the fix when mmengine cannot import ``pkg_resources``."""
    try:
        return Config.fromfile(path)
    except ModuleNotFoundError as error:
        if error.name != 'pkg_resources':
            raise
        raise ConfigLoaderUnavailable(
            f'{path}: mmengine loads `_base_ = \'mmdet::...\'` (every '
            f'prm_det config inherits mmdet\'s) with pkg_resources, which '
            f'setuptools 81 and later no longer have (No module named '
            f'\'pkg_resources\'). Fix: {SETUPTOOLS_FIX}') from None
