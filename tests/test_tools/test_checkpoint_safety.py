"""Loading a checkpoint runs no code: every route a user loads one through
refuses a pickle that would, naming the file, what it holds and the opt-in;
what mmengine's Runner writes, official PRM and torchvision checkpoints
still load."""
import os
import os.path as osp
import pickle
import shlex
import subprocess
import sys
import textwrap
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
from mmdet.registry import MODELS
from mmengine.runner.checkpoint import CheckpointLoader
from tool_runs import (REPO, RETINA, outside_env, tiny_options, tool_env,
                       tool_module)

from prm_det.engine.checkpoints.reading import (TRUST_ENV, IncompleteCheckpoint,
                                       NotACheckpoint, UntrustedCheckpoint,
                                       load_checkpoint_file,
                                       runner_checkpoint_globals)


class RunsCode:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {shlex.quote(self.marker)}', )


@pytest.fixture
def evil(tmp_path):
    """A checkpoint that looks like a detector's, with a payload in meta;
    returns (its path, the file its unpickling would create)."""
    marker = str(tmp_path / 'PWNED')
    path = str(tmp_path / 'evil.pth')
    torch.save({'meta': {'epoch': 1, 'note': RunsCode(marker)},
                'state_dict': OrderedDict(w=torch.zeros(1))}, path)
    return path, marker


def assert_refused(message, path):
    assert f'Refusing to load the checkpoint {path}' in message
    assert 'posix.system' in message  # what it holds that is not allowed
    assert '--trust-checkpoint' in message and f'{TRUST_ENV}=1' in message


def test_the_payload_is_real_and_the_opt_in_runs_it(evil, monkeypatch):
    """The opt-in loads with full pickle: the payload runs, so the refusals
    below are the loader's doing, not a dud file."""
    path, marker = evil
    monkeypatch.setenv(TRUST_ENV, '1')
    CheckpointLoader.load_checkpoint(path)
    assert osp.exists(marker)


@pytest.mark.parametrize('tool', ['train', 'test'])
def test_trust_checkpoint_is_the_tools_opt_in(tool, evil, monkeypatch):
    path, marker = evil
    # parse_args sets both; monkeypatch restores them after the test
    monkeypatch.setenv(TRUST_ENV, '0')
    monkeypatch.setenv('LOCAL_RANK', '0')
    module = tool_module(f'{tool}.py')
    module.parse_args([RETINA] + [path] * (tool == 'test'))
    with pytest.raises(UntrustedCheckpoint):
        CheckpointLoader.load_checkpoint(path)
    module.parse_args([RETINA] + [path] * (tool == 'test') +
                      ['--trust-checkpoint'])
    CheckpointLoader.load_checkpoint(path)
    assert osp.exists(marker)


def test_safe_loading_trusts_nothing(evil, monkeypatch):
    """Route 1: mmengine's CheckpointLoader, with prm_det's safe loading
    installed (conftest does, as the tools and our configs do)."""
    path, marker = evil
    monkeypatch.delenv(TRUST_ENV, raising=False)
    with pytest.raises(UntrustedCheckpoint) as info:
        CheckpointLoader.load_checkpoint(path)
    assert_refused(str(info.value), path)
    assert not osp.exists(marker)


SCHEMES = (
    'from mmengine.runner.checkpoint import CheckpointLoader as L; '
    'schemes = lambda: {k: f"{v.__module__}.{v.__name__}" '
    'for k, v in L._schemes.items()}; ')


def run_python(code, tmp_path):
    """``code`` in a fresh interpreter started in ``tmp_path``."""
    env = {k: v for k, v in os.environ.items() if k != TRUST_ENV}
    return subprocess.run([sys.executable, '-c', code], cwd=str(tmp_path),
                          env=dict(env, PYTHONPATH=REPO),
                          capture_output=True, text=True, timeout=300)


def test_importing_prm_det_changes_none_of_mmengines_loaders(tmp_path):
    proc = run_python(
        SCHEMES + 'before = schemes(); import prm_det, prm_det.engine, '
        'prm_det.models, prm_det.ops; assert schemes() == before, '
        '(before, schemes()); '
        'from prm_det.engine import install_safe_loading; '
        'install_safe_loading(); after = schemes(); '
        'print(sorted(k for k in after if after[k] != before[k]))',
        tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the call replaces every scheme mmengine loads a file or URL through
    assert proc.stdout.split('\n')[-2] == str(sorted([
        '', 'http://', 'https://', 'torchvision://', 'modelzoo://',
        'open-mmlab://', 'openmmlab://', 'mmcls://', r'(\S+\:)?s3://',
        r'(\S+\:)?petrel://', 'pavi://']))


def test_our_configs_switch_safe_loading_on_for_any_tool(evil, tmp_path):
    """mmdet's own tools read a config with ``Config.fromfile``, which
    imports its ``custom_imports``: ours name prm_det.safe_loading, so the
    payload is refused there too."""
    path, marker = evil
    proc = run_python(
        'from mmengine.config import Config; '
        'from mmengine.runner.checkpoint import CheckpointLoader; '
        f'Config.fromfile({osp.join(REPO, RETINA)!r}); '
        f'CheckpointLoader.load_checkpoint({path!r})', tmp_path)
    assert proc.returncode != 0
    assert 'UntrustedCheckpoint' in proc.stderr
    assert_refused(proc.stderr, path)
    assert not osp.exists(marker)


def test_backbone_init_cfg_refuses_the_payload(evil, monkeypatch):
    """Route 2: init_cfg=dict(type='Pretrained', checkpoint=...)."""
    path, marker = evil
    monkeypatch.delenv(TRUST_ENV, raising=False)
    backbone = MODELS.build(dict(
        type='PRMResNet', depth=18,
        init_cfg=dict(type='Pretrained', checkpoint=path)))
    with pytest.raises(UntrustedCheckpoint) as info:
        backbone.init_weights()
    assert_refused(str(info.value), path)
    assert not osp.exists(marker)


@pytest.mark.slow
def test_the_tools_refuse_the_payload(evil, tiny_data, tmp_path):
    """Routes 3-5: tools/test.py CONFIG evil.pth, tools/train.py --resume
    evil.pth and --cfg-options load_from=evil.pth (run side by side)."""
    path, marker = evil
    env = tool_env(OMP_NUM_THREADS='1')  # three at once on two cores
    env.pop(TRUST_ENV, None)
    options = tiny_options(tiny_data)
    runs = {
        'test.py': ['tools/test.py', RETINA, path],
        'train.py --resume': ['tools/train.py', RETINA, '--resume', path],
        'train.py load_from=': ['tools/train.py', RETINA] + options[:1] +
        [f'load_from={path}'] + options[1:],
    }
    procs = {}
    for name, args in runs.items():
        extra = [] if name.endswith('load_from=') else options
        procs[name] = subprocess.Popen(
            [sys.executable] + args + ['--work-dir', str(tmp_path / name)] +
            extra, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode != 0, (name, out[-2000:])
        assert_refused(err, path)
        assert 'Traceback' not in err, (name, err[-2000:])
        assert 'COCO box AP' not in out
    assert not osp.exists(marker)


def other_tool_runs(path, folder):
    """The tools besides train.py and test.py that load a checkpoint, each
    on ``path``, as a user runs them from ``folder``: (command line, what
    it would write)."""
    import cv2
    cv2.imwrite(str(folder / 'image.png'), np.full((64, 80, 3), 90,
                                                    np.uint8))
    config = osp.join(REPO, RETINA)
    return {
        'vis_prm.py': ([osp.join('analysis_tools', 'vis_prm.py'), config,
                        path, 'image.png', '--out-dir', 'vis'], 'vis'),
        'export_onnx.py': ([osp.join('deployment', 'export_onnx.py'), config,
                            path, '--shape', '64', '64', '--out',
                            'x.onnx'], 'x.onnx'),
        'seresnet2prm_det.py': ([osp.join('model_converters',
                                          'seresnet2prm_det.py'), path,
                                 'converted.pth'], 'converted.pth'),
    }


@pytest.mark.slow
def test_the_other_tools_refuse_the_payload_in_one_error_line(
        evil, tmp_path):
    """vis_prm.py, export_onnx.py and the SE-ResNet converter, run from a
    folder outside the checkout (no PYTHONPATH, side by side): one
    ``error:`` line naming the file, what it holds and the opt-in, no
    traceback, a non-zero exit, nothing run and nothing written."""
    path, marker = evil
    user = tmp_path / 'user'
    user.mkdir()
    env = outside_env(OMP_NUM_THREADS='1')  # three at once on two cores
    env.pop(TRUST_ENV, None)
    procs = {}
    for name, (args, _) in other_tool_runs(path, user).items():
        procs[name] = subprocess.Popen(
            [sys.executable, osp.join(REPO, 'tools', args[0])] + args[1:],
            cwd=str(user), env=env, text=True, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode != 0, (name, out[-2000:])
        assert 'Traceback' not in err, (name, err[-3000:])
        errors = [line for line in err.splitlines() if 'error:' in line]
        assert len(errors) == 1, (name, err[-3000:])
        assert errors[0].startswith(('error: ', '[vis_prm] error: ',
                                     '[convert] error: ')), errors
        assert_refused(errors[0], path)
    for name, (_, written) in other_tool_runs(path, user).items():
        assert not osp.exists(user / written), name
    assert not osp.exists(marker)


@pytest.mark.parametrize('tool, args', [
    ('analysis_tools/vis_prm.py', ['image.png', '--out-dir', 'vis']),
    ('deployment/export_onnx.py', ['--shape', '64', '64', '--out', 'x.onnx']),
])
def test_trust_checkpoint_is_the_opt_in_of_vis_prm_and_export_onnx(
        tool, args, evil, monkeypatch):
    path, marker = evil
    monkeypatch.setenv(TRUST_ENV, '0')  # restored after the test
    module = tool_module(tool)
    module.parse_args([RETINA, path] + args)
    with pytest.raises(UntrustedCheckpoint) as info:
        CheckpointLoader.load_checkpoint(path)
    assert osp.basename(tool) in str(info.value)  # the message names it
    module.parse_args([RETINA, path] + args + ['--trust-checkpoint'])
    CheckpointLoader.load_checkpoint(path)
    assert osp.exists(marker)


@pytest.fixture(scope='module')
def runner_checkpoint(tmp_path_factory):
    """A checkpoint written by mmengine's Runner (message hub, optimizer,
    schedulers), from a 2-epoch training of a toy model in a subprocess."""
    work = tmp_path_factory.mktemp('runner')
    script = textwrap.dedent(f'''
        import torch
        from mmengine.model import BaseModel
        from mmengine.runner import Runner

        class Toy(BaseModel):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(2, 1)

            def forward(self, x, y, mode='loss'):
                return dict(loss=((self.fc(x) - y) ** 2).mean())

        data = [dict(x=torch.rand(2), y=torch.rand(1)) for _ in range(8)]
        Runner(model=Toy(), work_dir={str(work)!r},
               train_dataloader=dict(
                   dataset=data, batch_size=4,
                   sampler=dict(type='DefaultSampler'),
                   collate_fn=dict(type='default_collate')),
               optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.01)),
               param_scheduler=dict(type='MultiStepLR', milestones=[1]),
               train_cfg=dict(by_epoch=True, max_epochs=2),
               default_hooks=dict(checkpoint=dict(type='CheckpointHook',
                                                  interval=1))).train()
    ''')
    proc = subprocess.run([sys.executable, '-c', script], cwd=str(work),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(work / 'epoch_2.pth')


def name(entry):
    return entry[1] if isinstance(entry, tuple) else \
        f'{entry.__module__}.{entry.__qualname__}'


def test_runner_checkpoints_load_through_exactly_the_allow_list(
        runner_checkpoint):
    # torch alone refuses what mmengine writes ...
    with pytest.raises(pickle.UnpicklingError):
        torch.load(runner_checkpoint, weights_only=True)
    # ... the allow-list admits it ...
    checkpoint = load_checkpoint_file(runner_checkpoint, trust=False)
    assert checkpoint['meta']['epoch'] == 2
    assert checkpoint['message_hub']['log_scalars']['train/loss'].mean() > 0
    assert checkpoint['optimizer']['state'] and checkpoint['param_schedulers']
    # ... and needs every entry but the other numpy's spelling of two names
    allowed = runner_checkpoint_globals()
    other_numpy = [entry for entry in allowed if isinstance(entry, tuple)
                   and name(entry).startswith('numpy.')]
    assert {name(e).rsplit('.', 1)[1] for e in other_numpy} == {
        '_reconstruct', 'scalar'}
    for entry in allowed:
        if entry in other_numpy:
            continue
        fewer = [e for e in allowed if e is not entry]
        with torch.serialization.safe_globals(fewer):
            with pytest.raises(pickle.UnpicklingError):
                torch.load(runner_checkpoint, weights_only=True)


def test_official_prm_and_torchvision_formats_load(tmp_path):
    """The official PRM code's ImageNet checkpoint (DataParallel prefix,
    optimizer, torch's legacy non-zip format of 2020) and a torchvision
    state dict load as data."""
    model = MODELS.build(dict(type='PRMResNet', depth=18))
    state = OrderedDict(
        ('module.' + k, v) for k, v in model.state_dict().items())
    official = str(tmp_path / 'prm_resnet18.pth.tar')
    torch.save({'epoch': 100, 'arch': 'prm_resnet18', 'state_dict': state,
                'best_prec1': 70.1, 'optimizer': torch.optim.SGD(
                    model.parameters(), lr=0.1, momentum=0.9).state_dict()},
               official, _use_new_zipfile_serialization=False)
    torchvision = str(tmp_path / 'resnet18-f37072fd.pth')
    torch.save(model.state_dict(), torchvision)
    loaded = CheckpointLoader.load_checkpoint(official)
    assert loaded['arch'] == 'prm_resnet18'
    assert loaded['state_dict'].keys() == state.keys()
    assert CheckpointLoader.load_checkpoint(torchvision).keys() == \
        model.state_dict().keys()


NUMPY_VALUES = {
    'float32': np.float32(0.5), 'float16': np.float16(1.5),
    'float64': np.float64(2.5), 'int8': np.int8(-3), 'int16': np.int16(-4),
    'int32': np.int32(5), 'int64': np.int64(6), 'uint8': np.uint8(7),
    'uint16': np.uint16(8), 'uint32': np.uint32(9), 'uint64': np.uint64(10),
    'bool_': np.bool_(True), 'complex64': np.complex64(1 + 2j),
    'complex128': np.complex128(3 - 4j), 'str_': np.str_('epoch'),
    'bytes_': np.bytes_(b'raw'), 'datetime64': np.datetime64('2026-11-29'),
    'timedelta64': np.timedelta64(3, 'h'),
}


@pytest.mark.parametrize('kind', sorted(NUMPY_VALUES))
def test_numpy_values_in_meta_load_as_data(kind, tmp_path, monkeypatch):
    """A user's hook writes numpy scalars and arrays into the checkpoint's
    meta: they load without the opt-in, equal to what was saved."""
    monkeypatch.delenv(TRUST_ENV, raising=False)
    value = NUMPY_VALUES[kind]
    array = np.array([value, value])
    path = str(tmp_path / f'{kind}.pth')
    torch.save({'meta': {'scalar': value, 'array': array,
                         'grid': np.stack([array, array])},
                'state_dict': OrderedDict(w=torch.zeros(1))}, path)
    meta = CheckpointLoader.load_checkpoint(path)['meta']
    assert type(meta['scalar']) is type(value) and meta['scalar'] == value
    assert meta['array'].dtype == array.dtype
    np.testing.assert_array_equal(meta['array'], array)
    assert meta['grid'].shape == (2, 2)


def test_numpy_arrays_of_python_objects_are_refused(tmp_path, monkeypatch):
    """An object array holds pickled objects of any kind: not data."""
    monkeypatch.delenv(TRUST_ENV, raising=False)
    path = str(tmp_path / 'objects.pth')
    torch.save({'meta': {'a': np.array([{'k': 1}, None], dtype=object)}},
               path)
    with pytest.raises(UntrustedCheckpoint, match='ObjectDType'):
        CheckpointLoader.load_checkpoint(path)


def rewrite_zip(src, dst, edit):
    """Copy the zip archive src to dst with edit(name, data) -> data."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, 'w') as zout:
        for name in zin.namelist():
            zout.writestr(name, edit(name, zin.read(name)))


def test_unreadable_files_get_their_own_clear_errors(tmp_path, monkeypatch):
    """A damaged archive (a tensor declared larger than its data), random
    bytes and a plain pickle: each named and said for what it is, none
    taken for an attack; the opt-in does not change that."""
    monkeypatch.delenv(TRUST_ENV, raising=False)
    good = str(tmp_path / 'good.pth')
    torch.save({'state_dict': OrderedDict(w=torch.zeros(1000))}, good)
    damaged = str(tmp_path / 'damaged.pth')
    rewrite_zip(good, damaged, lambda name, data: data[:8]
                if name.endswith('/data/0') else data)
    random_file = str(tmp_path / 'random.pth')
    with open(random_file, 'wb') as f:
        f.write(np.random.default_rng(0).bytes(4096))
    raw_pickle = str(tmp_path / 'raw.pkl')
    with open(raw_pickle, 'wb') as f:
        pickle.dump({'state_dict': {'w': [0.0] * 8}}, f)
    for trust in ('0', '1'):
        monkeypatch.setenv(TRUST_ENV, trust)
        with pytest.raises(IncompleteCheckpoint) as info:
            CheckpointLoader.load_checkpoint(damaged)
        assert str(info.value).startswith(
            f'The checkpoint {damaged} is damaged: a tensor it declares does '
            f'not match the data stored for it (record size (8 bytes) does '
            f'not match expected size (4000 bytes')
        with pytest.raises(NotACheckpoint) as info:
            CheckpointLoader.load_checkpoint(random_file)
        assert str(info.value).startswith(
            f'{random_file} is not a PyTorch checkpoint: its first bytes '
            f'are ')
        with pytest.raises(NotACheckpoint) as info:
            CheckpointLoader.load_checkpoint(raw_pickle)
        assert str(info.value).startswith(
            f'{raw_pickle} is not a PyTorch checkpoint: a plain pickle '
            f'(written by pickle.dump, not torch.save)')


@pytest.mark.slow
def test_test_py_names_a_file_that_is_not_a_checkpoint(tiny_data, tmp_path):
    random_file = str(tmp_path / 'random.pth')
    with open(random_file, 'wb') as f:
        f.write(np.random.default_rng(0).bytes(4096))
    proc = subprocess.run(
        [sys.executable, osp.join(REPO, 'tools', 'test.py'),
         osp.join(REPO, RETINA), random_file, '--work-dir',
         str(tmp_path / 'work')] + tiny_options(tiny_data),
        cwd=str(tmp_path), env=tool_env(), capture_output=True, text=True,
        timeout=300)
    assert proc.returncode != 0
    assert f'error: {random_file} is not a PyTorch checkpoint' in \
        proc.stderr, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr
    assert 'could run code' not in proc.stderr
