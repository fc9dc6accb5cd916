"""Building prm_det's wheel as a user's ``pip install <checkout>`` does:
shared by the packaging tests."""
import os
import os.path as osp
import shutil
import subprocess
import sys

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def repository_files():
    """The working tree as git sees it (tracked and new, not ignored)."""
    out = subprocess.run(
        ['git', 'ls-files', '--cached', '--others', '--exclude-standard',
         '-z'], cwd=REPO, check=True, capture_output=True).stdout
    return [p for p in out.decode().split('\0')
            if p and osp.isfile(osp.join(REPO, p))]


def pip(*args, cwd=None, python=sys.executable):
    result = subprocess.run([str(python), '-m', 'pip', *args,
                             '--disable-pip-version-check', '-q'],
                            cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def copy_repository(dest):
    """A copy of the working tree at ``dest``, for builds that would leave
    build/ and *.egg-info in the checkout."""
    for path in repository_files():
        os.makedirs(osp.dirname(dest / path), exist_ok=True)
        shutil.copy2(osp.join(REPO, path), dest / path)
    return dest


def build_wheel(tmp):
    """A wheel built from a copy of the repository (building in place would
    leave build/ and *.egg-info there)."""
    source = copy_repository(tmp / 'source')
    pip('wheel', str(source), '--no-deps', '--no-build-isolation', '-w',
        str(tmp / 'dist'))
    (built, ) = (tmp / 'dist').glob('prm_det-*.whl')
    return built
