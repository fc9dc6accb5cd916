"""One training per work_dir: two would share its logs and checkpoints (and
the second crashes late, when the first moves a checkpoint it wrote).

The lock is an OS file lock (``flock``) on ``WORK_DIR/.prm_det.lock``, which
the OS releases when its holder exits or is killed, so no stale lock is ever
left. The file says who holds it, for the refusal.
"""
import datetime
import os
import os.path as osp
import socket
import sys
from typing import Dict, TextIO

try:
    import fcntl
except ImportError:  # not a POSIX system: no lock
    fcntl = None

LOCK_NAME = '.prm_det.lock'
_held: Dict[str, TextIO] = {}


class WorkDirBusy(RuntimeError):
    """Another training holds the work_dir."""


def lock_work_dir(work_dir: str) -> bool:
    """Hold ``work_dir`` for this process until it exits (or
    :func:`unlock_work_dir`); True if taken now, False if this process
    already held it.

    Raises:
        WorkDirBusy: another process holds it; the message names it.
    """
    key = osp.realpath(work_dir)
    if key in _held or fcntl is None:
        return False
    os.makedirs(work_dir, exist_ok=True)
    path = osp.join(work_dir, LOCK_NAME)
    handle = open(path, 'a+')
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or 'a process that has not said'
        handle.close()
        raise WorkDirBusy(
            f'The work_dir {work_dir} is in use by another training: '
            f'{holder}. Two trainings in one work_dir overwrite each '
            f'other\'s logs and checkpoints. Wait for it to end or stop it, '
            f'or give this one another --work-dir.') from None
    handle.seek(0)
    handle.truncate()
    started = datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')
    handle.write(f'process {os.getpid()} on {socket.gethostname()}, '
                 f'started {started}: {" ".join(sys.argv)}\n')
    handle.flush()
    _held[key] = handle
    return True


def work_dir_holder(work_dir: str) -> str:
    """Who holds ``work_dir``, as its lock file says ('' when no one
    wrote it)."""
    try:
        with open(osp.join(work_dir, LOCK_NAME)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ''


def unlock_work_dir(work_dir: str) -> None:
    handle = _held.pop(osp.realpath(work_dir), None)
    if handle is not None:
        handle.seek(0)
        handle.truncate()
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
