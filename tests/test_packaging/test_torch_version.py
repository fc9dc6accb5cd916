"""prm_det refuses, at import, a torch older than it needs, naming the fix."""
import os
import subprocess
import sys

import pytest
from helpers import REPO

from prm_det.compat import MIN_TORCH, check_torch


@pytest.mark.parametrize('version', ['2.5.0', '2.5.1+cu124', '2.10.0',
                                     '2.13.0+cpu', '3.0.0.dev20270101'])
def test_a_new_enough_torch_passes(version):
    check_torch(version)


@pytest.mark.parametrize('version', ['2.4.1', '2.1.2+cu118', '1.13.1'])
def test_an_old_torch_is_refused_with_the_fix(version):
    with pytest.raises(ImportError) as info:
        check_torch(version)
    need = '.'.join(map(str, MIN_TORCH))
    assert f'prm_det needs torch >= {need}' in str(info.value)
    assert f'this environment has torch {version}' in str(info.value)
    assert f'pip install "torch>={need}"' in str(info.value)


def test_import_prm_det_under_an_old_torch_stops_with_the_message(tmp_path):
    """As a user's process meets it: torch reports 2.1.2, `import prm_det`
    fails before registering anything (a directory outside the repo)."""
    code = ("import torch; torch.__version__ = '2.1.2+cu118'\n"
            "import prm_det\n")
    proc = subprocess.run([sys.executable, '-c', code], cwd=str(tmp_path),
                          env=dict(os.environ, PYTHONPATH=REPO),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    need = '.'.join(map(str, MIN_TORCH))
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f'ImportError: prm_det needs torch >= {need}'), proc.stderr[-2000:]
