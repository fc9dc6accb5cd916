"""Remote checkpoints run no code either: torchvision://, http(s)://,
open-mmlab://, the hub cache, s3://, petrel:// and pavi:// go through the
same data-only loading and opt-in as local files, and a published
checkpoint's hash is checked, also in the cache (served from a local HTTP
server, object stores by stand-in clients: no network)."""
import functools
import hashlib
import http.server
import os
import os.path as osp
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import OrderedDict

import pytest
import torch
from mmdet.registry import MODELS
from mmengine.runner.checkpoint import CheckpointLoader
from tool_runs import (REPO, RETINA, ok, outside_env, parse_ap_table, run_tool,
                       tiny_options, tool_env)

import prm_det.engine.checkpoints.remote as remote
from prm_det.engine.checkpoints.reading import TRUST_ENV, UntrustedCheckpoint
from prm_det.engine.checkpoints.remote import ChecksumMismatch

TORCHVISION_RESNET18 = 'resnet18-f37072fd.pth'


class RunsCode:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {shlex.quote(self.marker)}', )


def save_evil(path, marker):
    torch.save({'state_dict': OrderedDict(w=torch.zeros(1)),
                'meta': {'note': RunsCode(marker)}}, path)


def hashed_name(path, stem):
    """The file's published name: stem-<first 8 hex of its SHA-256>.pth."""
    with open(path, 'rb') as f:
        return f'{stem}-{hashlib.sha256(f.read()).hexdigest()[:8]}.pth'


@pytest.fixture
def served(tmp_path):
    """A folder served over HTTP on 127.0.0.1; returns (folder, base URL)."""
    folder = tmp_path / 'served'
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """torch's hub cache in tmp_path (TORCH_HOME), no opt-in."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.delenv(TRUST_ENV, raising=False)
    cache = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
    cache.mkdir(parents=True)
    return cache


def test_a_payload_in_the_hub_cache_is_refused(hub, tmp_path):
    """The README's offline advice puts a file in the hub cache: one that is
    not the published file fails the hash check, through CheckpointLoader
    and through a backbone's init_cfg, and runs nothing."""
    marker = str(tmp_path / 'PWNED')
    save_evil(str(hub / TORCHVISION_RESNET18), marker)
    with pytest.raises(ChecksumMismatch) as info:
        CheckpointLoader.load_checkpoint('torchvision://resnet18')
    message = str(info.value)
    assert f'{hub / TORCHVISION_RESNET18} is not the checkpoint published' \
        in message
    assert 'says its SHA-256 starts with f37072fd' in message
    assert 'Delete it to download it again' in message
    backbone = MODELS.build(dict(
        type='PRMResNet', depth=18,
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet18')))
    with pytest.raises(ChecksumMismatch):
        backbone.init_weights()
    assert not osp.exists(marker)


def test_http_checkpoints_load_as_data_with_the_same_opt_in(
        hub, served, tmp_path, monkeypatch):
    folder, base = served
    marker = str(tmp_path / 'PWNED')
    save_evil(str(folder / 'evil.pth'), marker)
    url = f'{base}/evil.pth'
    with pytest.raises(UntrustedCheckpoint) as info:
        CheckpointLoader.load_checkpoint(url)
    message = str(info.value)
    assert (f'Refusing to load the checkpoint {hub / "evil.pth"} (from '
            f'{url})') in message
    assert 'posix.system' in message and '--trust-checkpoint' in message
    assert not osp.exists(marker)
    # the same file through open-mmlab:// (its table maps names to URLs)
    monkeypatch.setattr(remote, 'get_external_models', lambda: {'x': url})
    with pytest.raises(UntrustedCheckpoint):
        CheckpointLoader.load_checkpoint('open-mmlab://x')
    # and mmcls://
    monkeypatch.setattr(remote, 'get_mmcls_models', lambda: {'x': url})
    with pytest.raises(UntrustedCheckpoint):
        CheckpointLoader.load_checkpoint('mmcls://x')
    assert not osp.exists(marker)
    # the opt-in is the same as for local files
    monkeypatch.setenv(TRUST_ENV, '1')
    CheckpointLoader.load_checkpoint(url)
    assert osp.exists(marker)


def test_a_published_checkpoint_is_downloaded_hash_checked_and_loaded(
        hub, served, monkeypatch):
    """A torchvision-style checkpoint whose name carries its hash: it
    downloads into the hub cache and loads through torchvision://; swapped
    for another file in the cache, it is refused."""
    folder, base = served
    weights = OrderedDict(w=torch.arange(6.).reshape(2, 3))
    plain = folder / 'plain.pth'
    torch.save(weights, plain)
    name = hashed_name(plain, 'resnet18')
    shutil.move(plain, folder / name)
    monkeypatch.setattr(remote, 'torchvision_urls',
                        lambda: {'resnet18': f'{base}/{name}'})
    loaded = CheckpointLoader.load_checkpoint('torchvision://resnet18')
    assert torch.equal(loaded['w'], weights['w'])
    assert (hub / name).is_file()
    # a bad download (the server sends another file) is not kept
    torch.save(OrderedDict(w=torch.zeros(1)), folder / name)
    os.remove(hub / name)
    with pytest.raises(ChecksumMismatch, match=(
            f'The file downloaded from {base}/{name} is not the checkpoint '
            f'its name says .*invalid hash value.*; it was not kept')):
        CheckpointLoader.load_checkpoint('torchvision://resnet18')
    assert not (hub / name).exists()
    # the cache is checked on every load
    shutil.copy(folder / name, hub / name)
    with pytest.raises(ChecksumMismatch):
        CheckpointLoader.load_checkpoint('torchvision://resnet18')


@pytest.mark.slow
def test_train_py_refuses_remote_payloads(tiny_data, served, tmp_path):
    """tools/train.py as users run it, the config's backbone starting from
    torchvision://resnet18 with a payload in the hub cache, and from an
    http:// URL serving one (the two side by side): both stop with the
    reason and run nothing."""
    folder, base = served
    marker = str(tmp_path / 'PWNED')
    hub = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
    hub.mkdir(parents=True)
    save_evil(str(hub / TORCHVISION_RESNET18), marker)
    save_evil(str(folder / 'evil.pth'), marker)
    env = tool_env(OMP_NUM_THREADS='1', TORCH_HOME=str(tmp_path /
                                                       'torch_home'))
    env.pop(TRUST_ENV, None)
    procs = {}
    for source in ('torchvision://resnet18', f'{base}/evil.pth'):
        config = tmp_path / f'pretrained{len(procs)}.py'
        config.write_text(
            f'_base_ = {osp.join(REPO, RETINA)!r}\n'
            f'model = dict(backbone=dict(init_cfg=dict(\n'
            f'    _delete_=True, type=\'Pretrained\', checkpoint={source!r})))'
            f'\n')
        procs[source] = subprocess.Popen(
            [sys.executable, osp.join(REPO, 'tools', 'train.py'),
             str(config), '--work-dir', str(tmp_path / str(len(procs)))] +
            tiny_options(tiny_data),
            cwd=str(tmp_path), env=env, text=True, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
    for source, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode != 0, (source, out[-2000:])
        assert 'Traceback' not in err, err[-3000:]
        assert 'Epoch(train)' not in out
        if source.startswith('torchvision'):
            assert f'{hub / TORCHVISION_RESNET18} is not the checkpoint ' \
                'published' in err, err[-2000:]
        else:
            assert f'(from {source}): it contains posix.system' in err, \
                err[-2000:]
    assert not osp.exists(marker)


FAKE_CLIENTS = {
    # mmengine's PetrelBackend: client.Client(...).Get('s3://bucket/key')
    'petrel_client/__init__.py': '',
    'petrel_client/client.py': '''
import os


class Client:
    def __init__(self, conf_path=None, enable_mc=False):
        self.root = os.environ['FAKE_STORE']

    def Get(self, path):  # [cluster:]s3://bucket/key
        cluster, key = path.split('s3://', 1)
        assert cluster in ('', 'cluster1:'), path
        path = os.path.join(self.root, key)
        if not os.path.isfile(path):
            return None
        with open(path, 'rb') as f:
            return f.read()
''',
    # pavi's model cloud: modelcloud.get(path).download(local_file)
    'pavi/__init__.py': '',
    'pavi/modelcloud.py': '''
import os
import shutil


class Model:
    def __init__(self, path):
        self.path = path
        self.name = os.path.basename(path)

    def download(self, local_file):
        shutil.copy(self.path, local_file)


def get(model_path):
    return Model(os.path.join(os.environ['FAKE_STORE'], model_path))
''',
}


@pytest.fixture
def object_store(tmp_path, monkeypatch):
    """Stand-ins for the petrel and pavi clients (not on PyPI) serving the
    folder ``store``; returns (store, folder holding the clients)."""
    clients = tmp_path / 'clients'
    for name, text in FAKE_CLIENTS.items():
        (clients / name).parent.mkdir(parents=True, exist_ok=True)
        (clients / name).write_text(text)
    store = tmp_path / 'store'
    (store / 'bucket').mkdir(parents=True)
    monkeypatch.setenv('FAKE_STORE', str(store))
    monkeypatch.delenv(TRUST_ENV, raising=False)
    monkeypatch.syspath_prepend(str(clients))
    yield store, clients
    for module in ('petrel_client', 'petrel_client.client', 'pavi',
                   'pavi.modelcloud'):
        sys.modules.pop(module, None)


@pytest.mark.parametrize('url', ['s3://bucket/evil.pth',
                                 'petrel://bucket/evil.pth',
                                 'cluster1:s3://bucket/evil.pth',
                                 'pavi://bucket/evil.pth'])
def test_object_store_checkpoints_load_as_data_with_the_same_opt_in(
        url, object_store, tmp_path, monkeypatch):
    """s3://, petrel:// (with or without a cluster) and pavi:// go through
    the data-only load: a payload is refused naming the URL, leaves no
    temporary copy, and runs only with the opt-in; weights load."""
    store, _ = object_store
    marker = str(tmp_path / 'PWNED')
    save_evil(str(store / 'bucket' / 'evil.pth'), marker)
    weights = OrderedDict(w=torch.arange(6.).reshape(2, 3))
    torch.save({'state_dict': weights}, store / 'bucket' / 'good.pth')
    temp = tmp_path / 'temp'
    temp.mkdir()
    monkeypatch.setenv('TMPDIR', str(temp))
    monkeypatch.setattr(tempfile, 'tempdir', None)  # re-read TMPDIR
    with pytest.raises(UntrustedCheckpoint) as info:
        CheckpointLoader.load_checkpoint(url)
    assert str(info.value).startswith(
        f'Refusing to load the checkpoint {url}: it contains posix.system')
    assert not osp.exists(marker) and not list(temp.iterdir())
    loaded = CheckpointLoader.load_checkpoint(url.replace('evil', 'good'))
    assert torch.equal(loaded['state_dict']['w'], weights['w'])
    monkeypatch.setenv(TRUST_ENV, '1')
    CheckpointLoader.load_checkpoint(url)
    assert osp.exists(marker) and not list(temp.iterdir())


def test_a_missing_object_store_checkpoint_is_named(object_store):
    with pytest.raises(FileNotFoundError,
                       match='s3://bucket/none.pth can not be found'):
        CheckpointLoader.load_checkpoint('s3://bucket/none.pth')


@pytest.mark.slow
def test_test_py_evaluates_a_checkpoint_given_by_url(
        tiny_data, object_store, tmp_path, demo_checkpoint):
    """tools/test.py CONFIG s3://bucket/retina.pth, as users run it (from
    outside the repository, the petrel client importable): the weights load
    from the store and the AP table is printed."""
    store, clients = object_store
    shutil.copy(demo_checkpoint, store / 'bucket' / 'retina.pth')
    url = 's3://bucket/retina.pth'
    env = outside_env(PYTHONPATH=str(clients), FAKE_STORE=str(store))
    env.pop(TRUST_ENV, None)
    proc = run_tool(
        [sys.executable, osp.join(REPO, 'tools', 'test.py'),
         osp.join(REPO, RETINA), url, '--work-dir', str(tmp_path / 'work')] +
        tiny_options(tiny_data), cwd=str(tmp_path), env=env)
    output = ok(proc)
    assert f'Load checkpoint from {url}' in output
    assert len(parse_ap_table(output)) == 6
