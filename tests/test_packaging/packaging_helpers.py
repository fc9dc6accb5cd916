"""Building prm_det's wheel as a user's ``pip install <checkout>`` does:
shared by the packaging tests."""
import filecmp
import os
import os.path as osp
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import REPO

# Where the wheel is installed, outside the repository, always the same
# place: the kernel compiles at first use with its absolute source path in
# the build command, so a fixed place with its own torch extension cache
# compiles it once (not on every run) and never invalidates the build the
# repository's own runs keep in torch's default cache.
INSTALL_ROOT = osp.join(
    os.environ.get('XDG_CACHE_HOME', osp.expanduser('~/.cache')), 'prm_det',
    'wheel_test')


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


def install_keeping_unchanged_files(wheel, target):
    """``pip install --target`` into a fresh folder, then into ``target``
    only the files that differ: unchanged kernel sources keep their times,
    so their cached build stays valid."""
    fresh = Path(str(target) + '.new')
    shutil.rmtree(fresh, ignore_errors=True)
    pip('install', '--target', str(fresh), '--no-deps', str(wheel))
    new_files = {p.relative_to(fresh) for p in fresh.rglob('*')
                 if p.is_file()}
    for old in [p for p in target.rglob('*') if p.is_file()]:
        if old.relative_to(target) not in new_files:
            old.unlink()
    for relative in new_files:
        dst = target / relative
        if not dst.is_file() or not filecmp.cmp(fresh / relative, dst,
                                                shallow=False):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(fresh / relative, dst)
    shutil.rmtree(fresh)
