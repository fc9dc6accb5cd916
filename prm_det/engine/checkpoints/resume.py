"""Which checkpoint ``tools/train.py --resume`` (without a file) resumes
from: the newest one that is whole (:func:`latest_complete_checkpoint`),
whatever a kill left in the work_dir (a file cut short under its real name,
an empty ``last_checkpoint``), saying what it skipped and why."""
import logging
import os
import os.path as osp
import re
import zipfile
from typing import List, Optional

from mmengine.logging import print_log

_STEP_CHECKPOINT = re.compile(r'^(?:epoch|iter)_(\d+)\.pth$')


def checkpoint_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a whole checkpoint, or None when it is.

    torch writes a checkpoint as a zip archive whose directory comes last
    and whose records carry CRC-32s: a file cut short has no directory, a
    damaged one fails its CRC. This reads the file once, unpickling nothing.
    """
    if not osp.isfile(path):
        return 'no such file'
    if osp.getsize(path) == 0:
        return 'empty file'
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f'incomplete: not a whole checkpoint archive ({error})'
    if bad is not None:
        return f'damaged: record {bad} fails its CRC check'
    return None


def _step(path: str) -> Optional[int]:
    match = _STEP_CHECKPOINT.match(osp.basename(path))
    return int(match.group(1)) if match else None


def _newer_than(named: str, steps: List[str]) -> Optional[str]:
    """A whole checkpoint of ``steps`` written after ``named`` and of a
    later step: a training killed after renaming it into place, before
    updating ``last_checkpoint``. (An older leftover of a later step, from
    a training started over, is not newer.)"""
    named_step = _step(named)
    if named_step is None:
        return None
    for path in steps:
        step = _step(path)
        if (step > named_step and osp.getmtime(path) > osp.getmtime(named)
                and checkpoint_problem(path) is None):
            return path
    return None


def latest_complete_checkpoint(work_dir: str) -> Optional[str]:
    """The newest whole checkpoint in ``work_dir``, saying which ones were
    skipped and why; None when there is none.

    Candidates, in order: the file ``last_checkpoint`` names (unless a
    whole checkpoint of a later step was written after it), then the
    ``epoch_N.pth`` / ``iter_N.pth`` files of ``work_dir``, newest first.
    """
    candidates: List[str] = []
    named = None
    pointer = osp.join(work_dir, 'last_checkpoint')
    if osp.isfile(pointer):
        with open(pointer) as f:
            named = f.read().strip()
        if named:
            candidates.append(named)
        else:
            _say(f'--resume: {pointer} is empty (written when the training '
                 f'was killed?); looking for the newest complete checkpoint '
                 f'in {work_dir}')
    steps: List[str] = []
    if osp.isdir(work_dir):
        steps = [osp.join(work_dir, name) for name in os.listdir(work_dir)
                 if _STEP_CHECKPOINT.match(name)]
        steps.sort(reverse=True, key=lambda p: (osp.getmtime(p), _step(p)))
        candidates += steps
    seen = set()
    for path in candidates:
        if osp.abspath(path) in seen:
            continue
        seen.add(osp.abspath(path))
        problem = checkpoint_problem(path)
        if problem is None:
            newer = _newer_than(path, steps) if path == named else None
            if newer is not None:
                _say(f'--resume: {newer} is whole and newer than {path}, '
                     f'which {pointer} names (a training killed between '
                     f'writing the one and updating the other): resuming '
                     f'from {newer}')
                return newer
            return path
        _say(f'--resume: skipped {path}: {problem}')
    return None


def _say(message: str) -> None:
    print_log(message, logger='current', level=logging.WARNING)
