"""The PRM CPU kernel's first-use build: it says what it does, a kill
during it blocks nothing after, and each source and toolchain has its own
build directory (subprocesses, a fresh extension cache each)."""
import os
import os.path as osp
import shutil
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time
import zipfile

import pytest
from helpers import REPO

from prm_det.ops.backends import cpu

USE_KERNEL = ('import torch; from prm_det.ops.backends import cpu; '
              'assert cpu.available(), cpu.unavailable_reason()')


# The newest torch whose headers compile as C++17 (2.14's use concepts and
# operator<=>); pip takes it from the local wheel directory on this machine.
CXX17_TORCH = '2.13.0'


def env_with(cache, **extra):
    return dict(os.environ, PYTHONPATH=REPO, TORCH_EXTENSIONS_DIR=cache,
                **extra)


def test_the_build_directory_is_per_source_and_toolchain(tmp_path,
                                                          monkeypatch):
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path / 'cache'))
    here = cpu.build_directory()
    assert here == cpu.build_directory()  # stable
    assert osp.dirname(here) == str(tmp_path / 'cache')
    # another checkout of the same sources
    other = tmp_path / 'checkout' / 'csrc'
    shutil.copytree(osp.dirname(cpu.sources()[0]), other)
    assert cpu.build_directory(str(other)) not in (here, )
    # ... whose sources change
    before = cpu.build_directory(str(other))
    with open(other / 'prm_types.h', 'a') as f:
        f.write('\n// edited\n')
    assert cpu.build_directory(str(other)) != before
    # another environment (venv)
    monkeypatch.setattr(sys, 'prefix', str(tmp_path / 'venv'))
    assert cpu.build_directory() != here
    monkeypatch.undo()
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path / 'cache'))
    assert cpu.build_directory() == here
    # another compiler
    fake = tmp_path / 'bin' / 'c++'
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "g++ (Other) 99.1"\n')
    fake.chmod(0o755)
    monkeypatch.setenv('CXX', str(fake))
    assert cpu.build_directory() != here


@pytest.mark.slow  # two compiler builds
def test_a_second_builder_waits_for_the_first_and_says_so(tmp_path, capfd):
    directory = str(tmp_path / 'build')
    holder = subprocess.Popen(
        [sys.executable, '-c', textwrap.dedent(f'''
            import time
            from prm_det.ops.backends.cpu import build_lock
            with build_lock({directory!r}):
                print('held', flush=True)
                time.sleep(2)
        ''')], env=env_with(str(tmp_path)), stdout=subprocess.PIPE,
        text=True)
    assert holder.stdout.readline() == 'held\n'
    start = time.monotonic()
    with cpu.build_lock(directory):
        waited = time.monotonic() - start
    holder.wait()
    assert waited > 0.5
    assert (f'prm_det: waiting for process {holder.pid}, which is building '
            f'the PRM CPU kernel in {directory}') in capfd.readouterr().err


@pytest.mark.slow
def test_a_build_killed_while_compiling_blocks_nothing(tmp_path):
    """A process killed while it compiles the kernel leaves torch's build
    ``lock`` file behind (before 2.14, torch's own builder waits on it
    forever); the
    next process builds the kernel, saying so before and after, and the
    one after that finds it built and says nothing."""
    cache = str(tmp_path / 'cache')
    env = env_with(cache)
    directory = subprocess.run(
        [sys.executable, '-c',
         'from prm_det.ops.backends import cpu; print(cpu.build_directory())'],
        env=env, capture_output=True, text=True, check=True).stdout.strip()
    first = subprocess.Popen([sys.executable, '-c', USE_KERNEL], env=env,
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not osp.exists(osp.join(directory, 'lock')):
        assert first.poll() is None and time.time() < deadline, \
            first.stderr.read()
        time.sleep(0.05)
    time.sleep(1)  # the compiler is running
    first.kill()  # SIGKILL: nothing of it runs after
    _, err = first.communicate()
    assert first.returncode == -signal.SIGKILL
    assert 'compiling the PRM CPU kernel for this machine, once' in err
    assert osp.exists(osp.join(directory, 'lock'))  # what blocked before

    second = subprocess.run([sys.executable, '-c', USE_KERNEL], env=env,
                            capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    assert (f'prm_det: compiling the PRM CPU kernel for this machine, once '
            f'(20-60 s; cached in {directory})') in second.stderr
    assert 'prm_det: PRM CPU kernel compiled in ' in second.stderr
    # (torch >= 2.14 holds its ``lock`` file with an OS lock and leaves the
    # file: harmless, as the third process shows)

    third = subprocess.run([sys.executable, '-c', USE_KERNEL], env=env,
                           capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr[-3000:]
    assert 'prm_det:' not in third.stderr


@pytest.fixture(scope='module')
def cxx17_torch_include(tmp_path_factory):
    """Include directories of a torch whose headers are C++17: the installed
    one's where they are (torch < 2.14), else those in the wheel of torch
    CXX17_TORCH, which pip fetches (without dependencies) and
    whose include/ folder alone is unpacked."""
    from torch.utils.cpp_extension import include_paths
    probe = subprocess.run(
        [os.environ.get('CXX', 'c++'), '-std=c++17', '-fsyntax-only', '-x',
         'c++', '-', *[f'-isystem{path}' for path in include_paths()]],
        input='#include <ATen/ATen.h>\n', capture_output=True, text=True,
        timeout=300)
    if probe.returncode == 0:
        return include_paths()
    folder = tmp_path_factory.mktemp('torch_cxx17')
    fetch = subprocess.run(
        [sys.executable, '-m', 'pip', 'download', '--no-deps',
         '--only-binary=:all:', '-d', str(folder), f'torch=={CXX17_TORCH}'],
        capture_output=True, text=True, timeout=600)
    if fetch.returncode != 0:
        pytest.skip(f'the installed torch\'s headers need C++20 and pip '
                    f'cannot fetch torch {CXX17_TORCH} to check against: '
                    f'{fetch.stderr.strip()[-300:]}')
    wheel, = folder.glob('torch-*.whl')
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(folder, [name for name in archive.namelist()
                                    if name.startswith('torch/include/')])
    include = folder / 'torch' / 'include'
    return [str(include), str(include / 'torch' / 'csrc' / 'api' / 'include')]


@pytest.mark.slow  # the compiler, twice
@pytest.mark.parametrize('isa', ['AVX512', 'DEFAULT'])
def test_the_kernel_sources_compile_as_cxx17(isa, cxx17_torch_include):
    """torch builds extensions as C++17 before 2.13 (as C++20 since: the
    build the other tests use): a C++20-only std::bit_cast once broke the
    build under torch 2.11. Checked on the widest and the plainest
    instruction set, against C++17 torch headers (since torch 2.14 the
    headers themselves need C++20)."""
    includes = [f'-isystem{path}' for path in cxx17_torch_include] + [
        f'-isystem{sysconfig.get_paths()["include"]}',
        f'-I{osp.dirname(cpu.sources()[0])}']
    proc = subprocess.run(
        [os.environ.get('CXX', 'c++'), '-std=c++17', '-fsyntax-only',
         '-DTORCH_EXTENSION_NAME=prm_det_cpu_check',
         '-DTORCH_API_INCLUDE_EXTENSION_H', *cpu.compile_flags(isa),
         *includes, *cpu.sources()],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
