"""Checkpoint loading: every checkpoint prm_det or its configs load, local
or remote, loads as data, never as code.

**Data only.** mmengine reads a checkpoint with ``torch.load``, i.e. with
pickle, which can run any code a file carries. Here every checkpoint loads
with ``weights_only=True``: tensors, plain containers and numbers, numpy's
scalars, dtypes and arrays of them (:func:`numpy_data_globals`), plus exactly
the types mmengine's Runner writes (:func:`runner_checkpoint_globals`: the
message hub's ``HistoryBuffer``). Anything else is refused with
:class:`UntrustedCheckpoint`, which names the file, what it holds that is
not allowed, and the opt-in for files the user trusts: ``--trust-checkpoint``
on ``tools/train.py``, ``tools/test.py``, ``vis_prm.py`` and
``export_onnx.py``, or ``PRM_DET_TRUST_CHECKPOINTS=1`` in the environment
(every tool, the model converter included). Nothing is trusted by default.
A file that is not a checkpoint at all, or is damaged, is named and said to
be so (:class:`NotACheckpoint`, :class:`IncompleteCheckpoint`).

**Remote files.** mmengine's ``http(s)://``, ``torchvision://``,
``open-mmlab://`` and ``mmcls://`` schemes download into torch's hub cache
and unpickle the file with ``weights_only=False`` (torch.hub's default),
whatever it holds. Here they are taken over: the file is downloaded into the
same cache (``~/.cache/torch/hub/checkpoints/``), its SHA-256 checked
against the prefix in its name where it has one (``resnet50-0676ba61.pth``:
torch's and OpenMMLab's published checkpoints), also when it is already in
the cache, and it is loaded as data like a local file.

These loaders take over mmengine's schemes only when
:func:`~prm_det.engine.checkpoints.safe_loading.install_safe_loading` is called (our
tools do; a config does by naming ``prm_det.safe_loading`` in
``custom_imports``); importing prm_det changes none of them.

**torchvision://**. mmdet's configs start ResNet backbones from
``torchvision://resnet50``, which mmengine resolves by importing torchvision
to look up the URL. torchvision has no CPU build here and a detector does not
need it: the URLs are the ones mmengine ships in
``mmengine/hub/torchvision_0.12.json``; when the download fails, the error
says how to use a local file instead.
"""
import os
import os.path as osp
import pickle
import re
import zipfile
from typing import List, Optional

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

from ...private_apis import history_buffer_statistics

TRUST_ENV = 'PRM_DET_TRUST_CHECKPOINTS'
TRUST_HINT = (f'--trust-checkpoint (tools/train.py, tools/test.py, '
              f'vis_prm.py, export_onnx.py) or {TRUST_ENV}=1 in the '
              f'environment')


class UntrustedCheckpoint(pickle.UnpicklingError):
    """A checkpoint holds objects outside the allow-list; unpickling them
    could run code."""


class UnusableCheckpoint(RuntimeError):
    """A checkpoint file cannot be read: cut short, damaged, or not a
    checkpoint at all."""


class IncompleteCheckpoint(UnusableCheckpoint):
    """A checkpoint file is truncated or otherwise not a whole archive."""


class NotACheckpoint(UnusableCheckpoint):
    """A file is neither of the formats ``torch.save`` writes."""


def checkpoints_trusted() -> bool:
    """Whether the user opted in to full unpickling (``--trust-checkpoint``
    on the tools sets ``PRM_DET_TRUST_CHECKPOINTS=1``)."""
    return os.environ.get(TRUST_ENV, '').lower() in ('1', 'true', 'yes')


def _history_buffer_statistic(owner, name: str):
    """``getattr`` for the allow-list, limited to what mmengine pickles with
    it: a statistics method of ``HistoryBuffer`` (``min``, ``max``,
    ``current``, ``mean`` or one registered with ``register_statistics``)."""
    statistics = {'min', 'max', 'current', 'mean'}  # _set_default_statistics
    statistics.update(history_buffer_statistics())
    if owner is not HistoryBuffer or name not in statistics:
        raise pickle.UnpicklingError(
            f'getattr({owner!r}, {name!r}): the allow-list admits getattr '
            f'only for HistoryBuffer\'s statistics methods')
    return getattr(owner, name)


def _multiarray():
    """numpy's multiarray module, and the name numpy of the other major
    version writes for it (numpy 1.x ``numpy.core.multiarray``, numpy 2
    ``numpy._core.multiarray``)."""
    multiarray = np._core.multiarray if hasattr(np, '_core') \
        else np.core.multiarray
    other = ('numpy.core.multiarray' if multiarray.__name__ ==
             'numpy._core.multiarray' else 'numpy._core.multiarray')
    return multiarray, other


def runner_checkpoint_globals() -> list:
    """What mmengine's Runner writes into a checkpoint besides tensors,
    plain containers and numbers (found by saving one from a real training
    and loading it with ``weights_only=True``; each entry is needed, see
    ``tests/test_tools/test_checkpoint_safety.py``). All of it is the message
    hub's ``HistoryBuffer`` objects:

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
    multiarray, other = _multiarray()
    return [
        HistoryBuffer, np.ndarray, np.dtype, type(np.dtype(np.float64)),
        type(np.dtype(np.int64)), multiarray._reconstruct, multiarray.scalar,
        (multiarray._reconstruct, f'{other}._reconstruct'),
        (multiarray.scalar, f'{other}.scalar'),
        (_history_buffer_statistic, 'builtins.getattr')
    ]


# numpy's data types: numbers, booleans, strings, bytes, dates and time
# spans (not ``object``, whose arrays hold arbitrary Python objects)
NUMPY_DATA_TYPES = (
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
    np.uint32, np.uint64, np.float16, np.float32, np.float64, np.longdouble,
    np.complex64, np.complex128, np.clongdouble, np.str_, np.bytes_,
    np.datetime64, np.timedelta64)


def numpy_data_globals() -> list:
    """numpy scalars and arrays of :data:`NUMPY_DATA_TYPES` (a user's hook
    writing ``np.float32(0.5)`` into ``meta``): numpy 2 pickles each dtype by
    its class (``numpy.dtypes.Float32DType``), numpy 1.x as ``numpy.dtype``.
    These rebuild values from bytes and run no code."""
    multiarray, _ = _multiarray()
    dtype_classes = {type(np.dtype(t)) for t in NUMPY_DATA_TYPES}
    return [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar
            ] + sorted(dtype_classes, key=lambda c: c.__name__)


def allowed_globals() -> list:
    """Everything a checkpoint may hold besides tensors, plain containers
    and numbers."""
    return runner_checkpoint_globals() + numpy_data_globals()


def _disallowed_globals(filename: str, error: Exception) -> List[str]:
    """The globals in ``filename`` that the allow-list refuses, read without
    running the pickle (torch disassembles it); for the old non-zip format,
    the one torch's error names."""
    try:
        with torch.serialization.safe_globals(allowed_globals()):
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


# torch.save's legacy (pre-1.6) format starts with this number, pickled
_LEGACY_MAGIC = (0x1950a86a20f9469cfc6c).to_bytes(10, 'little')


def local_file_missing(filename: str) -> bool:
    """Whether ``filename`` names a file on this machine that is not there.
    A URL (``http(s)://``, ``s3://``, ``torchvision://``, ...) is not
    missing: its scheme's loader fetches it and says what went wrong."""
    return '://' not in filename and not osp.isfile(osp.expanduser(filename))


def file_format(filename: str) -> str:
    """What ``filename`` is, from its first bytes: ``'zip'`` (torch.save
    since 1.6), ``'legacy'`` (torch.save before it), ``'empty'``,
    ``'pickle'`` (pickle.dump, not torch.save) or ``'other'``."""
    with open(filename, 'rb') as f:
        head = f.read(512)
    if not head:
        return 'empty'
    if head.startswith(b'PK\x03\x04'):
        return 'zip'
    if head[:1] == b'\x80' and _LEGACY_MAGIC in head[:32]:
        return 'legacy'
    if head[257:262] == b'ustar':  # torch's oldest (tar) format
        return 'legacy'
    if head[:1] == b'\x80':
        return 'pickle'
    return 'other'


def _not_a_checkpoint(filename: str, kind: str) -> NotACheckpoint:
    if kind == 'pickle':
        what = ('a plain pickle (written by pickle.dump, not torch.save); '
                'if you trust it, load it with pickle and save it again '
                'with torch.save')
    else:
        with open(filename, 'rb') as f:
            head = f.read(8)
        what = (f'its first bytes are {head!r}; a torch.save checkpoint '
                f'starts with b\'PK\\x03\\x04\' (a zip archive) or, from '
                f'torch before 1.6, a pickled magic number. The wrong file?')
    return NotACheckpoint(
        f'{filename} is not a PyTorch checkpoint: {what}')


def load_checkpoint_file(filename: str,
                         map_location=None,
                         trust: Optional[bool] = None,
                         name: Optional[str] = None):
    """``torch.load`` of a local checkpoint as data: ``weights_only=True``
    with :func:`allowed_globals` allowed, unless ``trust`` (by default:
    :func:`checkpoints_trusted`). ``name``: how the messages name the file
    (default: its path), e.g. with the URL it was downloaded from.

    Raises:
        FileNotFoundError: no such file.
        UntrustedCheckpoint: the file holds objects outside the allow-list.
        IncompleteCheckpoint: the file is cut short (a kill while writing)
            or damaged.
        NotACheckpoint: the file is not in a format torch.save writes.
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    if trust is None:
        trust = checkpoints_trusted()
    named = filename if name is None else name
    kind = file_format(filename)
    if kind == 'empty':
        raise IncompleteCheckpoint(
            f'The checkpoint {named} is empty (0 bytes): a training killed '
            f'while writing it, or a download that failed, leaves such a '
            f'file. Use an earlier checkpoint, or --resume without a file '
            f'to take the newest complete one.')
    if kind in ('pickle', 'other'):
        raise _not_a_checkpoint(named, kind)
    try:
        if trust:
            return torch.load(filename, map_location=map_location,
                              weights_only=False)
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(filename, map_location=map_location,
                              weights_only=True)
    except pickle.UnpicklingError as error:
        if trust or _is_truncated(error):
            raise
        found = ', '.join(_disallowed_globals(filename, error))
        raise UntrustedCheckpoint(
            f'Refusing to load the checkpoint {named}: it contains '
            f'{found}, which is not a tensor, a plain container, a numpy '
            f'value or one of the types mmengine\'s Runner writes, and '
            f'unpickling it could run code. If you trust this file, allow '
            f'it with {TRUST_HINT}.') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as error:
        if _is_truncated(error):
            raise IncompleteCheckpoint(
                f'The checkpoint {named} is incomplete ({error}); a '
                f'training killed while writing it leaves such a file. Use '
                f'an earlier checkpoint, or --resume without a file to take '
                f'the newest complete one.') from error
        if kind == 'zip' and 'record size' in str(error):
            raise IncompleteCheckpoint(
                f'The checkpoint {named} is damaged: a tensor it declares '
                f'does not match the data stored for it ({error}). Use '
                f'another copy or an earlier checkpoint.') from None
        raise


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
