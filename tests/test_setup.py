"""`make setup` (tools/setup_env.sh): idempotent, and a failing step names
itself and its fix and leaves nothing marked as installed."""
import os
import os.path as osp
import subprocess
import sys
import time

import pytest
from helpers import REPO

SCRIPT = osp.join(REPO, 'tools', 'setup_env.sh')


def run_setup(env_extra, venv):
    env = dict(os.environ, PRM_DET_VENV=str(venv), **env_extra)
    return subprocess.run(['bash', SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # runs tools/setup_env.sh
def test_second_setup_skips_the_install():
    venv = osp.dirname(osp.dirname(sys.executable))
    start = time.time()
    proc = run_setup({}, venv)
    assert proc.returncode == 0, proc.stderr
    assert 'nothing to install' in proc.stdout
    assert time.time() - start < 10


def test_missing_compiler_stops_setup_naming_step_and_fix(tmp_path):
    venv = tmp_path / 'venv'
    proc = run_setup({'CXX': '/nonexistent/c++'}, venv)
    assert proc.returncode != 0
    assert 'FAILED at step: checking for a C++ compiler' in proc.stderr
    assert 'apt-get install g++' in proc.stderr
    assert not (venv / '.prm_det_setup_stamp').exists()


def test_unreachable_index_stops_setup_naming_step_and_fix(tmp_path):
    venv = tmp_path / 'venv'
    proc = run_setup({
        'PIP_CONFIG_FILE': os.devnull, 'PIP_INDEX_URL':
        'http://127.0.0.1:9/simple', 'PIP_EXTRA_INDEX_URL': '',
        'PIP_FIND_LINKS': '', 'PIP_RETRIES': '0', 'PIP_TIMEOUT': '2'
    }, venv)
    assert proc.returncode != 0
    assert 'FAILED at step: checking that the package index is reachable' \
        in proc.stderr
    assert 'PIP_INDEX_URL' in proc.stderr
    assert not (venv / '.prm_det_setup_stamp').exists()


def test_cxx20_wrapper_passes_cpp20_instead_of_mmcvs_cpp17():
    """tools/cxx20.sh (mmcv 2.1.0 against torch 2.14: its setup.py asks for
    C++17, torch's headers need C++20): every argument reaches the real
    compiler as given, but -std=c++14/17, which become -std=c++20."""
    args = ['-O3', '-std=c++17', '-I/a b/include', '-c', 'x.cpp',
            '-std=c++14', '-DX="1 2"']
    # printf as the compiler, its format first: each argument on a line
    proc = subprocess.run(
        ['bash', osp.join(REPO, 'tools', 'cxx20.sh'), '%s\n'] + args,
        capture_output=True, text=True,
        env=dict(os.environ, REAL_CXX='printf'), timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        '-O3', '-std=c++20', '-I/a b/include', '-c', 'x.cpp', '-std=c++20',
        '-DX="1 2"']
