"""prm_det's configs as mmengine's config loader reads them, and as the
tools load them (:func:`load_config`: the file, ``--cfg-options``, the
launcher's settings).

* ``import prm_det`` lets a user's config inherit ours:
  ``_base_ = 'prm_det::configs/retinanet_prm_r50.py'``. mmengine accepts
  ``PKG::PATH`` only for the packages named in its ``MODULE2PACKAGE`` table
  (module name to pip name), which lists OpenMMLab's own: prm_det adds
  itself there (and :mod:`prm_det.registry` gives the ``prm_det`` scope
  such bases get). mmengine reads ``_base_`` before ``custom_imports``, so
  prm_det must be imported first: our tools, ``mim train prm_det`` and
  ``mim test prm_det`` do that.
* mmengine resolves ``PKG::PATH`` to ``PKG/.mim/configs/PATH`` of the
  distribution pip knows by that name: the wheel's copy of this
  repository's ``configs/`` (setup.py). A checkout's package (its tools put
  it first on ``sys.path``) and an editable install (``pip install -e .``,
  where pip's record points at site-packages) have no ``.mim/``, and
  mmengine stops at a missing ``.mim/model-index.yml``. So prm_det resolves
  its own bases itself (:func:`resolve_base`), from the package that is
  imported: the wheel's ``.mim/configs/PATH``, or the checkout's ``PATH``
  beside the package; bases of other packages go to mmengine as before.
* mmengine reads every ``PKG::`` base (``mmdet::`` in each of our configs)
  with ``pkg_resources``, which setuptools 82 removed.
  :func:`load_config_file` says so, with the one-line fix, instead of
  mmengine's traceback.
"""
import os.path as osp
from typing import Optional

from mmengine.config import Config

from ..private_apis import config_base_resolver, set_config_base_resolver
from .distributed import configure_launcher
from .shipped_tools import package_dir

PACKAGE = 'prm_det'
SETUPTOOLS_FIX = "pip install 'setuptools>=77.0.3,<80.9'"


class ConfigLoaderUnavailable(ImportError):
    """mmengine's config loader lacks ``pkg_resources``."""


class ConfigBaseNotFound(FileNotFoundError):
    """A ``prm_det::PATH`` base names no config of the prm_det imported."""


def _package_dir() -> str:
    """The folder of the prm_det package imported here."""
    return package_dir()


def _checkout_root() -> Optional[str]:
    """The repository around the imported package when it is a checkout's
    (run by the checkout's tools, or installed with ``pip install -e .``):
    no wheel ``.mim/`` in the package, the repository's ``configs/`` and
    ``model-index.yml`` beside it."""
    package = _package_dir()
    root = osp.dirname(package)
    if (not osp.isdir(osp.join(package, '.mim'))
            and osp.isdir(osp.join(root, 'configs'))
            and osp.isfile(osp.join(root, 'model-index.yml'))):
        return root
    return None


def resolve_base(path: str) -> str:
    """The file of ``_base_ = 'prm_det::PATH'`` (PATH as in this repository,
    ``configs/...``) for the prm_det imported here: the wheel's
    ``prm_det/.mim/configs/PATH``, or the checkout's ``PATH``; else
    :class:`ConfigBaseNotFound` naming the places looked at and the fix."""
    path = path[len(PACKAGE) + 2:] if path.startswith(PACKAGE + '::') \
        else path
    package = _package_dir()
    root = _checkout_root()
    folder = root if root is not None else osp.join(package, '.mim',
                                                    'configs')
    candidate = osp.join(folder, path)
    if osp.isfile(candidate):
        return candidate
    if osp.isdir(folder):
        fix = ("name a file under prm_det's configs/ by its path in the "
               "repository, e.g. _base_ = "
               "'prm_det::configs/retinanet_prm_r50.py'")
        if osp.isfile(osp.join(folder, 'configs', path)):
            fix = f"_base_ = 'prm_det::configs/{path}'"
        raise ConfigBaseNotFound(
            f"_base_ = 'prm_det::{path}': no such config in prm_det "
            f"({candidate} does not exist). Fix: {fix}")
    raise ConfigBaseNotFound(
        f"_base_ = 'prm_det::{path}': the prm_det imported ({package}) has "
        f"neither the wheel's .mim/configs/ nor a checkout's configs/ beside "
        f"it, so it has no configs to inherit. Fix: install prm_det from its "
        f"wheel or checkout (pip install prm_det-*.whl, pip install "
        f"/path/to/checkout, or pip install -e /path/to/checkout), run a "
        f"checkout's tools/, or name the base by its file path "
        f"(_base_ = '/path/to/checkout/{path}')")


def register_config_scope() -> None:
    """Make ``prm_det::PATH`` a base mmengine can load, from a wheel, an
    editable install or a checkout alike (:func:`resolve_base`)."""
    from mmengine.config import utils
    utils.MODULE2PACKAGE.setdefault(PACKAGE, PACKAGE)
    # mmengine 0.7 to 0.10 (tests/test_private_apis.py); wrapped once
    mmengine_get_cfg_path = config_base_resolver()
    if mmengine_get_cfg_path is None or getattr(
            mmengine_get_cfg_path, 'resolves_prm_det', False):
        return

    def _get_cfg_path(cfg_path: str, filename: str):
        if cfg_path.startswith(PACKAGE + '::'):
            return resolve_base(cfg_path), PACKAGE
        return mmengine_get_cfg_path(cfg_path, filename)

    _get_cfg_path.resolves_prm_det = True
    _get_cfg_path.__doc__ = mmengine_get_cfg_path.__doc__
    set_config_base_resolver(_get_cfg_path)


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
            f'setuptools 82 and later no longer have (No module named '
            f'\'pkg_resources\'). Fix: {SETUPTOOLS_FIX}') from None


def relocate_data_root(cfg: Config, new_root: str) -> None:
    """Make ``--cfg-options data_root=...`` move the whole dataset.

    mmdet configs copy the top-level ``data_root`` into every dataset and
    evaluator when the file is parsed, so changing ``data_root`` afterwards
    changes nothing. Here every string that starts with the old root is
    rewritten to start with the new one.
    """
    old_root = cfg.get('data_root')
    if not new_root.endswith('/'):
        new_root += '/'

    def rewrite(node):
        if isinstance(node, dict):
            return type(node)({k: rewrite(v) for k, v in node.items()})
        if isinstance(node, (list, tuple)):
            return type(node)(rewrite(v) for v in node)
        if isinstance(node, str) and old_root and node.startswith(old_root):
            return new_root + node[len(old_root):]
        return node

    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader',
                'val_evaluator', 'test_evaluator'):
        if cfg.get(key) is not None:
            cfg[key] = rewrite(cfg[key])
    cfg.data_root = new_root


def load_config(path: str, cfg_options: Optional[dict] = None,
                launcher: str = 'none') -> Config:
    """Config.fromfile + --cfg-options (with ``data_root`` moving the whole
    dataset) + the launcher settings."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'config file not found: {path}')
    cfg = load_config_file(path)
    cfg_options = dict(cfg_options or {})
    new_root = cfg_options.pop('data_root', None)
    if new_root is not None:
        relocate_data_root(cfg, new_root)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    configure_launcher(cfg, launcher)
    return cfg
