"""Remote checkpoints (``http(s)://``, ``torchvision://``, ``open-mmlab://``,
``mmcls://``, ``s3://``, ``petrel://``, ``pavi://``) loaded as data, like
local files.

mmengine resolves these schemes to a URL and calls torch.hub's
``load_state_dict_from_url``, which unpickles the cached file with
``weights_only=False`` and checks no hash: a file in the hub cache, or one
served at the URL, runs whatever code it carries. The schemes are taken
over here (by :func:`.safe_loading.install_safe_loading`): the file is
downloaded into the same cache, checked against the SHA-256 prefix
in its name where it has one (torch's and OpenMMLab's published checkpoints
are named so: ``resnet50-0676ba61.pth``), also when it was already there,
and loaded by :func:`~prm_det.engine.checkpoints.reading.load_checkpoint_file`: as
data unless the user opted in (``--trust-checkpoint``). Object stores
(``s3://`` and ``petrel://`` through mmengine's Petrel backend, ``pavi://``
through pavi's model cloud) are read into a temporary file that is loaded
the same way and deleted.
"""
import hashlib
import logging
import os
import os.path as osp
import tempfile
from typing import Callable, Optional
from urllib.parse import urlparse

import mmengine
import torch
from mmengine.dist import get_dist_info
from mmengine.fileio import get_file_backend
from mmengine.logging import print_log
from mmengine.runner.checkpoint import (get_deprecated_model_names,
                                        get_external_models, get_mmcls_models)

from ...private_apis import mmcls_to_backbone, mmengine_home

from .reading import load_checkpoint_file

# torch.hub's convention: the hex digits between the last '-' and the
# extension start the file's SHA-256 (8 of them in torch's and OpenMMLab's
# names); fewer than 8 is taken for part of a name (resnet-50.pth)
_HASH_MIN = 8


class PretrainedWeightsUnavailable(RuntimeError):
    """The ImageNet weights a config starts from could not be loaded."""


class ChecksumMismatch(RuntimeError):
    """A downloaded or cached checkpoint is not the file its name says."""


def hub_checkpoint_dir() -> str:
    """Where downloaded checkpoints are kept: torch.hub's cache
    (``$TORCH_HOME/hub/checkpoints``, ``~/.cache/torch/hub/checkpoints``)."""
    return osp.join(torch.hub.get_dir(), 'checkpoints')


def expected_hash(filename: str) -> Optional[str]:
    """The SHA-256 prefix a published checkpoint's name carries
    (``resnet50-0676ba61.pth`` -> ``0676ba61``), or None."""
    match = torch.hub.HASH_REGEX.search(osp.basename(filename))
    if match and len(match.group(1)) >= _HASH_MIN:
        return match.group(1)
    return None


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def check_hash(path: str, url: str) -> None:
    """Raise :class:`ChecksumMismatch` when ``path``'s SHA-256 does not
    start with the prefix in its name."""
    prefix = expected_hash(path)
    if prefix is None:
        return
    actual = sha256_of(path)
    if not actual.startswith(prefix):
        raise ChecksumMismatch(
            f'{path} is not the checkpoint published at {url}: its name '
            f'says its SHA-256 starts with {prefix}, it is {actual[:16]}... '
            f'(a damaged download, or another file put in its place). '
            f'Delete it to download it again, or to use a file of your own, '
            f'name it in the config instead: --cfg-options '
            f'model.backbone.init_cfg.checkpoint=/path/to/weights.pth')


def download(url: str, model_dir: Optional[str] = None,
             progress: bool = False) -> str:
    """The cached file for ``url`` (downloaded first when absent), its hash
    checked."""
    model_dir = model_dir or hub_checkpoint_dir()
    os.makedirs(model_dir, exist_ok=True)
    cached = osp.join(model_dir, osp.basename(urlparse(url).path))
    if not osp.isfile(cached):
        print_log(f'Downloading {url} to {cached}', logger='current')
        # torch writes to a temporary file, checks the hash prefix and
        # renames: an interrupted download leaves no file under the name
        try:
            torch.hub.download_url_to_file(
                url, cached, hash_prefix=expected_hash(cached),
                progress=progress)
        except RuntimeError as error:
            if 'invalid hash value' not in str(error):
                raise
            raise ChecksumMismatch(
                f'The file downloaded from {url} is not the checkpoint its '
                f'name says ({error}); it was not kept. Try again later, or '
                f'name a local file in the config: --cfg-options '
                f'model.backbone.init_cfg.checkpoint=/path/to/weights.pth'
            ) from None
    check_hash(cached, url)
    return cached


def load_from_http(filename: str, map_location=None,
                   model_dir: Optional[str] = None, progress: bool = False):
    """mmengine's ``http(s)://`` scheme: download into torch's hub cache
    (rank 0 first, as mmengine does), check the hash, load as data."""
    rank, world_size = get_dist_info()
    cached = None
    if rank == 0:
        cached = download(filename, model_dir, progress)
    if world_size > 1:
        torch.distributed.barrier()
        if rank > 0:
            cached = download(filename, model_dir, progress)
    return load_checkpoint_file(cached, map_location,
                                name=f'{cached} (from {filename})')


def torchvision_urls() -> dict:
    return mmengine.load(
        osp.join(mmengine.__path__[0], 'hub', 'torchvision_0.12.json'))


def load_from_torchvision_urls(filename: str, map_location=None):
    """``torchvision://NAME`` without torchvision: the URL from mmengine's
    table, then :func:`load_from_http`."""
    name = filename.split('://', 1)[1]
    urls = torchvision_urls()
    if name not in urls:
        raise PretrainedWeightsUnavailable(
            f'{filename!r}: no such torchvision model; known names: '
            f'{", ".join(sorted(urls))}')
    url = urls[name]
    try:
        return load_from_http(url, map_location=map_location)
    except OSError as error:  # offline, proxy, refused, ...
        raise PretrainedWeightsUnavailable(
            f'Could not load the ImageNet weights {filename} from {url} '
            f'({type(error).__name__}: {error}).\n'
            f'The backbone starts from them, as in mmdet. Ways out:\n'
            f'  * put the file {url.rsplit("/", 1)[1]} in torch\'s hub cache '
            f'({hub_checkpoint_dir()}/), or\n'
            f'  * point the config at a local checkpoint: --cfg-options '
            f'model.backbone.init_cfg.checkpoint=/path/to/weights.pth '
            f'(an ImageNet checkpoint of the official PRM code, e.g. '
            f'prm_resnet50.pth.tar, loads as is), or\n'
            f'  * train from scratch: --cfg-options '
            f'model.backbone.init_cfg=None') from error


def load_from_openmmlab(filename: str, map_location=None):
    """mmengine's ``open-mmlab://NAME``: the URL (or file under mmengine's
    home) from its table, loaded as data."""
    prefix, model_name = filename.split('://', 1)
    deprecated = get_deprecated_model_names()
    if model_name in deprecated:
        print_log(f'{prefix}://{model_name} is deprecated in favor of '
                  f'{prefix}://{deprecated[model_name]}', logger='current',
                  level=logging.WARNING)
        model_name = deprecated[model_name]
    model_url = get_external_models()[model_name]
    if model_url.startswith(('http://', 'https://')):
        return load_from_http(model_url, map_location=map_location)
    local = osp.join(mmengine_home(), model_url)
    return load_checkpoint_file(local, map_location,
                                name=f'{local} (from {filename})')


def load_from_mmcls(filename: str, map_location=None):
    """mmengine's ``mmcls://NAME``, loaded as data."""
    model_url = get_mmcls_models()[filename[len('mmcls://'):]]
    return mmcls_to_backbone(
        load_from_http(model_url, map_location=map_location))


def load_temporary_copy(filename: str, write: Callable[[str], None],
                        map_location=None):
    """Load the remote checkpoint ``filename`` as data: ``write(path)``
    puts its bytes in a local file, deleted after loading."""
    with tempfile.TemporaryDirectory(prefix='prm_det_checkpoint_') as tmp:
        local = osp.join(tmp, osp.basename(filename.rstrip('/')) or 'ckpt')
        write(local)
        return load_checkpoint_file(local, map_location, name=filename)


def load_from_ceph(filename: str, map_location=None, backend='petrel'):
    """mmengine's ``s3://`` and ``petrel://`` (optionally ``cluster:s3://``)
    through its Petrel file backend, loaded as data."""
    store = get_file_backend(filename, backend_args={'backend': backend})

    def write(local):
        data = store.get(filename)
        if data is None:  # petrel's client answers a missing key so
            raise FileNotFoundError(f'{filename} can not be found.')
        with open(local, 'wb') as f:
            f.write(data)

    return load_temporary_copy(filename, write, map_location)


def load_from_pavi(filename: str, map_location=None):
    """mmengine's ``pavi://MODEL_PATH`` from pavi's model cloud, loaded as
    data."""
    try:
        from pavi import modelcloud
    except ImportError:
        raise ImportError(
            f'{filename}: pavi:// checkpoints need the pavi package (the '
            f'model cloud\'s client); or download the file and name its '
            f'local path instead') from None
    model = modelcloud.get(filename[len('pavi://'):])
    return load_temporary_copy(filename, model.download, map_location)
