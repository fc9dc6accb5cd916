"""Checkpoints that survive a kill at any moment.

mmengine 0.10.7's ``CheckpointHook`` writes ``epoch_N.pth`` in place (a kill
during the write leaves a truncated file under the real name), deletes the
oldest kept checkpoint *before* writing the new one (with
``max_keep_ckpts=1`` a kill during the write leaves no whole checkpoint at
all) and writes ``last_checkpoint`` in place (a kill leaves it empty).
:class:`AtomicCheckpointHook` fixes the order and the writes; the configs in
``configs/`` select it with
``default_hooks = dict(checkpoint=dict(type='AtomicCheckpointHook'))``, and
any config can. What ``tools/train.py --resume`` (without a file) resumes
from: :mod:`.resume`.

Writing the new checkpoint before deleting the old one needs room for two
checkpoints; when the disk fills up, :class:`CheckpointDiskFull` names the
file and the room needed, and the part written is removed. Parts left by a
process killed while writing are removed when the next training in that
work_dir starts (:func:`remove_partials`), under the work_dir lock
(:mod:`prm_det.engine.work_dir_lock`), so never from under a running training.
"""
import errno
import logging
import os
import os.path as osp
import shutil
from typing import List, Optional

import torch
from mmengine.dist import is_main_process
from mmengine.fileio import LocalBackend
from mmengine.hooks import CheckpointHook
from mmengine.logging import print_log
from mmengine.registry import HOOKS

from ..work_dir_lock import lock_work_dir, unlock_work_dir

PARTIAL = '.partial'  # suffix of a checkpoint being written
_EXPIRED = 'atomic_ckpt_expired'  # message hub: the step to delete after


def replace_atomically(src: str, dst: str) -> None:
    """Flush ``src`` to disk, then rename it to ``dst`` (atomic within one
    file system: ``dst`` is the old file or the whole new one, never a
    part)."""
    if osp.isfile(src):
        with open(src, 'rb') as f:
            os.fsync(f.fileno())
    os.replace(src, dst)


class CheckpointDiskFull(OSError):
    """No space left for a checkpoint (the part written is removed)."""


def _megabytes(size: float) -> str:
    return f'{size / 2**20:.0f} MB'


def _state_bytes(runner) -> int:
    """What a checkpoint of ``runner`` holds, in bytes: its model's and
    optimizer's tensors (what a first checkpoint's size is made of)."""
    states = [runner.model.state_dict()]
    optim_wrapper = getattr(runner, 'optim_wrapper', None)
    if optim_wrapper is not None:
        states.append(optim_wrapper.state_dict())

    def count(node) -> int:
        if isinstance(node, torch.Tensor):
            return node.numel() * node.element_size()
        if isinstance(node, dict):
            return sum(count(v) for v in node.values())
        if isinstance(node, (list, tuple)):
            return sum(count(v) for v in node)
        return 0

    return count(states)


def remove_partials(*folders: str) -> List[str]:
    """Delete the ``*.partial`` files in ``folders``: parts of checkpoints
    (and of ``last_checkpoint``) a training was killed, or ran out of
    space, while writing. Only call with the work_dir lock held. Returns
    their paths."""
    removed = []
    for folder in dict.fromkeys(folders):
        if not osp.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = osp.join(folder, name)
            if name.endswith(PARTIAL) and osp.isfile(path):
                os.remove(path)
                removed.append(path)
    if removed:
        print_log(f'removed {len(removed)} part(s) of files a killed or '
                  f'failed training was writing: {", ".join(removed)}',
                  logger='current', level=logging.WARNING)
    return removed


def write_text_atomically(path: str, text: str) -> None:
    partial = path + PARTIAL
    with open(partial, 'w') as f:
        f.write(text)
    replace_atomically(partial, path)


@HOOKS.register_module()
class AtomicCheckpointHook(CheckpointHook):
    """mmengine's ``CheckpointHook`` (every argument and behaviour), with the
    checkpoints of ``interval`` written so that a kill at any moment leaves
    a whole one to resume from:

    * each is written to ``<name>.partial`` and renamed into place once
      complete;
    * ``last_checkpoint`` is written the same way;
    * a checkpoint that falls out of ``max_keep_ckpts`` is deleted only
      after the new one is in place.

    On storage other than the local file system (object stores put whole
    objects) it is mmengine's hook unchanged. ``save_best`` checkpoints are
    written by mmengine as before: losing one loses no training.

    Example:
        >>> default_hooks = dict(checkpoint=dict(
        ...     type='AtomicCheckpointHook', interval=1, max_keep_ckpts=1))
    """

    def _local(self) -> bool:
        backend = getattr(self.file_backend, 'client', self.file_backend)
        return isinstance(backend, LocalBackend)

    def _save_checkpoint_with_step(self, runner, step, meta):
        # rewrites mmengine's method of the name (pinned by its hash in
        # tests/test_private_apis.py, which fails when mmengine changes it)
        if not self._local():
            return super()._save_checkpoint_with_step(runner, step, meta)
        # the same bookkeeping as mmengine's, but the expired checkpoint is
        # only remembered here and deleted at the end
        expired = None
        if self.max_keep_ckpts > 0 and not (self.keep_ckpt_ids and
                                            self.keep_ckpt_ids[-1] == step):
            if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                expired = self.keep_ckpt_ids.popleft()
            self.keep_ckpt_ids.append(step)
            runner.message_hub.update_info('keep_ckpt_ids',
                                           list(self.keep_ckpt_ids))

        ckpt_filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir,
                                                     ckpt_filename)
        runner.message_hub.update_info('last_ckpt', self.last_ckpt)
        # a kill after the rename, before the deletion: the resumed run
        # deletes it (before_train)
        runner.message_hub.update_info(
            _EXPIRED, None if expired == step else expired)
        try:
            runner.save_checkpoint(
                self.out_dir,
                ckpt_filename + PARTIAL,
                self.file_client_args,
                save_optimizer=self.save_optimizer,
                save_param_scheduler=self.save_param_scheduler,
                meta=meta,
                by_epoch=self.by_epoch,
                backend_args=self.backend_args,
                **self.args)
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise self._disk_full(runner, self.last_ckpt + PARTIAL, error,
                                  expired) from None
        if not is_main_process():  # the Runner saves on the main process
            return
        replace_atomically(self.last_ckpt + PARTIAL, self.last_ckpt)
        write_text_atomically(
            osp.join(runner.work_dir, 'last_checkpoint'), self.last_ckpt)
        if expired is not None and expired != step:
            self._delete_step(expired)

    def _delete_step(self, step: int) -> None:
        old = osp.join(self.out_dir, self.filename_tmpl.format(step))
        if osp.isdir(old):  # deepspeed saves directories
            shutil.rmtree(old)
        elif osp.isfile(old):
            os.remove(old)

    def _disk_full(self, runner, partial: str, error: OSError,
                   expired: Optional[int]) -> CheckpointDiskFull:
        """Remove the part written; say where, and the room needed."""
        if osp.isfile(partial):
            os.remove(partial)
        kept = [osp.join(self.out_dir, self.filename_tmpl.format(s))
                for s in [*self.keep_ckpt_ids, expired] if s is not None]
        sizes = [osp.getsize(p) for p in kept if osp.isfile(p)]
        size = max(sizes) if sizes else _state_bytes(runner)
        each = (f'about {_megabytes(size)} each, so about '
                f'{_megabytes(2 * size)}')
        free = shutil.disk_usage(self.out_dir).free
        full = CheckpointDiskFull(
            f'No space left on the device to write the checkpoint {partial} '
            f'({_megabytes(free)} free in {self.out_dir}; the part written '
            f'is removed). A checkpoint is written whole before the one it '
            f'replaces is deleted, so the disk needs room for two '
            f'checkpoints: {each}. Free some space, then go on with '
            f'--resume.')
        full.errno = error.errno
        return full

    def before_train(self, runner) -> None:
        """mmengine's; then the work_dir is held (one training at a time;
        tools/train.py takes it before the Runner already; evaluations do
        not take it) and, on a resumed training, the deletion the killed
        one did not get to is done, and the parts killed writes left are
        removed."""
        super().before_train(runner)
        self._locked = is_main_process() and lock_work_dir(runner.work_dir)
        if not (self._local() and is_main_process()):
            return
        expired = runner.message_hub.get_info(_EXPIRED)
        if (self.max_keep_ckpts > 0 and expired is not None
                and expired not in self.keep_ckpt_ids):
            self._delete_step(expired)
        remove_partials(self.out_dir, runner.work_dir)

    def after_train(self, runner) -> None:
        super().after_train(runner)
        if getattr(self, '_locked', False):
            unlock_work_dir(runner.work_dir)
