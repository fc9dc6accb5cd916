"""Checkpoint loading: ``torchvision://`` without torchvision, and local
files that load as data, never as code.

**Local files.** mmengine reads a checkpoint with ``torch.load``, i.e. with
pickle, which can run any code a file carries. Here every local checkpoint
loads with ``weights_only=True``: tensors, plain containers and numbers, plus
exactly the types mmengine's Runner writes (:func:`runner_checkpoint_globals`:
the message hub's ``HistoryBuffer`` of numpy arrays and scalars). Anything
else is refused with :class:`UntrustedCheckpoint`, which names the file, what
it holds that is not allowed, and the opt-in for files the user trusts:
``--trust-checkpoint`` on ``tools/train.py`` and ``tools/test.py``, or
``PRM_DET_TRUST_CHECKPOINTS=1`` in the environment. Importing prm_det never
trusts anything by itself.

**torchvision://**. mmdet's configs start ResNet backbones from
``torchvision://resnet50``, which mmengine resolves by importing torchvision
to look up the URL. torchvision has no CPU build here and a detector does not
need it: the URLs are the ones mmengine ships in
``mmengine/hub/torchvision_0.12.json``. This scheme takes over
``torchvision://`` (and the old ``modelzoo://``): it reads that table,
downloads with mmengine's ``load_from_http`` into torch's hub cache, and when
the download fails says how to use a local file instead.
"""
import os
import os.path as osp
import pickle
import re
import zipfile
from typing import List, Optional

import mmengine
import numpy as np
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader, load_from_http

TRUST_ENV = 'PRM_DET_TRUST_CHECKPOINTS'


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


class UntrustedCheckpoint(pickle.UnpicklingError):
    """A checkpoint holds objects outside the allow-list; unpickling them
    could run code."""


class IncompleteCheckpoint(RuntimeError):
    """A checkpoint file is truncated or otherwise not a whole archive."""


def checkpoints_trusted() -> bool:
    """Whether the user opted in to full unpickling (``--trust-checkpoint``
    on the tools sets ``PRM_DET_TRUST_CHECKPOINTS=1``)."""
    return os.environ.get(TRUST_ENV, '').lower() in ('1', 'true', 'yes')


def _history_buffer_statistic(owner, name: str):
    """``getattr`` for the allow-list, limited to what mmengine pickles with
    it: a statistics method of ``HistoryBuffer`` (``min``, ``max``,
    ``current``, ``mean`` or one registered with ``register_statistics``)."""
    statistics = {'min', 'max', 'current', 'mean'}  # _set_default_statistics
    statistics.update(HistoryBuffer._statistics_methods)
    if owner is not HistoryBuffer or name not in statistics:
        raise pickle.UnpicklingError(
            f'getattr({owner!r}, {name!r}): the allow-list admits getattr '
            f'only for HistoryBuffer\'s statistics methods')
    return getattr(owner, name)


def runner_checkpoint_globals() -> list:
    """The allow-list: what mmengine's Runner writes into a checkpoint
    besides tensors, plain containers and numbers (found by saving one from a
    real training and loading it with ``weights_only=True``; each entry is
    needed, see ``tests/test_tools/test_checkpoint_safety.py``). All of it
    is the message hub's ``HistoryBuffer`` objects:

    * their histories are numpy arrays (``_reconstruct``, ``ndarray``,
      ``dtype`` and its float64 and int64 classes: values and counts);
    * their latest values are numpy scalars (``scalar``);
    * they pickle their statistics methods as
      ``getattr(HistoryBuffer, 'mean')``: ``builtins.getattr`` is allowed as
      :func:`_history_buffer_statistic`, which fetches those methods and
      nothing else.

    numpy 1.x writes ``numpy.core.multiarray.*`` where numpy 2 writes
    ``numpy._core.multiarray.*``: the other spelling is allowed too, for the
    same functions, so that checkpoints written under either load.
    """
    multiarray = np._core.multiarray if hasattr(np, '_core') \
        else np.core.multiarray
    other = ('numpy.core.multiarray' if multiarray.__name__ ==
             'numpy._core.multiarray' else 'numpy._core.multiarray')
    return [
        HistoryBuffer, np.ndarray, np.dtype, type(np.dtype(np.float64)),
        type(np.dtype(np.int64)), multiarray._reconstruct, multiarray.scalar,
        (multiarray._reconstruct, f'{other}._reconstruct'),
        (multiarray.scalar, f'{other}.scalar'),
        (_history_buffer_statistic, 'builtins.getattr')
    ]


def _disallowed_globals(filename: str, error: Exception) -> List[str]:
    """The globals in ``filename`` that the allow-list refuses, read without
    running the pickle (torch disassembles it); for the old non-zip format,
    the one torch's error names."""
    try:
        with torch.serialization.safe_globals(runner_checkpoint_globals()):
            found = torch.serialization.get_unsafe_globals_in_checkpoint(
                filename)
    except Exception:  # not a zip checkpoint: take torch's message
        found = []
    text = str(error)
    if not found:  # an object built from an allowed global, or old format
        found = [a or b for a, b in re.findall(
            r"GLOBAL (\S+)|but got <class '([^']+)'>", text)]
    if not found:
        detail = text.split('WeightsUnpickler error:')[-1].strip()
        found = [detail.splitlines()[0] if detail else repr(error)]
    return found


def _is_truncated(error: Exception) -> bool:
    return isinstance(error, (EOFError, zipfile.BadZipFile)) or \
        'failed reading zip archive' in str(error) or \
        'failed finding central directory' in str(error)


def load_checkpoint_file(filename: str,
                         map_location=None,
                         trust: Optional[bool] = None):
    """``torch.load`` of a local checkpoint as data: ``weights_only=True``
    with :func:`runner_checkpoint_globals` allowed, unless ``trust`` (by
    default: :func:`checkpoints_trusted`).

    Raises:
        FileNotFoundError: no such file.
        UntrustedCheckpoint: the file holds objects outside the allow-list.
        IncompleteCheckpoint: the file is cut short (a kill while writing).
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    if trust is None:
        trust = checkpoints_trusted()
    try:
        if trust:
            return torch.load(filename, map_location=map_location,
                              weights_only=False)
        with torch.serialization.safe_globals(runner_checkpoint_globals()):
            return torch.load(filename, map_location=map_location,
                              weights_only=True)
    except pickle.UnpicklingError as error:
        if trust or _is_truncated(error):
            raise
        found = ', '.join(_disallowed_globals(filename, error))
        raise UntrustedCheckpoint(
            f'Refusing to load the checkpoint {filename}: it contains '
            f'{found}, which is not a tensor, a plain container or one of '
            f'the types mmengine\'s Runner writes, and unpickling it could '
            f'run code. If you trust this file, allow it with '
            f'--trust-checkpoint (tools/train.py, tools/test.py) or '
            f'{TRUST_ENV}=1 in the environment.') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as error:
        if not _is_truncated(error):
            raise
        raise IncompleteCheckpoint(
            f'The checkpoint {filename} is incomplete ({error}); a training '
            f'killed while writing it leaves such a file. Use an earlier '
            f'checkpoint, or --resume without a file to take the newest '
            f'complete one.') from error


@CheckpointLoader.register_scheme(prefixes='', force=True)
def load_from_local_file(filename: str, map_location=None):
    """mmengine's local-file scheme (every path without a URL scheme: the
    Runner's ``load_from`` and ``resume``, ``init_cfg=dict(type='Pretrained',
    checkpoint=...)``, ``tools/test.py``'s checkpoint) through
    :func:`load_checkpoint_file`.

    mmengine 0.10.7 reads with a bare ``torch.load``, which since torch 2.6
    means ``weights_only=True`` without the types its own Runner writes, so
    it refuses the checkpoints it just saved; this loader allows exactly
    those.
    """
    return load_checkpoint_file(filename, map_location)


class CheckpointMismatch(ValueError):
    """A checkpoint's weights do not fit the model it is loaded into."""


def _weights(checkpoint) -> dict:
    """The state dict in a checkpoint, keys as mmengine's Runner loads them
    (``module.`` prefix of a DataParallel model stripped)."""
    state = checkpoint.get('state_dict', checkpoint) \
        if isinstance(checkpoint, dict) else {}
    return {re.sub(r'^module\.', '', k): v for k, v in state.items()
            if isinstance(k, str)}


def check_checkpoint_fits(model: torch.nn.Module, checkpoint,
                          filename: str, examples: int = 3) -> None:
    """Raise :class:`CheckpointMismatch` when ``checkpoint`` lacks weights of
    ``model``, has weights it does not have, or weights of other shapes.

    mmengine loads such a checkpoint with ``strict=False`` and a note in the
    log; a detector evaluated that way reports the AP of a partly random
    model. BatchNorm's ``num_batches_tracked`` counters, which older
    checkpoints lack and inference does not use, are not required.
    """
    have = _weights(checkpoint)
    want = model.state_dict()
    missing = [k for k in want if k not in have and
               not k.endswith('num_batches_tracked')]
    unexpected = [k for k in have if k not in want]
    shapes = [
        f'{k}: checkpoint {tuple(have[k].shape)}, model '
        f'{tuple(want[k].shape)}' for k in want
        if k in have and hasattr(have[k], 'shape') and
        tuple(have[k].shape) != tuple(want[k].shape)
    ]
    lines = []
    if missing:
        lines.append(f'{len(missing)} of the model\'s {len(want)} weights '
                     f'are not in it, e.g. {", ".join(missing[:examples])}')
    if unexpected:
        lines.append(f'{len(unexpected)} of its {len(have)} weights are not '
                     f'in the model, e.g. {", ".join(unexpected[:examples])}')
    if shapes:
        lines.append(f'{len(shapes)} weights have other shapes, e.g. '
                     f'{"; ".join(shapes[:examples])}')
    if lines:
        raise CheckpointMismatch(
            f'The checkpoint {filename} does not fit the model:\n  ' +
            '\n  '.join(lines) + '\n'
            'A checkpoint of another detector, backbone or number of '
            'classes? Evaluated, it would score a partly random model. To '
            'go on anyway, pass --allow-key-mismatch.')
