"""Every library prm_det's package code imports is declared in
pyproject.toml (a requirement or an extra), or is one of the stack a user's
MMDetection environment holds by construction, which prm_det leaves
undeclared as mmdet does (torch, mmcv and what mmcv brings), each named
below with the reason."""
import ast
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging_helpers import REPO

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = pytest.importorskip('tomli')

PACKAGE = Path(REPO) / 'prm_det'

# imported but not declared, on purpose
USER_STACK = {
    # the user's builds: declaring them would let pip swap a CUDA build
    # for PyPI's (pyproject.toml: "never torch or an mmcv build")
    'torch': 'the user picks the build for their CUDA',
    'triton': 'comes with a CUDA torch; imported only where present',
    'mmcv': 'built for the user\'s torch and CUDA',
    'mmengine': 'pinned with mmcv under the `mim` extra, as mmdet does',
    # mmcv requires one of opencv-python and its -headless twin and picks
    # the one installed: naming either here could install both
    'opencv-python': 'mmcv brings it (or opencv-python-headless)',
    'opencv-python-headless': 'mmcv brings it (or opencv-python)',
    # mmengine's optional remote storage, imported only for pavi:// URLs
    'pavi': 'only behind a pavi:// checkpoint URL, which needs it anyway',
}


def _imported_top_level_modules():
    """Top-level module name -> the files that import it (every import
    statement, in functions too; relative imports left out)."""
    found = {}
    for path in PACKAGE.rglob('*.py'):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split('.')[0]
                if top != 'prm_det' and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(
                        str(path.relative_to(REPO)))
    return found


def _declared():
    """Distribution names (normalized) pyproject.toml declares, extras
    included."""
    with open(Path(REPO) / 'pyproject.toml', 'rb') as f:
        project = tomllib.load(f)['project']
    lines = list(project['dependencies'])
    for extra in project.get('optional-dependencies', {}).values():
        lines += extra
    return {_normal(Requirement(line).name) for line in lines}


def _normal(name):
    return name.lower().replace('_', '-')


def test_every_library_the_package_imports_is_declared_or_the_users_stack():
    distributions = packages_distributions()
    declared = _declared()
    allowed = {_normal(name) for name in USER_STACK}
    modules = _imported_top_level_modules()
    assert {'torch', 'mmdet', 'PIL', 'pycocotools'} <= set(modules)
    undeclared = []
    for module, files in sorted(modules.items()):
        dists = {_normal(d) for d in distributions.get(module, ())}
        if module == 'pavi':  # not installed here (mmengine's optional)
            dists = {'pavi'}
        assert dists, (f'{module} (imported by {sorted(files)}) is not '
                       f'installed here: which distribution brings it?')
        if not dists & (declared | allowed):
            undeclared.append(f'{module} ({" or ".join(sorted(dists))}), '
                              f'imported by {", ".join(sorted(files))}')
    assert not undeclared, (
        'prm_det imports libraries pyproject.toml does not declare; add '
        'each to [project] dependencies (or an extra, if only an optional '
        'tool needs it), or to USER_STACK here with the reason:\n  ' +
        '\n  '.join(undeclared))
