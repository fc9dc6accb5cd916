"""--resume without a file takes the newest whole checkpoint, saying which
ones it skipped and why (in-process; the kill -9 run is in test_kills.py)."""
import os
import os.path as osp

import pytest
import torch
from mmengine.runner.checkpoint import CheckpointLoader

import prm_det.engine.checkpoints.resume as resume
from prm_det.engine.checkpoints.reading import IncompleteCheckpoint
from prm_det.engine.checkpoints.resume import (checkpoint_problem,
                                               latest_complete_checkpoint)


@pytest.fixture
def said(monkeypatch):
    messages = []
    monkeypatch.setattr(resume, "_say", messages.append)
    return messages


def save(path, epoch, mtime):
    torch.save({'meta': {'epoch': epoch}, 'state_dict': {
        'w': torch.arange(4096.)}}, path)
    os.utime(path, (mtime, mtime))
    return str(path)


def test_truncated_newest_and_empty_pointer_are_skipped(tmp_path, said):
    whole = save(tmp_path / 'epoch_1.pth', 1, 1000)
    newest = save(tmp_path / 'epoch_2.pth', 2, 2000)
    with open(newest, 'r+b') as f:
        f.truncate(osp.getsize(newest) // 3)
    os.utime(newest, (2000, 2000))
    (tmp_path / 'last_checkpoint').write_text('')
    assert latest_complete_checkpoint(str(tmp_path)) == whole
    assert said[0].startswith(f'--resume: {tmp_path}/last_checkpoint is '
                              f'empty')
    assert said[1].startswith(f'--resume: skipped {newest}: incomplete')
    assert len(said) == 2


def test_the_pointer_comes_first_and_a_missing_target_is_skipped(tmp_path,
                                                                 said):
    """last_checkpoint names epoch_1 of a training started over; epoch_2 of
    the earlier one, written before it, is not taken."""
    save(tmp_path / 'epoch_2.pth', 2, 1000)
    newer = save(tmp_path / 'epoch_1.pth', 1, 2000)
    (tmp_path / 'last_checkpoint').write_text(newer)
    assert latest_complete_checkpoint(str(tmp_path)) == newer
    assert said == []
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'gone.pth'))
    assert latest_complete_checkpoint(str(tmp_path)) == newer
    assert said == [f'--resume: skipped {tmp_path}/gone.pth: no such file']


def test_a_newer_whole_checkpoint_than_the_pointer_is_taken(tmp_path, said):
    """A kill after epoch_2.pth was renamed into place, before
    last_checkpoint was updated: the pointer names epoch_1, epoch_2 is whole
    and newer. (A truncated newer one is not taken.)"""
    older = save(tmp_path / 'epoch_1.pth', 1, 1000)
    newer = save(tmp_path / 'epoch_2.pth', 2, 2000)
    (tmp_path / 'last_checkpoint').write_text(older)
    assert latest_complete_checkpoint(str(tmp_path)) == newer
    assert said == [f'--resume: {newer} is whole and newer than {older}, '
                    f'which {tmp_path}/last_checkpoint names (a training '
                    f'killed between writing the one and updating the '
                    f'other): resuming from {newer}']
    with open(newer, 'r+b') as f:
        f.truncate(osp.getsize(newer) // 3)
    os.utime(newer, (2000, 2000))
    said.clear()
    assert latest_complete_checkpoint(str(tmp_path)) == older
    assert said == []


def test_a_damaged_record_fails_its_crc(tmp_path):
    path = save(tmp_path / 'epoch_1.pth', 1, 1000)
    with open(path, 'r+b') as f:
        data = bytearray(f.read())
        offset = data.index(torch.arange(4096.).numpy().tobytes()[:64]) + 99
        data[offset] ^= 0xFF
        f.seek(0)
        f.write(data)
    assert 'fails its CRC check' in checkpoint_problem(path)


def test_no_checkpoint_at_all(tmp_path, said):
    assert latest_complete_checkpoint(str(tmp_path)) is None
    assert latest_complete_checkpoint(str(tmp_path / 'absent')) is None


def test_loading_a_truncated_checkpoint_names_it_and_the_way_out(tmp_path):
    path = save(tmp_path / 'epoch_3.pth', 3, 1000)
    with open(path, 'r+b') as f:
        f.truncate(osp.getsize(path) // 6)
    with pytest.raises(IncompleteCheckpoint) as info:
        CheckpointLoader.load_checkpoint(path)
    assert f'The checkpoint {path} is incomplete' in str(info.value)
    assert '--resume without a file' in str(info.value)
