"""``torchvision://`` checkpoints without torchvision.

mmdet's configs start ResNet backbones from ``torchvision://resnet50``, which
mmengine resolves by importing torchvision to look up the URL. torchvision
has no CPU build here and a detector does not need it: the URLs are the ones
mmengine ships in ``mmengine/hub/torchvision_0.12.json``. This scheme takes
over ``torchvision://`` (and the old ``modelzoo://``): it reads that table,
downloads with mmengine's ``load_from_http`` into torch's hub cache, and when
the download fails says how to use a local file instead.
"""
import os.path as osp

import mmengine
import torch
from mmengine.runner.checkpoint import CheckpointLoader, load_from_http


class PretrainedWeightsUnavailable(RuntimeError):
    """The ImageNet weights a config starts from could not be loaded."""


def torchvision_urls() -> dict:
    return mmengine.load(
        osp.join(mmengine.__path__[0], 'hub', 'torchvision_0.12.json'))


@CheckpointLoader.register_scheme(
    prefixes=('torchvision://', 'modelzoo://'), force=True)
def load_from_torchvision_urls(filename: str, map_location=None):
    name = filename.split('://', 1)[1]
    urls = torchvision_urls()
    if name not in urls:
        raise PretrainedWeightsUnavailable(
            f'{filename!r}: no such torchvision model; known names: '
            f'{", ".join(sorted(urls))}')
    url = urls[name]
    try:
        return load_from_http(url, map_location=map_location)
    except Exception as error:  # offline, proxy, truncated file, ...
        raise PretrainedWeightsUnavailable(
            f'Could not load the ImageNet weights {filename} from {url} '
            f'({type(error).__name__}: {error}).\n'
            f'The backbone starts from them, as in mmdet. Ways out:\n'
            f'  * put the file {url.rsplit("/", 1)[1]} in torch\'s hub cache '
            f'(~/.cache/torch/hub/checkpoints/), or\n'
            f'  * point the config at a local checkpoint: --cfg-options '
            f'model.backbone.init_cfg.checkpoint=/path/to/weights.pth '
            f'(an ImageNet checkpoint of the official PRM code, e.g. '
            f'prm_resnet50.pth.tar, loads as is), or\n'
            f'  * train from scratch: --cfg-options '
            f'model.backbone.init_cfg=None') from error


@CheckpointLoader.register_scheme(prefixes='', force=True)
def load_from_local_file(filename: str, map_location=None):
    """mmengine's local-file loader, made to work with torch >= 2.6.

    mmengine 0.10.7 writes its message hub (a ``HistoryBuffer`` of numpy
    values) into every checkpoint and reads them back with a bare
    ``torch.load``; since torch 2.6 that defaults to ``weights_only=True``,
    which refuses those objects, so ``tools/test.py`` and ``--resume`` fail
    on checkpoints the Runner just wrote. Local checkpoints are loaded as
    mmengine loaded them before torch 2.6 (``weights_only=False``: only load
    checkpoints you trust, as always with mmengine).
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    return torch.load(filename, map_location=map_location, weights_only=False)
